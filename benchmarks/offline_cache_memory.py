"""Resident memory of a run reading an offline teacher cache, as the cache grows.

`distill --teacher-logits` reads every example of the cache once per epoch. The reader used to load each shard whole on
first use and keep it, so a process held the whole cache in RAM by the end of an epoch (136 GB per process for 1B
tokens at k = 32). It now reads each batch's rows from its shard file (``pread``) and keeps only the shards' offset
tables. This script measures both on caches of 1x, 10x and 100x the tokens of the offline-teacher benchmark
(25,728 tokens, docs/benchmarks.md): the peak resident set size (VmHWM) of a fresh process that reads every example
in batches of 8, minus its size before reading.

The shards are written in the cache's format (same tensors, dtypes, shard size; ``ShardReader`` reads them as it
reads ``cache-teacher``'s) with random values: memory does not depend on the values, and caching 2.6M tokens with
the real teacher would take hours on a CPU.

    python benchmarks/offline_cache_memory.py --out runs/cache-memory
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

BENCHMARK_TOKENS = 25_728
"""The cache of benchmarks/offline_teacher.py (60 BBC articles at max_length 128)."""


def write_cache(folder: Path, tokens: int, top_k: int, length: int = 128, shard_examples: int = 512) -> dict:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    examples = tokens // length
    generator = np.random.default_rng(0)
    shards = []
    for first in range(0, examples, shard_examples):
        count = min(shard_examples, examples - first)
        rows = count * length
        tensors = {
            "offsets": torch.arange(0, rows + 1, length, dtype=torch.int64),
            "input_ids": torch.from_numpy(generator.integers(0, 49152, rows, dtype=np.int32)),
            "topk_ids": torch.from_numpy(generator.integers(0, 49152, (rows, top_k)).astype(np.uint16)),
            "topk_log_probs": torch.from_numpy(-generator.random((rows, top_k), dtype=np.float32).astype(np.float16)),
            "rest_log_prob": torch.from_numpy(-generator.random(rows, dtype=np.float32)),
        }
        name = f"shard-{len(shards):05d}.safetensors"
        save_file(tensors, str(folder / name))
        shards.append({"file": name, "examples": count, "rows": rows, "bytes": (folder / name).stat().st_size})
    manifest = {"shards": shards, "hidden_states": False, "tokens": examples * length}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def rss_mb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(folder: Path, reader: str) -> dict:
    """Read every example in batches of 8 (in this process); the peak RSS above the start."""
    import torch
    from safetensors.torch import load_file

    from alambic.offline.store import TeacherOutputs

    manifest = json.loads((folder / "manifest.json").read_text())
    outputs = TeacherOutputs(folder, manifest)
    kept = {}  # the previous reader: each shard loaded whole on first use, and kept
    before = rss_mb("VmRSS")
    start = time.perf_counter()
    for first in range(0, len(outputs), 8):
        examples = [outputs.example(i) for i in range(first, min(first + 8, len(outputs)))]
        if reader == "stream":
            rows = outputs.rows(examples)
        else:
            for e in examples:
                if e.shard not in kept:
                    kept[e.shard] = load_file(str(folder / manifest["shards"][e.shard]["file"]))
            rows = {name: torch.cat([kept[e.shard][name][e.rows] for e in examples])
                    for name in ("topk_ids", "topk_log_probs", "rest_log_prob")}
        del rows
    return {"peak_rss_mb": rss_mb("VmHWM") - before, "seconds": time.perf_counter() - start,
            "cache_mb": sum(s["bytes"] for s in manifest["shards"]) / 2**20, "tokens": manifest["tokens"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/cache-memory"))
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--reader", choices=("stream", "keep"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.reader)))
        return
    print(f"{'tokens':>10} {'cache MB':>9} {'reader':>8} {'peak RSS growth MB':>19} {'seconds':>8}")
    for scale in args.scales:
        folder = args.out / f"cache-x{scale}"
        if not (folder / "manifest.json").is_file():
            write_cache(folder, BENCHMARK_TOKENS * scale, args.top_k)
        for reader in ("keep", "stream"):  # each in a fresh process: its peak is its own
            done = subprocess.run([sys.executable, __file__, "--measure", str(folder), "--reader", reader],
                                  capture_output=True, text=True, check=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{row['tokens']:>10} {row['cache_mb']:>9.1f} {reader:>8} {row['peak_rss_mb']:>19.1f} "
                  f"{row['seconds']:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
