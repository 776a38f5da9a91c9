"""Which teacher layers should a shallower student keep? every-other vs measured selection (influence, greedy).

For each method: the time the selection takes, the calibration loss of the chosen layers, held-out quality of the
student at initialisation and after the same short distillation (same seed, data, steps and batch).

    python benchmarks/layer_selection.py --teacher smollm2-135m --depth 15 --calibration-tokens 512 \
        --heldout-tokens 2048 --budget 300 --max-steps 5 --out runs/layer-selection/smol
    python benchmarks/layer_selection.py --teacher minilm-l6 --depth 3 --calibration-tokens 4096 \
        --heldout-tokens 8192 --max-steps 30 --out runs/layer-selection/minilm --set loss.alpha_kd=0

Decoders are scored by held-out perplexity; encoders without an MLM head (MiniLM) by the hidden-state distance to
the teacher (mean 1 - cos of final hidden states over non-pad held-out tokens, unmasked text), the criterion the
selection itself uses. Results go to OUT/results.json (rewritten after each phase) and are printed as a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def hidden_distance(student, teacher, batches) -> float:
    """Mean 1 - cos between the student's and the teacher's final hidden states over non-pad tokens, unmasked."""
    from alambic.modeling import lm_body

    total, count = 0.0, 0
    with torch.inference_mode():
        for b in batches:
            ids = b["input_ids"].flatten().index_put((b["lm_positions"],), b["lm_targets"]).view_as(b["input_ids"])
            rows = []
            for model in (student, teacher):
                h = lm_body(model)(input_ids=ids, attention_mask=b["attention_mask"]).last_hidden_state
                rows.append(h.flatten(0, 1).index_select(0, b["token_positions"]).float())
            total += (1 - torch.nn.functional.cosine_similarity(rows[0], rows[1], dim=-1)).sum().item()
            count += len(rows[0])
    return total / count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--depth", type=int, required=True)
    p.add_argument("--calibration", default="bbc-news:train")
    p.add_argument("--heldout", default="bbc-news:heldout")
    p.add_argument("--calibration-tokens", type=int, default=2048)
    p.add_argument("--heldout-tokens", type=int, default=4096)
    p.add_argument("--budget", type=float, default=None, help="greedy search budget in seconds")
    p.add_argument("--max-steps", type=int, default=60, help="distillation steps per method (0: selection only)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="+", default=["every-other", "influence", "greedy"])
    p.add_argument("--set", dest="overrides", action="append", default=[], help="extra distill options")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    import transformers

    transformers.logging.set_verbosity_error()
    from alambic.config import DataConfig, load_config, parse_override
    from alambic.data.pipeline import heldout_batches
    from alambic.workflows.distill import distill
    from alambic.evaluation.lm import evaluate_lm
    from alambic.modeling import has_lm_head, model_kind
    from alambic.students import init_student, save_student
    from alambic.students.selection import _Runner, calibration_batches
    from alambic.teachers import load_teacher

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"args": vars(args), "threads": torch.get_num_threads(), "methods": {}}

    def dump():
        (out / "results.json").write_text(json.dumps(results, indent=1))

    teacher, tokenizer = load_teacher(args.teacher)
    kind = model_kind(teacher)
    decoder_metric = has_lm_head(teacher)
    data_cfg = DataConfig(train=[args.heldout], max_length=args.max_length, eval_max_tokens=args.heldout_tokens)
    held = heldout_batches([args.heldout], tokenizer, kind, data_cfg, 8)
    calib = calibration_batches(args.calibration, tokenizer, kind, max_tokens=args.calibration_tokens,
                                max_length=args.max_length, seed=args.seed)

    calibration_runner = _Runner(teacher, calib, "lm" if decoder_metric else "hidden")
    if not decoder_metric:
        calibration_runner.set_hidden_targets()

    def quality(model):
        if decoder_metric:
            return evaluate_lm(model, held)
        return {"hidden_distance": hidden_distance(model, teacher, held)}

    start = time.perf_counter()
    results["teacher"] = quality(teacher) if decoder_metric else {"hidden_distance": 0.0}
    results["teacher"]["eval_seconds"] = time.perf_counter() - start
    print("teacher", results["teacher"], flush=True)
    dump()

    # phase 1: selection and quality at initialisation
    for method in args.methods:
        start = time.perf_counter()
        spec = method if method in ("every-other",) else f"auto:{method}"
        extra = {} if method == "every-other" else dict(
            depth=args.depth, calibration_data=calib, selection_budget=args.budget if method == "greedy" else None,
            log=lambda line: print(line, flush=True))
        built = init_student(teacher, layers=spec, seed=args.seed, tokenizer=tokenizer, **extra)
        seconds = time.perf_counter() - start
        row = {"layers": built.layers, "select_seconds": seconds}
        if built.selection is not None:
            sel = built.selection
            sel.calibration = args.calibration
            row.update(calibration_loss=sel.loss, teacher_calibration_loss=sel.teacher_loss,
                       candidates=sel.candidates_evaluated, fell_back=sel.fell_back, notes=sel.notes,
                       calibration_tokens=sel.tokens)
        else:
            row["calibration_loss"] = calibration_runner.run(built.layers)[0]
        row["init"] = quality(built.model)
        print(method, row, flush=True)
        save_student(built.model, tokenizer, out / f"{method}-init", overwrite=True, card=built.model_card(args.teacher))
        results["methods"][method] = row
        dump()
        del built

    # phase 2: the same short distillation from each initialisation
    for method in args.methods if args.max_steps > 0 else []:
        run = out / f"{method}-run"
        overrides = [{"teacher": args.teacher, "out": str(run), "student": {"init": str(out / f"{method}-init")},
                      "data": {"train": [args.calibration], "max_length": args.max_length},
                      "training": {"max_steps": args.max_steps, "batch_size": args.batch_size, "seed": args.seed,
                                   "save_every": 10**6, "log_every": max(1, args.max_steps // 6)}}]
        overrides += [parse_override(text) for text in args.overrides]
        cfg = load_config(None, overrides)
        start = time.perf_counter()
        distill(cfg, resume=(run / "checkpoints").exists(), progress=False)
        row = results["methods"][method]
        row["distill_seconds"] = time.perf_counter() - start
        auto = transformers.AutoModelForCausalLM if kind == "causal" else transformers.AutoModelForMaskedLM
        student = auto.from_pretrained(run / "student").eval()
        row["trained"] = quality(student)
        if not decoder_metric:
            row["trained"]["masked_lm"] = evaluate_lm(student, held)
        print(method, "after", args.max_steps, "steps", row["trained"], flush=True)
        dump()

    key = "perplexity" if decoder_metric else "hidden_distance"
    print(f"\n| method | layers kept | selection time (s) | calibration loss | {key} at init | {key} after {args.max_steps} steps |")
    for method, row in results["methods"].items():
        print(f"| {method} | {','.join(map(str, row['layers']))} | {row['select_seconds']:.1f} | "
              f"{row.get('calibration_loss', float('nan')):.4g} | {row['init'][key]:.4g} | "
              f"{row.get('trained', {}).get(key, float('nan')):.4g} |")


if __name__ == "__main__":
    main()
