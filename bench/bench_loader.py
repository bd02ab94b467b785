"""The trainer's data loader alone: samples/s one rank's DataLoader delivers, per worker count.

What it measures is exactly what trainer/train.py iterates: ``StreamingDataset`` (tar members +
zarr targets of the real cached shapes for sam+depth+dino, integrity checks as configured) and
the ``BatchBuilder`` collate (stage format, tokenising, the processor's 448x448 pixel values,
labels, stacked targets), in ``--workers`` processes, micro-batches of ``--micro-batch``.
Compare with what the GPU consumes (BENCHMARKS.md: ~7-10 samples/s per H100 for the 7B step):
the target is 10x that per rank.

    python bench/bench_loader.py --workers 0,2,4,8 --batches 40
    python bench/bench_loader.py --tiny --workers 0,2 --batches 4     # smoke test
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_multi_gpu import build_cache, long_conversations  # noqa: E402
from covt.config import Config, StageConfig  # noqa: E402
from shards.reader import StreamingDataset  # noqa: E402
from trainer.batch import BatchBuilder  # noqa: E402
from trainer.schedule import Schedule  # noqa: E402
from trainer.settings import BatchSettings  # noqa: E402
from trainer.tiny_model import build_processor, build_tokenizer  # noqa: E402
from trainer.tokens import add_thought_tokens  # noqa: E402

ANCHORS = ["sam", "depth", "dino"]


def samples_per_second(cache: Path, workers: int, micro: int, batches: int, cfg: Config, processor, tokens) -> float:
    schedule = Schedule([StageConfig("understanding", 10**6, merge_after=True)])
    collate = BatchBuilder(schedule, micro, processor, tokens, BatchSettings.from_config(cfg), {})
    dataset = StreamingDataset(cache, ANCHORS, seed=0, batch_size=micro)
    loader = iter(torch.utils.data.DataLoader(dataset, batch_size=micro, num_workers=workers, collate_fn=collate,
                                              prefetch_factor=4 if workers else None))
    next(loader)  # workers started, first batch made
    t0 = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batches * micro / (time.perf_counter() - t0)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", default="0,2,4,8")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--batches", type=int, default=40, help="micro-batches timed per setting")
    parser.add_argument("--tiny", action="store_true", help="tiny target shapes and 112x112 images (smoke test)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/covt-bench-loader"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    image_size = 112 if args.tiny else 448
    cache = build_cache(args.work, args.tiny, data=long_conversations(args.work),
                        name=f"cache-long-{'tiny' if args.tiny else 'real'}")
    processor = build_processor(build_tokenizer(), image_size)
    tokens = add_thought_tokens(processor)
    cfg = Config(anchors=list(ANCHORS))
    cfg.model.image_size = image_size
    cfg.train.max_length = 4096
    rows = []
    for workers in [int(w) for w in args.workers.split(",")]:
        rate = samples_per_second(cache, workers, args.micro_batch, args.batches, cfg, processor, tokens)
        rows.append({"workers": workers, "micro_batch": args.micro_batch, "samples_per_s": rate})
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
