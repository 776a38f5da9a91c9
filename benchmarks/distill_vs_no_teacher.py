"""Does the teacher help? The same student, data, steps and seed, trained with the triple loss vs next-token (or
masked-LM) cross-entropy alone, then both evaluated on the same held-out text; over seeds and layer choices.

    # SmolLM2-135M -> 15 layers on BBC News, every-other (first and last kept) and measured (auto:influence)
    python benchmarks/distill_vs_no_teacher.py --steps 25 --seeds 0 1 2 --layers auto:influence every-other

Results go to OUT/results.json, rewritten after every run (an interrupted benchmark continues where it stopped).

Choosing a setting (a learning rate, a loss) on the test would make the test figure a selected one. With
``--split validation`` the students train on 90% of the training documents and are scored on the other 10% (a stable
split by content hash, written to OUT/data); choose there, then report with the default ``--split test`` (all the
training documents, scored on ``bbc-news:heldout``):

    python benchmarks/distill_vs_no_teacher.py --steps 100 --seeds 0 --layers auto:influence --split validation \
        --lr 1e-3 --out runs/lm-validation-lr1e-3

A teacher adapted to the text first, then both students built from it. ``finetune --task lm`` holds out the same
10% of the documents as ``--split validation`` (one salted hash), so the teacher never trains on the validation part:

    alambic finetune --task lm --model smollm2-135m --train bbc-news:train --out runs/lm-adapt/teacher \
        --max-length 128 --max-steps 200
    python benchmarks/distill_vs_no_teacher.py --teacher runs/lm-adapt/teacher/best --steps 100 --seeds 0 \
        --layers auto:influence --variants triple --lr 1e-3 --out runs/lm-adapt/test-triple-1e-3-s0
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
from pathlib import Path

from alambic.config import load_config, parse_override
from alambic.data.pipeline import heldout_batches
from alambic.data.sources import hold_out_documents
from alambic.workflows.distill import distill
from alambic.evaluation.lm import evaluate_lm
from alambic.modeling import model_kind
from alambic.teachers import load_model

VARIANTS = {
    "triple": {"loss": {"alpha_kd": 5.0, "alpha_lm": 2.0, "alpha_cos": 1.0, "temperature": 2.0}},
    "triple-t1": {"loss": {"alpha_kd": 5.0, "alpha_lm": 2.0, "alpha_cos": 1.0, "temperature": 1.0}},
    "ce-only": {"loss": {"alpha_kd": 0.0, "alpha_lm": 1.0, "alpha_cos": 0.0}},
    "kl-t1": {"loss": {"alpha_kd": 1.0, "alpha_lm": 0.0, "alpha_cos": 0.0, "temperature": 1.0}},
    # TinyBERT's intermediate losses plus soft targets; the layer map pairs student and teacher layers
    "tinybert-uniform": {"recipe": "tinybert", "loss": {"layer_map": "uniform", "alpha_prediction": 1.0}},
    "tinybert-copied": {"recipe": "tinybert", "loss": {"layer_map": "copied", "alpha_prediction": 1.0}},
}
LABELS = {"triple": "triple loss (kd 5, lm 2, cos 1, T 2)", "triple-t1": "triple loss at T 1 (kd 5, lm 2, cos 1)",
          "ce-only": "next-token cross-entropy only (no teacher)",
          "kl-t1": "forward KL alone at T 1 (kd 1, lm 0, cos 0)",
          "tinybert-uniform": "TinyBERT (embedding, hidden, attention MSE + soft targets), layer map uniform",
          "tinybert-copied": "TinyBERT, layer map copied (each layer from the teacher layer it was copied from)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--layers", nargs="+", default=["auto:influence", "every-other"])
    parser.add_argument("--data", default="bbc-news:train")
    parser.add_argument("--eval-data", default="bbc-news:heldout")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--variants", nargs="+", default=["triple", "ce-only"], choices=list(VARIANTS))
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="a distill setting on top of each variant's (repeatable), e.g. loss.alpha_lm=5; the "
                             "runs are named VARIANT@KEY=VALUE")
    parser.add_argument("--split", default="test", choices=("test", "validation"),
                        help="test: train on --data, score on --eval-data (report); validation: train on 90%% of "
                             "--data, score on the other 10%% (choose settings)")
    parser.add_argument("--out", default="runs/distill-vs-no-teacher")
    args = parser.parse_args()
    out = Path(args.out)
    if args.split == "validation":
        (args.data,), (args.eval_data,) = hold_out_documents([args.data], out / "data")
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}

    def save():
        out.mkdir(parents=True, exist_ok=True)
        results_file.write_text(json.dumps(results, indent=2) + "\n")

    def common(layers, seed):
        return {"teacher": args.teacher, "student": {"layers": layers, "save_init": True},
                "data": {"train": [args.data], "max_length": args.max_length},
                "training": {"max_steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                             "save_every": args.steps, "log_every": 5, "seed": seed}}

    data_cfg = load_config(None, [common("every-other", 0), {"out": "x"}]).data
    data_cfg.max_length, data_cfg.eval_max_tokens = 256, args.eval_tokens
    held_out = {}

    def perplexity(path: str) -> float:
        model, tokenizer = load_model(path)
        if "batches" not in held_out:
            held_out["batches"] = heldout_batches([args.eval_data], tokenizer, model_kind(model), data_cfg)
        metrics = evaluate_lm(model, held_out["batches"])
        held_out["tokens"] = metrics["tokens"]
        return metrics["perplexity"]

    if "teacher" not in results:
        results["teacher"] = perplexity(args.teacher)
        save()
    for layers in args.layers:
        for seed in args.seeds:
            for variant in args.variants:
                loss = VARIANTS[variant]
                named = variant + "".join("@" + setting for setting in args.settings)
                key = f"{layers}/{named}/seed{seed}"
                if key in results:
                    continue
                run = out / key.replace(":", "-")
                cfg = load_config(None, [common(layers, seed), loss, *map(parse_override, args.settings),
                                        {"out": str(run)}])
                resume = (run / "checkpoints" / "latest").exists()
                if run.exists() and not resume:  # stopped before its first checkpoint: start it again
                    shutil.rmtree(run)
                result = distill(cfg, resume=resume, progress=False)
                init_key = f"{layers}/init/seed{seed}"
                if init_key not in results:
                    results[init_key] = perplexity(str(run / "student-init"))
                results[key] = perplexity(str(result.student_dir))
                save()
                print(f"{key}: held-out perplexity {results[key]:.2f}", flush=True)
    print(table(results, args))


def table(results: dict, args) -> str:
    lines = [f"teacher {args.teacher}: held-out perplexity {results['teacher']:.2f}", "",
             "| layers | student | held-out perplexity (mean ± sd over seeds) | n |", "| --- | --- | ---: | ---: |"]
    for layers in args.layers:
        means = {}
        named = {k.split("/")[1]: None for k in results if k.startswith(f"{layers}/") and "/init/" not in k}
        for variant in ("init", *named):  # each variant with its settings, in the order they ran
            values = [v for k, v in results.items() if k.startswith(f"{layers}/{variant}/seed")]
            if not values:
                continue
            logs = [math.log(v) for v in values]
            means[variant] = math.exp(statistics.mean(logs))
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            base, _, settings = variant.partition("@")
            label = LABELS.get(base, "at initialisation") + (f", {settings.replace('@', ', ')}" if settings else "")
            lines.append(f"| {layers} | {label} | {statistics.mean(values):,.1f} "
                         f"± {spread:,.1f} | {len(values)} |")
        for variant in means:
            if variant not in ("init", "ce-only") and "ce-only" in means:
                lines.append(f"| {layers} | ratio {variant} / no teacher (geometric means) | "
                             f"{means[variant] / means['ce-only']:.3f}x | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
