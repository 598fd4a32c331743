"""Stage 1's training stream (launcher.data.train_batches): what a rank pays for batches that do not depend on the
world size, and how tightly `llm.prompts.length_key` packs them.

Every rank reads the whole split and takes its part of each global micro-batch, so each rank decodes every sample
and computes its length key, and encodes (tokenizes through the chat template) only its part. Measured in one
invocation on one prep output, for a global micro-batch of `--global-batch`:
- seconds per global micro-batch on rank 0 at each world size in `--worlds`; world 1 encodes every sample, the
  baseline: a stream whose ranks encoded every sample (to sort by encoded length) would pay it on every rank;
- the non-pad fraction of the padded micro-batches each rank trains on, grouped three ways over the same samples:
  not grouped, by the encoded length (prompt + answer tokens, the key before 2026-12-08) and by `length_key`.

    python bench/stage1_stream.py --data out/collm-ml-1m      # writes bench/results/stage1_stream.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from launcher.config import Config
from launcher.data import train_batches, usable
from llm.model import load_base
from llm.prompts import encode, length_key
from pipeline.config import load_config


def non_pad(batches: list[list[int]], world: int) -> float:
    """Real tokens over padded tokens when each of `world` ranks pads its part of every global micro-batch (lengths)."""
    real = padded = 0
    for batch in batches:
        part = len(batch) // world
        for r in range(world):
            lengths = batch[r * part:(r + 1) * part]
            real, padded = real + sum(lengths), padded + max(lengths) * len(lengths)
    return real / padded


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "collm-ml-1m.yaml"))
    ap.add_argument("--data", type=Path, default=REPO / "out" / "collm-ml-1m", help="a prep output directory")
    ap.add_argument("--global-batch", type=int, default=128, help="micro_batch x ranks (GPU config: 128 x 1)")
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 8])
    ap.add_argument("--batches", type=int, default=64, help="global micro-batches per measurement (2 windows)")
    ap.add_argument("--history-titles", type=int, help="default: the config's llm.history_titles")
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "stage1_stream.json")
    args = ap.parse_args()
    cfg = load_config(args.config, [], schema=Config)
    history = cfg.llm.history_titles if args.history_titles is None else args.history_titles
    _, tokenizer = load_base(cfg.llm)
    keep = usable(cfg.llm.drop_no_history)

    def encoded(sample) -> list[int]:
        e = encode(tokenizer, sample, "lora", cfg.domain, cfg.llm.max_length, history)
        return e.prompt + e.answer

    def stream(world: int, length, to=encoded) -> list[list]:
        return list(itertools.islice(train_batches(args.data, "train", to, args.global_batch // world, 0, world,
                                                   cfg.lora.seed, cfg.lora.shuffle_buffer, keep, length), args.batches))

    stream(1, None, lambda s: s)  # page the shards in before any clock
    seconds = {}
    for world in args.worlds:
        t0 = time.perf_counter()
        stream(world, length_key(tokenizer, history))  # a fresh key: its title cache is part of the cost
        seconds[world] = (time.perf_counter() - t0) / args.batches
    groupings = {"none": None, "encoded length": lambda s: len(encoded(s)), "length_key": length_key(tokenizer, history)}
    packing = {}
    for name, length in groupings.items():
        lengths = [[len(e) for e in b] for b in stream(1, length)]
        packing[name] = {str(w): non_pad(lengths, w) for w in args.worlds}
    print(f"global micro-batch {args.global_batch}, {history} history titles, {args.batches} batches, {args.data}")
    print(f"{'world':>5} {'s per global batch (rank 0)':>28} {'/ world ' + str(args.worlds[0]):>10}")
    for world, s in seconds.items():
        print(f"{world:5d} {s:28.4f} {s / seconds[args.worlds[0]]:10.3f}")
    print(f"{'non-pad fraction':22}" + "".join(f" {'world ' + str(w):>9}" for w in args.worlds))
    for name, row in packing.items():
        print(f"{name:22}" + "".join(f" {row[str(w)]:9.3f}" for w in args.worlds))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({"data": str(args.data), "config": args.config, "global_batch": args.global_batch,
                                        "history_titles": history, "batches": args.batches,
                                        "seconds_per_global_batch": seconds, "non_pad": packing}, indent=1))


if __name__ == "__main__":
    main()
