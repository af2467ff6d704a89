"""Where imgmount keeps its state, and the variable that moves it (tests, a second instance): light enough for
the commands to import without the journal."""

DEFAULT_STATE_DIR = "/run/imgmount"
STATE_DIR_ENV = "IMGMOUNT_STATE_DIR"
