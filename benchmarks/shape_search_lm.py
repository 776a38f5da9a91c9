"""Shape search on a language model: SmolLM2-135M with a speed-up budget (default 2x at batch 1 x 128 tokens).

1. ``alambic init-student --target-speedup X`` searches the student's shape (candidate table in OUT/search.log);
2. the baseline: 15 measured layers at full width (``--layers auto:influence --depth 15``, ``make demo-lm``'s
   student);
3. each distilled with ``configs/demo-lm.yaml`` (the triple loss on BBC text, the cosine term off for both since the
   searched student may be narrower) at the same steps, data and seed;
4. per seed, ``alambic report smollm2-135m searched depth-15 --lm-data bbc-news:heldout`` measures the speed-ups
   (interleaved, with their interval) and held-out perplexity.

With ``--depth-only D``, a third student: D measured layers at full width (``--depth D``), the depth-only shape that
meets the budget, distilled and reported the same way (its reports are written beside the first ones).

    python benchmarks/shape_search_lm.py --out runs/search-lm
    python benchmarks/shape_search_lm.py --out runs/search-lm --depth-only 12

Prints the table of docs/benchmarks.md; OUT/results.json holds every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from shape_search import ALAMBIC, run  # the encoder benchmark's runner (this folder is on sys.path when run)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--target-speedup", type=float, default=2.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--search-steps", type=int, default=0)
    parser.add_argument("--depth-only", type=int, help="also a full-width student of this many measured layers")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "search.log"
    inits = {"searched": out / "searched-init", "depth-15": out / "depth15-init"}
    if args.depth_only:
        inits[f"depth-{args.depth_only}"] = out / f"depth{args.depth_only}-init"
    if not inits["searched"].is_dir():
        run(ALAMBIC + ["init-student", "--teacher", args.teacher, "--out", str(inits["searched"]),
                       "--target-speedup", str(args.target_speedup), "--calibration-data", "bbc-news:train",
                       "--search-steps", str(args.search_steps), "--no-progress"], log)
    for depth in {15, args.depth_only} - {None}:
        if not inits[f"depth-{depth}"].is_dir():
            run(ALAMBIC + ["init-student", "--teacher", args.teacher, "--out", str(inits[f"depth-{depth}"]),
                           "--layers", "auto:influence", "--depth", str(depth), "--calibration-data", "bbc-news:train"],
                log)
    results = {"target_speedup": args.target_speedup, "max_steps": args.max_steps, "seeds": {}}
    for seed in args.seeds:
        folders = []
        for name, init in inits.items():
            folder = out / f"seed{seed}" / name
            if not (folder / "student").is_dir():
                run(ALAMBIC + ["distill", "--config", "configs/demo-lm.yaml", "--student", str(init), "--out",
                               str(folder), "--max-steps", str(args.max_steps), "--set", "loss.alpha_cos=0",
                               "--set", "student.layers=default", "--set", "student.save_init=false",
                               "--set", f"training.seed={seed}", "--set", f"training.save_every={args.max_steps}",
                               "--no-progress"], out / f"seed{seed}.log")
            folders.append(str(folder / "student"))
        report = out / f"seed{seed}" / ("report" if not args.depth_only else f"report-depth{args.depth_only}")
        if not (report / "report.json").is_file():
            run(ALAMBIC + ["report", args.teacher, *folders, "--lm-data", "bbc-news:heldout", "--max-tokens", "8192",
                           "--seq-lens", "128", "--batch-size", "8", "--names", "teacher," + ",".join(inits),
                           "--out", str(report), "--no-plots"], out / f"seed{seed}.log")
        data = json.loads((report / "report.json").read_text())
        results["seeds"][seed] = {
            m["name"]: {"perplexity": m["quality"]["value"], "parameters": m["parameters"]["total"],
                        "layers": m["layers"], "hidden": m["hidden_size"],
                        "speedup_b1": next((s["speedup"] for s in m["ratios"]["speed"] if s["batch_size"] == 1), None),
                        "speedup_b8": next((s["speedup"] for s in m["ratios"]["speed"] if s["batch_size"] == 8), None),
                        "tokens_per_s_b8": next(s["tokens_per_s"] for s in m["speed"] if s["batch_size"] == 8)}
            for m in data["models"]}
        name = "results.json" if not args.depth_only else f"results-depth{args.depth_only}.json"
        (out / name).write_text(json.dumps(results, indent=1))
    print("\n| student | layers x width | params (M) | speed-up b=1 x 128 (mean, min-max) | tokens/s b=8 x 128 | "
          "held-out perplexity (mean +- sd) |\n|---|---|---:|---:|---:|---:|")
    for name in ["teacher", *inits]:
        rows = [results["seeds"][s][name] for s in args.seeds]
        ppl = [r["perplexity"] for r in rows]
        speed = [r["speedup_b1"] for r in rows if r["speedup_b1"] is not None] or [1.0]
        sd = statistics.stdev(ppl) if len(ppl) > 1 else 0.0
        print(f"| {name} | {rows[0]['layers']} x {rows[0]['hidden']} | {rows[0]['parameters'] / 1e6:.1f} | "
              f"{statistics.mean(speed):.2f}x ({min(speed):.2f}-{max(speed):.2f}) | "
              f"{statistics.mean(r['tokens_per_s_b8'] for r in rows):.0f} | {statistics.mean(ppl):.1f} +- {sd:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
