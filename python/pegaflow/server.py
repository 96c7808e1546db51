"""The ``pegaflow-server`` console script: runs the server built into the extension."""

from __future__ import annotations

import sys

from pegaflow._native import run_server


def main(argv: list[str] | None = None) -> int:
    """Run the server with ``argv`` (default: ``sys.argv[1:]``) until SIGINT/SIGTERM."""
    args = sys.argv[1:] if argv is None else argv
    return run_server(["pegaflow-server", *args])


if __name__ == "__main__":
    sys.exit(main())
