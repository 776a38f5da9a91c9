"""Does TinyBERT's data augmentation help task distillation when labelled data is scarce?

Uses the teacher and the initial students of ``benchmarks/task_distillation.py`` (BBC News, MiniLM-L6 teacher
fine-tuned to 97% test accuracy), so run that first. Then:
1. a small training set: ``--per-class`` examples of each of the 5 topics (seeded), and a fixed validation set
   (a seeded stratified share of the other training texts) for choosing the best checkpoint;
2. the small set augmented by ``alambic.tasks.augment`` (``--copies`` copies, p = 0.4, K = 15, substitutes from
   ``--augment-model``: minilm-l6 has no MLM head, so embedding neighbours);
3. per student: prediction-layer distillation (KL x T^2 on the teacher's logits) on the small set and on the
   augmented set, same steps, seed and learning rate; test accuracy of each.

    python benchmarks/augmentation.py --from runs/bench-task --out runs/bench-augment
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from alambic.workflows.distill_task import distill_task  # noqa: E402
from alambic.recipes.task import TaskLossConfig  # noqa: E402
from alambic.tasks import holdout_split, read_task_data  # noqa: E402
from alambic.tasks.augment import AugmentConfig, Substitutes, augment_examples, write_examples  # noqa: E402
from alambic.tasks.workflow import DataOptions, evaluate_models, task_training_config  # noqa: E402
from alambic.teachers import load_model  # noqa: E402

LEARNING_RATES = {"copy3": 1e-4, "narrow4x192": 5e-4}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", default="runs/bench-task", help="task_distillation.py's --out")
    parser.add_argument("--out", default="runs/bench-augment")
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--validation-fraction", type=float, default=0.1)
    parser.add_argument("--copies", type=int, default=20)
    parser.add_argument("--augment-model", default="minilm-l6")
    parser.add_argument("--students", nargs="+", default=["narrow4x192", "copy3"], choices=sorted(LEARNING_RATES))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    source, out = Path(args.source), Path(args.out)
    teacher = source / "teacher" / "best"
    if not (teacher / "config.json").is_file():
        sys.exit(f"no teacher in {teacher}: run benchmarks/task_distillation.py --out {source} first")

    def log(line):
        print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)

    # 1. small train set and a fixed validation set
    pool = read_task_data("classification", source / "data" / "train.jsonl")
    rest, validation = holdout_split("classification", pool, args.validation_fraction, seed=1)
    rng = random.Random(args.seed)
    small = []
    for label in sorted({e.label for e in rest}):
        small += rng.sample([e for e in rest if e.label == label], args.per_class)
    write_examples("classification", small, out / "small.jsonl")
    write_examples("classification", validation, out / "validation.jsonl")

    # 2. augmentation
    started = time.perf_counter()
    model, tokenizer = load_model(args.augment_model)
    substitutes = Substitutes(model, tokenizer, k=15)
    augmented = augment_examples("classification", small, substitutes, AugmentConfig(copies=args.copies, seed=args.seed))
    write_examples("classification", augmented, out / "augmented.jsonl")
    augment_s = time.perf_counter() - started
    log(f"{len(small)} examples -> {len(augmented)} augmented in {augment_s:.1f} s "
        f"({'MLM + embeddings' if substitutes.uses_mlm else 'embedding neighbours'} of {args.augment_model})")

    # 3. distillation on each set
    data = DataOptions(max_length=args.max_length)
    results = {"args": vars(args), "small": len(small), "augmented": len(augmented), "validation": len(validation),
               "augment_s": augment_s, "runs": {}}
    for student in args.students:
        for name in ("small", "augmented"):
            run = f"{student}/{name}"
            training = task_training_config("classification", max_steps=args.steps, batch_size=args.batch_size,
                                            lr=LEARNING_RATES[student], eval_every=25, seed=args.seed)
            started = time.perf_counter()
            distill_task("classification", str(teacher), out / f"{name}.jsonl", out / run,
                         student=str(source / "init" / student), validation=out / "validation.jsonl", stages="pred",
                         loss=TaskLossConfig("kl", 2.0, 1.0, 0.0), training=training, data=data, progress=False,
                         log=log)
            row = evaluate_models("classification", [str(out / run / "best")], source / "data" / "test.jsonl", data)[0]
            row["train_s"] = time.perf_counter() - started
            results["runs"][run] = row
            (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
            log(f"{run}: test accuracy {row['accuracy']:.4f}, macro-F1 {row['macro_f1']:.4f}")
    print(f"{'student / training data':<28}{'test accuracy':>14}{'macro-F1':>10}")
    for run, row in results["runs"].items():
        print(f"{run:<28}{row['accuracy']:>14.4f}{row['macro_f1']:>10.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
