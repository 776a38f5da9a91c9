"""Does bf16 train the same student as fp32? Real `alambic distill` runs, identical but for
``training.mixed_precision``, over seeds: the loss terms of the first steps, the held-out perplexity at the end and
the engine's own tokens/s (non-pad tokens, from metrics.jsonl).

    python benchmarks/precision_parity.py                     # SmolLM2-135M -> 15 layers, 30 steps of 4 x 128
    python benchmarks/precision_parity.py --seeds 0 --steps 10

Each run is its own process (accelerate fixes the precision once per process). Results go to OUT/results.json,
rewritten after every run (an interrupted benchmark continues where it stopped).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

PRECISIONS = ("no", "bf16", "bf16-autocast")
"""fp32; a bf16 student with fp32 master weights (what ``auto`` picks); fp32 weights under bf16 autocast."""
TERMS = ("loss", "loss/kd", "loss/lm", "loss/cos")


def run(args, precision: str, seed: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "alambic", "distill", "--teacher", args.teacher, "--data", args.data,
           "--eval-data", args.eval_data, "--out", str(out), "--max-steps", str(args.steps), "--layers", args.layers,
           "--no-progress"]
    for option in (f"training.mixed_precision={precision}", f"training.seed={seed}", "training.log_every=1",
                   f"training.save_every={args.steps}", f"training.batch_size={args.batch_size}",
                   f"training.lr={args.lr}", f"data.max_length={args.max_length}",
                   f"data.eval_max_tokens={args.eval_tokens}"):
        cmd += ["--set", option]
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"{precision} seed {seed} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    said = next(line for line in done.stdout.splitlines() if line.startswith("mixed precision:"))
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    evals = [r for r in log if "eval/perplexity" in r]
    return {"said": said, "first_steps": [{t: r[t] for t in TERMS} for r in steps[:3]],
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps[1:]),
            "perplexity": evals[-1]["eval/perplexity"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--layers", default="every-other")
    parser.add_argument("--data", default="bbc-news:train")
    parser.add_argument("--eval-data", default="bbc-news:heldout")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--out", default="runs/precision-parity")
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    args = parser.parse_args()
    out = Path(args.out)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    for seed in args.seeds:
        for precision in args.precisions:
            key = f"{precision}/seed{seed}"
            if key not in results:
                results[key] = run(args, precision, seed, out / key)
                out.mkdir(parents=True, exist_ok=True)
                results_file.write_text(json.dumps(results, indent=2) + "\n")
            r = results[key]
            print(f"{key}: held-out perplexity {r['perplexity']:.2f}, {r['tokens_per_s']:.0f} tokens/s ({r['said']})",
                  flush=True)
    print(table(results, args))


def table(results: dict, args) -> str:
    lines = [f"{args.teacher} -> {args.layers}, {args.steps} steps of {args.batch_size} x {args.max_length}, "
             f"seeds {' '.join(map(str, args.seeds))}", "",
             "| precision | held-out perplexity (mean ± sd) | tokens/s (median of the runs) |", "| --- | ---: | ---: |"]
    by_precision = {p: [results[f"{p}/seed{s}"] for s in args.seeds if f"{p}/seed{s}" in results]
                    for p in args.precisions}
    for precision, runs in by_precision.items():
        if not runs:
            continue
        ppl = [r["perplexity"] for r in runs]
        spread = statistics.stdev(ppl) if len(ppl) > 1 else 0.0
        lines.append(f"| {'fp32' if precision == 'no' else precision} | {statistics.mean(ppl):.2f} ± {spread:.2f} | "
                     f"{statistics.median(r['tokens_per_s'] for r in runs):.0f} |")
    for precision in args.precisions:
        pairs = [(results[f"no/seed{s}"], results[f"{precision}/seed{s}"]) for s in args.seeds
                 if precision != "no" and f"no/seed{s}" in results and f"{precision}/seed{s}" in results]
        if not pairs:
            continue
        lines += ["", f"largest relative difference of each loss term, {precision} vs fp32, over the seeds (the same "
                  "weights and batch at step 1; after that the trajectories separate):"]
        for index in range(min(len(fp32["first_steps"]) for fp32, _ in pairs)):
            worst = {t: max(abs(bf16["first_steps"][index][t] / fp32["first_steps"][index][t] - 1)
                            for fp32, bf16 in pairs) for t in TERMS}
            lines.append(f"- step {index + 1}: " + ", ".join(f"{t} {100 * v:.2f}%" for t, v in worst.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
