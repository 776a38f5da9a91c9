"""Shape search on real data: is the student alambic picks for a speed-up budget as good as a hand-picked one?

BBC News topic classification, the fine-tuned MiniLM-L6 teacher of ``make demo``, budget ``--target-speedup X`` at
batch 1 x 128 tokens (default 4):

1. ``alambic init-student --target-speedup X`` searches the shape (its candidate table goes to OUT/search.log);
2. the students, each distilled with ``alambic distill-task`` at the same steps, data, learning rate and seed:
   - ``searched``: the searched student (ranked as sliced);
   - ``searched stepsK`` (``--search-steps K``): searched with finalists ranked after K steps of distillation;
   - ``hand 4x192``: the hand-picked shape of ``make demo`` (layers 0,2,3,5, hidden 192, FFN 768);
   - ``depth-only``: the deepest full-width student (layers copied, linspace) that meets the budget, if any does;
3. per seed, ``alambic report`` measures every student against the teacher (interleaved timing, the paired speed-up
   with its interval) and its accuracy on ``bbc-news:heldout`` (the test split; the best checkpoint is selected on
   the validation split held out of train).

    python benchmarks/shape_search.py --teacher runs/search-bench/teacher/best --out runs/search-bench

The teacher comes from ``alambic finetune --task classification --model minilm-l6 --train bbc-news:train
--max-length 64 --max-steps 200 --eval-every 50 --out runs/search-bench/teacher`` (as ``make demo``).
Prints the table of docs/benchmarks.md; OUT/results.json holds every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ALAMBIC = [sys.executable, "-m", "alambic"]
HAND = ["--student-layers", "0,2,3,5", "--hidden-size", "192", "--intermediate-size", "768"]


def run(argv: list[str], log: Path) -> None:
    print("$ alambic " + " ".join(argv[3:]), flush=True)
    with open(log, "a", encoding="utf-8") as handle:
        handle.write("$ alambic " + " ".join(argv[3:]) + "\n")
        handle.flush()
        subprocess.run(argv, check=True, stdout=handle, stderr=subprocess.STDOUT)


def depth_only(teacher: str, speedup: float, seq_len: int) -> int | None:
    """The deepest full-width student (linspace layers) that meets the budget, timed interleaved with the teacher."""
    from alambic.search import Budget
    from alambic.search.shapes import instantiate, shape_config, teacher_shape
    from alambic.search.timing import time_against_teacher
    from alambic.tasks.models import load_task_model

    model = load_task_model(teacher, "classification", need_head=True)[0].eval()
    full = teacher_shape(model.config)
    budget = Budget(speedup=speedup, seq_len=seq_len)
    for depth in range(full.depth - 1, 0, -1):
        shape = type(full)(depth, full.hidden, full.ffn, full.heads, full.kv_heads)
        timing = time_against_teacher(model, instantiate(model, shape_config(model.config, shape)), budget)
        print(f"depth-only {depth} layers: {timing['speedup']:.2f}x +-{timing['notch']:.2f}", flush=True)
        if timing["speedup"] >= speedup:
            return depth
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--target-speedup", type=float, default=4.0)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--search-steps", type=int, default=0,
                        help="also a student searched with --search-steps K (16384 calibration tokens)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "search.log"
    searched = out / "searched-init"
    if not searched.is_dir():
        run(ALAMBIC + ["init-student", "--teacher", args.teacher, "--out", str(searched), "--target-speedup",
                       str(args.target_speedup), "--budget-seq-len", str(args.seq_len), "--calibration-data",
                       "bbc-news:train", "--max-length", "64", "--no-progress"], log)
    students = {"searched": ["--student", str(searched)]}
    if args.search_steps:
        trained = out / f"searched-steps{args.search_steps}-init"
        if not trained.is_dir():
            run(ALAMBIC + ["init-student", "--teacher", args.teacher, "--out", str(trained), "--target-speedup",
                           str(args.target_speedup), "--budget-seq-len", str(args.seq_len), "--calibration-data",
                           "bbc-news:train", "--max-length", "64", "--calibration-tokens", "16384",
                           "--search-steps", str(args.search_steps), "--no-progress"], log)
        students[f"searched steps{args.search_steps}"] = ["--student", str(trained)]
    students["hand 4x192"] = HAND
    depth = depth_only(args.teacher, args.target_speedup, args.seq_len)
    if depth is not None:
        students["depth-only"] = ["--student-layers", f"linspace:{depth}"]
    common = ["--task", "classification", "--teacher", args.teacher, "--train", "bbc-news:train", "--max-length",
              "64", "--max-steps", str(args.max_steps), "--eval-every", "50", "--lr", "3e-4", "--no-progress"]
    results = {"target_speedup": args.target_speedup, "depth_only_layers": depth, "seeds": {}}
    for seed in args.seeds:
        folders = []
        for name, how in students.items():
            folder = out / f"seed{seed}" / name.replace(" ", "-")
            if not (folder / "best").is_dir():
                run(ALAMBIC + ["distill-task", *common, *how, "--seed", str(seed), "--out", str(folder)],
                    out / f"seed{seed}.log")
            folders.append(str(folder / "best"))
        report = out / f"seed{seed}" / "report"
        names = ["teacher", *[n.replace(" ", "-") for n in students]]
        if (report / "report.json").is_file() and \
                [m["name"] for m in json.loads((report / "report.json").read_text())["models"]] != names:
            (report / "report.json").unlink()  # a report of another set of students: measure them all again
        if not (report / "report.json").is_file():
            run(ALAMBIC + ["report", args.teacher, *folders, "--task", "classification", "--data",
                           "bbc-news:heldout", "--max-length", "64", "--seq-lens", str(args.seq_len),
                           "--names", ",".join(names),
                           "--out", str(report), "--no-plots"], out / f"seed{seed}.log")
        data = json.loads((report / "report.json").read_text())
        results["seeds"][seed] = {
            m["name"]: {"accuracy": m["quality"]["value"], "parameters": m["parameters"]["total"],
                        "speedup_b1": next((s["speedup"] for s in m["ratios"]["speed"]
                                            if s["batch_size"] == 1), None),
                        "notch_b1": next((s["notch"] for s in m["ratios"]["speed"] if s["batch_size"] == 1), None)}
            for m in data["models"]}
        (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\n| student | params (M) | speed-up b=1 x {args.seq_len} (mean, min-max over reports) | budget met | "
          "test accuracy (mean +- sd) |\n|---|---:|---:|---|---:|")
    for name in ["teacher", *[n.replace(" ", "-") for n in students]]:
        rows = [results["seeds"][s][name] for s in args.seeds]
        acc = [100 * r["accuracy"] for r in rows]
        speed = [r["speedup_b1"] for r in rows if r["speedup_b1"] is not None]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        shown = f"{statistics.mean(speed):.2f}x ({min(speed):.2f}-{max(speed):.2f})" if speed else "1.00x"
        met = "-" if name == "teacher" else ("yes" if statistics.mean(speed) >= args.target_speedup * 0.95 else "no")
        print(f"| {name} | {rows[0]['parameters'] / 1e6:.2f} | {shown} | {met} | {statistics.mean(acc):.2f} +- "
              f"{sd:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
