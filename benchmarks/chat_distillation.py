"""Distilling an instruct model on a task with gold answers: BBC topic questions and headlines.

Each BBC article gives two chat examples: "which topic?" answered with the topic word (with the five options, for
accuracy by option likelihood), and "write a headline" answered with the article's real headline (its first line).
Training and validation come from bbc-news:train (a stable 10% by content hash is validation), the test from
bbc-news:heldout. Every stage runs the `alambic` command as a user would:

1. teacher: `alambic finetune --task chat` of SmolLM2-135M-Instruct on the gold answers;
   (or --teacher-run: a finished one, e.g. another OUT's, so students of other shapes meet the same teacher);
2. student: `alambic init-student` from that teacher (alambic's default: measured layers, half the depth; another
   depth with --student-depth, a narrower feed-forward with --student-intermediate-size);
3. variants, each at equal steps and data, over seeds:
   (a) sft-gold: no teacher, SFT of the student on the gold answers;
   (b) sft-teacher: SFT on the teacher's answers (`alambic generate`, sequence-level KD);
   (c) forward-kl, and (d) the other divergences: `alambic distill` on the gold conversations;
   (e) gkd: on-policy / mixed (on_policy.lmbda);
   (f) the student before training;
4. `alambic eval-chat` of every model on the test (the validation data with --split validation) against the teacher.

    python benchmarks/chat_distillation.py --out runs/chat-bench --teacher-steps 150 --steps 40 --seeds 0 1 2

Results go to OUT/results.json, rewritten after every stage (an interrupted benchmark continues where it stopped),
each with the CPU seconds its command took; `--table` prints the summary table from it.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

TOPICS = ("business", "entertainment", "politics", "sports", "tech")  # the corpus's folder names
VARIANTS = {
    "sft-gold": "(a) no teacher: SFT on the gold answers",
    "sft-teacher": "(b) SFT on the teacher's answers (sequence-level KD)",
    "forward-kl": "(c) forward KL",
    "forward-kl-all": "(c) forward KL, soft targets on every token (prompt included)",
    "kd-teacher": "(b + c) forward KL on the teacher's answers",
    "reverse-kl": "(d) reverse KL",
    "jsd": "(d) JSD (beta 0.5)",
    "skew-kl": "(d) skew KL (alpha 0.1)",
    "gkd": "(e) GKD: on-policy lmbda 0.5, JSD",
}
DIVERGENCE = {"forward-kl": "forward_kl", "forward-kl-all": "forward_kl", "kd-teacher": "forward_kl",
              "reverse-kl": "reverse_kl", "jsd": "jsd", "skew-kl": "skew_kl", "gkd": "jsd"}
SETTINGS = {"forward-kl-all": ["loss.kd_rows=tokens"], "gkd": ["on_policy.lmbda=0.5", "on_policy.max_new_tokens=24"]}


def machine() -> str:
    from alambic.evaluation.speed import cpu_name

    return f"{cpu_name()}, {os.cpu_count()} cores"


def build_data(out: Path, words: int) -> None:
    """train / validation / test chat files (topic and headline questions with gold answers) and the train prompts."""
    from alambic.data.sources import is_heldout, packaged_labelled_texts

    def records(spec):
        for text, topic in packaged_labelled_texts(spec):
            headline, _, body = text.partition("\n")
            body = " ".join(body.split()[:words])
            options = ", ".join(TOPICS)
            yield {"messages": [{"role": "user", "content": f"Which topic is this article about? Answer with one "
                                                           f"word: {options}.\n\n{body}"},
                                {"role": "assistant", "content": topic}], "options": list(TOPICS)}
            yield {"messages": [{"role": "user", "content": f"Write a headline for this article.\n\n{body}"},
                                {"role": "assistant", "content": headline.strip()}]}

    def write(name, rows):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    out.mkdir(parents=True, exist_ok=True)
    train = list(records("bbc-news:train"))
    validation = [r for r in train if is_heldout(r["messages"][0]["content"] + "v")]
    train = [r for r in train if not is_heldout(r["messages"][0]["content"] + "v")]
    write("train", train)
    write("validation", validation)
    write("validation-small", validation[:60])  # selection during training: evaluating costs a teacher forward
    test = list(records("bbc-news:heldout"))
    write("test", test)
    write("train-prompts", ({"messages": r["messages"][:1]} for r in train))


def headline_file(data: Path, split: str, examples: int) -> Path:
    """The headline questions among the first ``examples`` records of the split, written for this evaluation (the
    file always matches ``--eval-examples``)."""
    path, partial = data / f"{split}-headlines.jsonl", data / f"{split}-headlines.{os.getpid()}.partial"
    rows = [json.loads(line) for line in (data / f"{split}.jsonl").read_text().splitlines()[:examples]]
    partial.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows if "options" not in r))
    os.replace(partial, path)  # runs sharing OUT may evaluate side by side: none reads a half-written file
    return path


def run(command: list[str]) -> float:
    """Run an alambic command; returns its CPU seconds (user + system of the child)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def alambic(*args) -> list[str]:
    return [sys.executable, "-m", "alambic", *map(str, args)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/chat-bench")
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--teacher-steps", type=int, default=150)
    parser.add_argument("--teacher-run", type=Path,
                        help="a finished `alambic finetune --task chat` run (e.g. OTHER_OUT/teacher) to distil from "
                             "instead of fine-tuning a teacher in OUT/teacher")
    parser.add_argument("--student-depth", type=int,
                        help="layers the student keeps (init-student --depth; default: half the teacher's)")
    parser.add_argument("--student-intermediate-size", type=int,
                        help="the student's feed-forward width, its neurons sliced from the teacher's by measured "
                             "importance (init-student --intermediate-size; default: the teacher's)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--student-lr", type=float,
                        help="the students' learning rate (default: --lr); runs at another lr are named VARIANT@lrX")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="a distill setting for the distillation variants (repeatable); their runs are named "
                             "VARIANT@KEY=VALUE")
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--words", type=int, default=60, help="words of each article in the prompt")
    parser.add_argument("--eval-examples", type=int, default=120)
    parser.add_argument("--split", default="test", choices=("test", "validation"),
                        help="evaluate on the test (report) or the validation data (choose defaults)")
    parser.add_argument("--table", action="store_true", help="print the table of OUT/results.json and exit")
    parser.add_argument("--data-only", action="store_true", help="write OUT/data/*.jsonl and exit")
    parser.add_argument("--train-only", action="store_true",
                        help="train the variants and exit (several such runs may share OUT, one per core)")
    args = parser.parse_args()
    if args.teacher_run is not None and not (args.teacher_run / "best" / "config.json").is_file():
        parser.error(f"--teacher-run {args.teacher_run} holds no finished teacher (no best/config.json): give the "
                     "folder an `alambic finetune --task chat` run wrote")
    out = Path(args.out)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    if args.table:
        print_table(results)
        return

    def save():  # merged with what other runs on the same OUT wrote meanwhile, under a lock
        with open(out / "results.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            on_disk = json.loads(results_file.read_text()) if results_file.is_file() else {}
            for key, value in on_disk.items():
                results[key] = ({**value, **results.get(key, {})} if isinstance(value, dict)
                                else results.get(key, value))
            results_file.write_text(json.dumps(results, indent=2) + "\n")

    results["machine"] = machine()
    data = out / "data"
    if not (data / "test.jsonl").exists():
        build_data(data, args.words)
    if args.data_only:
        print(f"chat data written to {data}: train.jsonl, validation.jsonl, validation-small.jsonl, test.jsonl, "
              "train-prompts.jsonl")
        return
    teacher = args.teacher_run or out / "teacher"
    if args.teacher_run is None and "teacher" not in results.get("train", {}):
        cpu = run(alambic("finetune", "--task", "chat", "--model", args.teacher, "--train", data / "train.jsonl",
                          "--validation", data / "validation-small.jsonl", "--out", teacher, "--max-steps",
                          args.teacher_steps, "--eval-every", max(10, args.teacher_steps // 5), "--batch-size",
                          args.batch_size, "--lr", args.lr, "--max-length", args.max_length, "--no-progress"))
        results.setdefault("train", {})["teacher"] = {"cpu_s": cpu}
        save()
    student_init = out / "student-init"
    if not (student_init / "config.json").exists():
        shape = [] if args.student_depth is None else ["--depth", args.student_depth]
        if args.student_intermediate_size is not None:
            shape += ["--intermediate-size", args.student_intermediate_size]
        run(alambic("init-student", "--teacher", teacher, "--calibration-data", data / "train.jsonl",
                    "--out", student_init, *shape))
    needed_prompts = args.steps * args.batch_size
    teacher_data = out / "teacher-answers"
    if {"sft-teacher", "kd-teacher"} & set(args.variants) and "teacher-answers" not in results.get("train", {}):
        cpu = run(alambic("generate", "--teacher", teacher, "--prompts", data / "train-prompts.jsonl", "--out",
                          teacher_data, "--max-prompts", needed_prompts, "--max-new-tokens", 32,
                          "--temperature", 0, "--batch-size", 16, "--no-progress"))
        results.setdefault("train", {})["teacher-answers"] = {"cpu_s": cpu}
        save()

    student_lr = args.student_lr or args.lr
    common = ["--max-steps", args.steps, "--batch-size", args.batch_size, "--lr", student_lr, "--max-length",
              args.max_length, "--no-progress"]
    names = []  # the students this call trains and evaluates
    for variant in args.variants:
        for seed in args.seeds:
            distilled = not variant.startswith("sft")
            tags = ([] if student_lr == args.lr else [f"lr{student_lr:g}"]) + (args.settings if distilled else [])
            name = f"{variant}{''.join('@' + t for t in tags)}-s{seed}"
            names.append(name)
            if name in results.get("train", {}):
                continue
            folder = out / name
            if variant.startswith("sft"):
                train = data / "train.jsonl" if variant == "sft-gold" else teacher_data / "data.jsonl"
                command = alambic("finetune", "--task", "chat", "--model", student_init, "--train", train,
                                  "--validation", data / "validation-small.jsonl", "--out", folder, "--seed", seed,
                                  "--eval-every", args.steps, *common)
            else:
                train = teacher_data / "data.jsonl" if variant == "kd-teacher" else data / "train.jsonl"
                command = alambic("distill", "--teacher", teacher, "--student", student_init, "--data",
                                  train, "--out", folder, "--divergence", DIVERGENCE[variant],
                                  "--set", f"training.seed={seed}", *common)
                for setting in SETTINGS.get(variant, []) + args.settings:
                    command += ["--set", setting]
            start = time.time()
            cpu = run(command)
            results.setdefault("train", {})[name] = {"cpu_s": cpu, "wall_s": time.time() - start}
            save()
    if args.train_only:
        return

    evaluated = results.setdefault(f"eval-{args.split}", {})
    models = {"teacher": teacher / "best", "student-init": student_init}
    for name in names:
        folder = out / name
        models[name] = folder / "best" if (folder / "best").exists() else folder / "student"
    pending = {n: m for n, m in models.items() if n not in evaluated}
    if pending:
        report = out / f"eval-{args.split}-{os.getpid()}.json"  # runs sharing OUT evaluate side by side
        cpu = run(alambic("eval-chat", *pending.values(), "--names", ",".join(pending), "--data",
                          data / f"{args.split}.jsonl", "--teacher", teacher / "best", "--max-new-tokens", 24,
                          "--max-examples", args.eval_examples, "--json", "--out", report))
        rows = json.loads(report.read_text())
        for row in rows if isinstance(rows, list) else rows["models"]:
            evaluated[row["model"]] = row
        results[f"eval-{args.split}-cpu_s"] = cpu
        save()
    # headline ROUGE-L alone (the mixed rouge_l also counts the one-word topic answers)
    headlines = results.setdefault(f"eval-{args.split}-headlines", {})
    pending = {n: m for n, m in models.items() if n not in headlines and n != "student-init"}
    if pending:
        report = out / f"eval-{args.split}-headlines-{os.getpid()}.json"
        run(alambic("eval-chat", *pending.values(), "--names", ",".join(pending), "--data",
                    headline_file(data, args.split, args.eval_examples), "--max-new-tokens", 24, "--json", "--out",
                    report))
        for row in json.loads(report.read_text()):
            headlines[row["model"]] = row
        save()
    print_table(results)


def print_table(results: dict) -> None:
    """Mean +- standard deviation over seeds of each variant's metrics."""
    for split in ("eval-test", "eval-test-headlines", "eval-validation", "eval-validation-headlines"):
        rows = results.get(split)
        if not rows:
            continue
        metrics = [k for k, v in next(iter(rows.values())).items() if isinstance(v, (int, float))
                   and k not in ("parameters",)]
        print(f"\n{split} ({results.get('machine', '')})")
        print("| model | " + " | ".join(metrics) + " | train CPU s |")
        print("|---" * (len(metrics) + 2) + "|")
        groups: dict[str, list[str]] = {}
        for name in rows:
            groups.setdefault(name.rsplit("-s", 1)[0] if "-s" in name else name, []).append(name)
        for group, names in groups.items():
            cells = []
            for metric in metrics:
                values = [rows[n][metric] for n in names if rows[n].get(metric) is not None]
                if not values:
                    cells.append("")
                elif len(values) == 1:
                    cells.append(f"{values[0]:.4g}")
                else:
                    cells.append(f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}")
            cpu = [results.get("train", {}).get(n, {}).get("cpu_s") for n in names]
            cpu = [c for c in cpu if c]
            cells.append(f"{statistics.mean(cpu):.0f}" if cpu else "")
            variant, *tags = group.split("@")  # VARIANT@lrX@KEY=VALUE...
            label = VARIANTS.get(variant, variant) + "".join(
                f", lr {tag[2:]}" if tag.startswith("lr") else f", {tag}" for tag in tags)
            print(f"| {label} (n={len(names)}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
