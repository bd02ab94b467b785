"""``python -m trainer --config configs/tiny.yaml [key.sub=value ...]`` (``make train``).

Resumes from the newest checkpoint in train.output_dir by default; the run folder keeps
the resolved config it started with as ``config.yaml`` (``--print-config`` prints it and
exits). Launch several GPUs with ``torchrun --nproc-per-node N -m trainer ...`` or ``deepspeed
--module trainer ...`` (DeepSpeed's launcher has no ``-m``) and train.deepspeed=configs/deepspeed/zero2.json, or
under torchrun with train.deepspeed=null: plain data parallel (trainer.train.average_gradients).

``python -m trainer generate ...`` and ``python -m trainer evaluate ...`` use a trained model: they
are ``python -m inference`` (inference/cli.py; ``--help`` on each), forwarded from here only.
``python -m trainer export`` turns a ``step-N`` checkpoint into such a model folder, or writes one in the
released CoVT checkpoints' layout (``--format reference``; trainer/export_checkpoint.py).
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


SUBCOMMANDS = ("generate", "evaluate")  # using a trained model: python -m inference


def main(argv: list[str] | None = None) -> None:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        # the command line is the one place of trainer that reaches inference (which sits above trainer)
        from inference.cli import main as inference_main

        sys.exit(inference_main(argv))
    if argv and argv[0] == "export":
        from trainer.export_checkpoint import main as export_main

        sys.exit(export_main(argv[1:]))
    from covt.config import add_config_arguments, config_from_args
    from covt.console import add_verbose_argument, setup_console

    parser = argparse.ArgumentParser(
        prog="python -m trainer", description=__doc__.split("\n")[0],
        epilog="subcommands: python -m trainer generate ... | evaluate ... (a trained model) | export ... "
               "(a checkpoint as a model folder; --help on each)")
    add_config_arguments(parser)
    parser.add_argument("--resume", default="auto", metavar="auto|none|PATH",
                        help="auto: continue from the newest checkpoint in train.output_dir (default); none: start "
                             "from step 0; PATH: from that checkpoint of train.output_dir (e.g. "
                             "runs/x/checkpoints/step-000300), deleting the later ones")
    parser.add_argument("--no-resume", dest="resume", action="store_const", const="none",
                        help="start from step 0 even if checkpoints exist")
    parser.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                        help="stop once STEP optimizer steps are done (to split a run; resume continues it)")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume even though the config differs from the one the run trained with "
                             "(the change is recorded under train.output_dir/launches/)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (file + overrides + defaults) as YAML and exit")
    add_verbose_argument(parser)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    if args.print_config:
        from covt.config import config_yaml

        print(config_yaml(cfg), end="")
        return

    setup_console(args.verbose)
    from trainer.train import train

    resume = {"auto": True, "none": False}.get(args.resume, args.resume)
    final = train(cfg, resume=resume, stop_after=args.stop_after, allow_config_change=args.allow_config_change)
    if final is not None:
        print(f"done: {final}")


if __name__ == "__main__":
    main()
