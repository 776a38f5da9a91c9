"""Offline teacher outputs on a real teacher: what a cache costs on disk, what it saves per step, what it costs in
quality. SmolLM2-135M -> the 15-layer student `make demo-lm` builds (auto:influence), raw BBC text.

1. data: the first --documents articles of bbc-news:train in one file (the training data of every run);
2. `cache-teacher` at each --top-k (at --temperature, 2 by default): seconds, bytes per token;
3. per seed, at equal steps and data (the same student start, the same batch order): `distill` with the live teacher
   (full-vocabulary KL) and `distill --teacher-logits` on the top-k cache (--train-k, 32 by default), both with the
   soft-target KL (x5, at --temperature) and the next-token CE (x2) and no cosine term (the cache holds no hidden
   states): training tokens/s (non-pad tokens per second, median of the logged windows) and held-out perplexity on
   bbc-news:heldout.

    python benchmarks/offline_teacher.py --out runs/offline --documents 60 --steps 40 --seeds 0 1 2
    python benchmarks/offline_teacher.py --out runs/offline --documents 60 --steps 40 --seeds 0 1 2 --temperature 1 \
        --top-k 32 128 --train-k 128      # after the same with --top-k 32 --train-k 32
    # cache format 2 (compact) against format 1 (float16), at k = 128: bytes per token and held-out perplexity
    python benchmarks/offline_teacher.py --out runs/offline --documents 60 --steps 40 --seeds 0 1 2 --temperature 1 \
        --top-k 128 --train-k 128 --compare-formats

Every figure lands in OUT/results.json as it is measured (a rerun skips what is there); the tables are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import alambic  # noqa: E402
from alambic.data.sources import read_documents  # noqa: E402
from alambic.workflows.cache_teacher import cache_teacher  # noqa: E402

TEACHER, MAX_LENGTH, BATCH = "smollm2-135m", 128, 4


def load(out: Path) -> dict:
    file = out / "results.json"
    return json.loads(file.read_text()) if file.is_file() else {}


def save(out: Path, results: dict) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")


def student(out: Path) -> Path:
    folder = out / "student-init"
    if not (folder / "config.json").is_file():
        from alambic.students import init_student, save_student, selection
        from alambic.teachers import load_teacher

        teacher, tokenizer = load_teacher(TEACHER)
        calibration = selection.calibration_batches(["bbc-news:train"], tokenizer, "causal", max_length=MAX_LENGTH)
        built = init_student(teacher, layers="auto:influence", depth=15, calibration_data=calibration)
        save_student(built.model, tokenizer, folder, card=built.model_card(TEACHER))
    return folder


def distill(out: Path, name: str, data: Path, init: Path, steps: int, seed: int, cache: Path | None,
            temperature: float) -> dict:
    run = out / "runs" / name
    cfg = alambic.load_config(overrides=[{
        "teacher": TEACHER, "teacher_logits": str(cache) if cache else "", "out": str(run),
        "student": {"init": str(init)},
        "loss": {"alpha_cos": 0.0, "temperature": temperature},  # soft targets + CE: what the cache changes
        "data": {"train": [str(data)], "eval": ["bbc-news:heldout"], "max_length": MAX_LENGTH,
                 "eval_max_tokens": 8192},
        "training": {"max_steps": steps, "batch_size": BATCH, "seed": seed, "log_every": 5, "save_every": 10**6,
                     "lr": 5e-4, "warmup_ratio": 0.1},
    }])
    start = time.perf_counter()
    result = alambic.distill(cfg, progress=False)
    seconds = time.perf_counter() - start
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {"perplexity": result.metrics["eval/perplexity"], "seconds": seconds,
            "tokens": max(m.get("tokens", 0) for m in logged),
            "tokens_per_s": statistics.median(m["tokens_per_s"] for m in logged if "tokens_per_s" in m)}


def compare_formats(args, results: dict, data: Path, init: Path, tag: str) -> None:
    """The same cache (k = --train-k) written in format 1 and in format 2, and the same runs trained on each."""
    for version in (1, 2):
        key = f"cache-k{args.train_k}{tag}-format{version}"
        if key not in results:
            start = time.perf_counter()
            manifest = cache_teacher(TEACHER, [str(data)], args.out / key, top_k=args.train_k,
                                     temperature=args.temperature, max_length=MAX_LENGTH, batch_size=8,
                                     format_version=version)
            results[key] = {"seconds": time.perf_counter() - start, "tokens": manifest["tokens"],
                            "bytes_per_token": manifest["bytes_per_token"],
                            "bytes": sum(s["bytes"] for s in manifest["shards"])}
            save(args.out, results)
        for seed in args.seeds:
            run = f"top{args.train_k}{tag}-format{version}-seed{seed}"
            if run not in results:
                results[run] = distill(args.out, run, data, init, args.steps, seed, args.out / key, args.temperature)
                save(args.out, results)
    print(f"\n| cache format | bytes / token at k = {args.train_k} | seconds to cache | held-out perplexity "
          f"({len(args.seeds)} seeds) |\n|---|---:|---:|---:|")
    ppl = {}
    for version in (1, 2):
        cache = results[f"cache-k{args.train_k}{tag}-format{version}"]
        ppl[version] = [results[f"top{args.train_k}{tag}-format{version}-seed{s}"]["perplexity"] for s in args.seeds]
        spread = statistics.stdev(ppl[version]) if len(ppl[version]) > 1 else 0.0
        print(f"| {version} | {cache['bytes_per_token']:.1f} | {cache['seconds']:.0f} | "
              f"{statistics.mean(ppl[version]):.3f} ± {spread:.3f} |")
    ratios = [b / a for a, b in zip(ppl[1], ppl[2])]
    print(f"\nformat 2 / format 1 perplexity per seed: {', '.join(f'{r:.4f}' for r in ratios)} "
          f"(mean {statistics.mean(ratios):.4f}; target within 1%)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--documents", type=int, default=120)
    p.add_argument("--top-k", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--temperature", type=float, default=2.0, help="of the cache and of both runs' KL")
    p.add_argument("--train-k", type=int, default=32, help="the cache (one of --top-k) the offline runs train on")
    p.add_argument("--compare-formats", action="store_true",
                   help="instead of live vs cache: the --train-k cache in format 1 (float16) against format 2 "
                   "(compact), bytes per token and held-out perplexity per seed")
    args = p.parse_args()
    tag = "" if args.temperature == 2.0 else f"-T{args.temperature:g}"  # T = 2 runs were the first ones
    args.out.mkdir(parents=True, exist_ok=True)
    results = load(args.out)
    data = args.out / "train.txt"
    if not data.is_file():
        data.write_text("\n\n".join(read_documents(["bbc-news:train"], split_documents="file")[:args.documents]))
    for k in args.top_k:
        key = f"cache-k{k}{tag}"
        if key not in results:
            start = time.perf_counter()
            manifest = cache_teacher(TEACHER, [str(data)], args.out / key, top_k=k, temperature=args.temperature,
                                     max_length=MAX_LENGTH, batch_size=8)
            results[key] = {"seconds": time.perf_counter() - start, "tokens": manifest["tokens"],
                            "bytes_per_token": manifest["bytes_per_token"],
                            "bytes": sum(s["bytes"] for s in manifest["shards"])}
            save(args.out, results)
    init = student(args.out)
    if args.compare_formats:
        compare_formats(args, results, data, init, tag)
        return
    for seed in args.seeds:
        for variant, cache in (("live", None), (f"top{args.train_k}", args.out / f"cache-k{args.train_k}{tag}")):
            key = f"{variant}{tag}-seed{seed}"
            if key not in results:
                results[key] = distill(args.out, key, data, init, args.steps, seed, cache, args.temperature)
                save(args.out, results)
    print("\n| top-k | cache size (MB) | tokens | bytes / token | seconds to cache |\n|---:|---:|---:|---:|---:|")
    for k in args.top_k:
        r = results[f"cache-k{k}{tag}"]
        print(f"| {k} | {r['bytes'] / 1e6:.1f} | {r['tokens']:,} | {r['bytes_per_token']:.0f} | {r['seconds']:.0f} |")
    print(f"\n{args.steps} steps of {BATCH} x {MAX_LENGTH} tokens, seeds {args.seeds}, T = {args.temperature:g}")
    print("| teacher | held-out perplexity | training tokens/s (median of logged steps) | wall seconds |\n|---|---:|---:|---:|")
    for variant, label in (("live", "live (full-vocabulary KL)"), (f"top{args.train_k}", f"cache, top-{args.train_k}")):
        rows = [results[f"{variant}{tag}-seed{s}"] for s in args.seeds]
        ppl = [r["perplexity"] for r in rows]
        tps = [r["tokens_per_s"] for r in rows]
        spread = statistics.stdev(ppl) if len(ppl) > 1 else 0.0
        print(f"| {label} | {statistics.mean(ppl):.2f} ± {spread:.2f} | {statistics.mean(tps):.0f} | "
              f"{statistics.mean(r['seconds'] for r in rows):.0f} |")
    live = [results[f"live{tag}-seed{s}"]["perplexity"] for s in args.seeds]
    top = [results[f"top{args.train_k}{tag}-seed{s}"]["perplexity"] for s in args.seeds]
    ratio = statistics.mean(t / l for t, l in zip(top, live))
    speed = statistics.mean(results[f"top{args.train_k}{tag}-seed{s}"]["tokens_per_s"]
                            / results[f"live{tag}-seed{s}"]["tokens_per_s"] for s in args.seeds)
    print(f"\ntop-{args.train_k} / live perplexity: {ratio:.4f} (target within 2%); tokens/s ratio {speed:.2f}x")


if __name__ == "__main__":
    main()
