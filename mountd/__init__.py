"""imgmount: mount virtual-machine disk images on the host, safely."""

__version__ = "0.1.0"
