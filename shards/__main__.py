"""``python -m shards inspect ...`` (see shards.inspect)."""
import sys

from shards.inspect import main

COMMANDS = {"inspect": main}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: python -m shards {{{','.join(COMMANDS)}}} ...  (try: python -m shards inspect --help)")
    sys.exit(COMMANDS[sys.argv[1]](sys.argv[2:]))
