"""``python -m inference generate|evaluate ...``: see inference/cli.py."""
import sys

from inference.cli import main

if __name__ == "__main__":
    sys.exit(main())
