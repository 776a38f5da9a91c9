"""Does the teacher help? The same student, data, steps and seed, trained with the triple loss vs next-token (or
masked-LM) cross-entropy alone, then both evaluated on the same held-out text.

    python benchmarks/distill_vs_no_teacher.py --steps 150      # SmolLM2-135M -> 15 layers on BBC News (CPU: ~25 min)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from alambic.config import load_config
from alambic.data.pipeline import heldout_batches
from alambic.distill import distill
from alambic.evaluation.lm import evaluate_lm
from alambic.modeling import model_kind
from alambic.teachers import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--layers", default="every-other")
    parser.add_argument("--data", default="bbc-news:train")
    parser.add_argument("--eval-data", default="bbc-news:heldout")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--out", default="runs/distill-vs-no-teacher")
    args = parser.parse_args()

    common = {"teacher": args.teacher, "student": {"layers": args.layers, "save_init": True},
              "data": {"train": [args.data], "max_length": args.max_length},
              "training": {"max_steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                           "save_every": args.steps, "log_every": 10, "seed": 0}}
    variants = {
        "triple loss (kd 5, lm 2, cos 1, T 2)": {"loss": {"alpha_kd": 5.0, "alpha_lm": 2.0, "alpha_cos": 1.0}},
        "cross-entropy only (no teacher)": {"loss": {"alpha_kd": 0.0, "alpha_lm": 1.0, "alpha_cos": 0.0}},
    }
    results = {}
    for i, (name, loss) in enumerate(variants.items()):
        out = Path(args.out) / f"variant-{i}"
        cfg = load_config(None, [common, loss, {"out": str(out)}])
        result = distill(cfg, resume=(out / "checkpoints" / "latest").exists())
        results[name] = {"dir": result.student_dir, "init": out / "student-init"}

    data_cfg = load_config(None, [common, {"out": "x"}]).data
    data_cfg.max_length, data_cfg.eval_max_tokens = 256, args.eval_tokens
    rows = []
    for label, path in [("teacher", args.teacher), ("student at init", str(results[next(iter(results))]["init"]))] + [
        (name, str(r["dir"])) for name, r in results.items()
    ]:
        model, tokenizer = load_model(path)
        metrics = evaluate_lm(model, heldout_batches([args.eval_data], tokenizer, model_kind(model), data_cfg))
        rows.append({"model": label, **metrics})
    print(f"held-out: {args.eval_data}, {rows[0]['tokens']} tokens in 256-token blocks; "
          f"{args.steps} steps x {args.batch_size} x {args.max_length} tokens, seed 0")
    for row in rows:
        print(f"{row['model']:<40} perplexity {row['perplexity']:>12.2f}")
    Path(args.out, "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
