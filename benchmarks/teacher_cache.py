"""Teacher logits computed once: wall time of prediction-layer task distillation with and without the cache.

A MiniLM-L6 classification teacher (the packaged encoder with a classification head; its speed does not depend on
how well it is trained) and a 3-layer student copied from it, distilled for ``--epochs`` epochs over ``--examples``
BBC News texts. Without the cache the teacher runs on every batch of every epoch; with it, only in the first epoch
(later epochs, later stages and other students on the same data read the stored rows). Both runs use the same
seed, so they see the same batches in the same order and end with the same student up to floating-point noise
(the largest parameter difference is reported).

    python benchmarks/teacher_cache.py                 # ~20 s on 2 quiet CPU cores, minutes when shared
    python benchmarks/teacher_cache.py --epochs 5 --examples 256 --json runs/teacher_cache.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=128, help="BBC News training texts")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="teacher-cache-"))
    os.environ["ALAMBIC_CACHE"] = str(work / "cache")  # a cold cache

    from alambic.workflows.distill_task import distill_task
    from alambic.recipes.task import TaskLossConfig
    from alambic.students import init_student, save_student
    from alambic.tasks import read_task_data
    from alambic.tasks.models import load_task_model
    from alambic.tasks.workflow import DataOptions, task_training_config

    sys.path.insert(0, str(Path(__file__).parent))
    from task_distillation import bbc_folder, write_jsonl

    examples = read_task_data("classification", bbc_folder())[:: 2127 // args.examples][: args.examples]
    write_jsonl(work / "train.jsonl", examples)
    labels = sorted({e.label for e in examples})
    torch.manual_seed(0)
    teacher, tokenizer, _ = load_task_model("minilm-l6", "classification", labels)
    save_student(teacher, tokenizer, work / "teacher")
    save_student(init_student(teacher, layers="0,2,4").model, tokenizer, work / "student")
    data = DataOptions(max_length=args.max_length, holdout_fraction=0.1)
    n_train = len(examples) - round(0.1 * len(examples))
    steps = args.epochs * -(-n_train // args.batch_size)
    results = {"examples": len(examples), "epochs": args.epochs, "steps": steps, "batch_size": args.batch_size,
               "max_length": args.max_length, "threads": torch.get_num_threads(), "load_average": os.getloadavg()}
    students = {}
    for cached in (False, True):
        name = "cached" if cached else "uncached"
        cfg = task_training_config("classification", max_steps=steps, batch_size=args.batch_size, eval_every=0,
                                   seed=0)
        started = time.perf_counter()
        summary = distill_task("classification", str(work / "teacher"), work / "train.jsonl", work / name,
                               student=str(work / "student"), loss=TaskLossConfig("kl", 2.0, 1.0, 0.0), training=cfg,
                               data=data, teacher_cache=cached, progress=False, log=lambda line: None)
        results[f"{name}_s"] = time.perf_counter() - started
        results[f"{name}_teacher_cache"] = summary["teacher_cache"]
        students[name] = load_task_model(work / name / "best", "classification", need_head=True)[0]
    results["speedup"] = results["uncached_s"] / results["cached_s"]
    # The cached rows are the teacher's own outputs, so both runs train the same student up to floating-point noise
    # (a recomputed forward may differ in the last bits, e.g. with MKL's alignment-dependent kernels).
    pairs = zip(students["uncached"].state_dict().values(), students["cached"].state_dict().values())
    results["max_parameter_difference"] = max(float((a.float() - b.float()).abs().max()) for a, b in pairs)
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
