"""``python -m precompute --config configs/tiny.yaml [--anchors pidinet,depth] [key.sub=value ...]``"""
from __future__ import annotations

import argparse
import sys

from covt.anchors import ANCHORS
from covt.config import add_config_arguments, config_from_args
from covt.console import add_verbose_argument, setup_console


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m precompute",
        description="Run the frozen anchors once over a LLaVA dataset and write their targets to a shard cache. "
                    "Resumable: a rerun skips every finished shard. Under torchrun each rank owns disjoint shards.",
    )
    add_config_arguments(parser)
    parser.add_argument("--anchors", default=None,
                        help="comma-separated anchors to compute instead of the config's `anchors`, e.g. "
                             "--anchors pidinet adds PIDINet to an existing cache without touching the others")
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    anchors = None
    if args.anchors:
        anchors = [a.strip() for a in args.anchors.split(",") if a.strip()]
        unknown = [a for a in anchors if a not in ANCHORS]
        if unknown:
            sys.exit(f"--anchors: unknown anchor(s) {unknown} (known: {list(ANCHORS)})")
    setup_console(args.verbose)

    from precompute.run import precompute  # after argument errors, which should not wait for torch

    precompute(cfg, anchors)


if __name__ == "__main__":
    main()
