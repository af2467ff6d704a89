"""``imgmountd``: the D-Bus service (design: "D-Bus API, version 1")."""

from __future__ import annotations

import sys


def main() -> int:
    print("imgmountd: the D-Bus service is not built yet; imgmount runs the engine in-process",
          file=sys.stderr)
    return 1
