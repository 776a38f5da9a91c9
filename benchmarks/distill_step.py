"""Tokens/s and peak memory of one distillation step: alambic's step vs a naive step, measured in the same run.

    python benchmarks/distill_step.py                        # SmolLM2-135M -> 15 layers, batch 4 x 128, on this machine
    python benchmarks/distill_step.py --teacher minilm-l6 --kind masked ...

alambic's step: teacher under inference_mode, vocabulary projection only on the rows a loss reads, losses normalised
by host-side counts (no device synchronisation). The naive step, as a straightforward script writes it: teacher forward
with autograd on, full ``model(...).logits`` for teacher and student, KL with ``F.kl_div`` over every position of the
[B, L, V] logits, cross-entropy through ``labels=``. Both run the same batches of real text with the same student.
Each variant runs in its own process so its peak resident memory is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), {gpu}"


def build(args):
    from alambic.config import DataConfig
    from alambic.data.pipeline import training_batches
    from alambic.modeling import model_kind
    from alambic.recipes.distilbert import DistilBERTLossConfig, DistilBERTRecipe
    from alambic.students import init_student
    from alambic.teachers import load_teacher

    teacher, tokenizer = load_teacher(args.teacher)
    kind = model_kind(teacher)
    student = init_student(teacher, layers=args.layers).model.train()
    loss = DistilBERTLossConfig(alpha_kd=5.0, alpha_lm=2.0, alpha_cos=1.0, temperature=2.0)
    data = DataConfig(train=[args.data], max_length=args.seq_len)
    batches = training_batches([args.data], tokenizer, kind, data, loss, args.batch_size, seed=0)
    return DistilBERTRecipe(teacher, student, loss), batches, kind


def alambic_step(recipe, batch, optimizer):
    counts = {k: torch.tensor(float(v)) for k, v in recipe.row_counts(batch).items()}
    targets = recipe.teacher_targets(batch)
    loss, _ = recipe.objective(batch, targets, counts)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def naive_step(recipe, batch, optimizer, kind):
    cfg, teacher, student = recipe.cfg, recipe.teacher, recipe.student
    ids, mask = batch["input_ids"], batch["attention_mask"]
    labels = torch.full_like(ids, -100)
    labels.view(-1)[batch["lm_positions"]] = batch["lm_targets"]
    if kind == "causal":  # HF shifts causal labels itself: labels are the input ids, pads ignored
        labels = ids.masked_fill(mask == 0, -100)
    t_out = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    s_out = student(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True)
    T = cfg.temperature
    kd = F.kl_div(F.log_softmax(s_out.logits.flatten(0, 1) / T, -1), F.softmax(t_out.logits.flatten(0, 1) / T, -1),
                  reduction="batchmean") * T * T
    h_s, h_t = s_out.hidden_states[-1].flatten(0, 1), t_out.hidden_states[-1].flatten(0, 1)
    cos = F.cosine_embedding_loss(h_s, h_t, torch.ones(len(h_s)))
    loss = cfg.alpha_kd * kd + cfg.alpha_lm * s_out.loss + cfg.alpha_cos * cos
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def measure(args) -> dict:
    torch.manual_seed(0)
    recipe, batches, kind = build(args)
    optimizer = torch.optim.AdamW(recipe.student.parameters(), lr=1e-5)
    tokens = 0
    start = None
    for i in range(args.warmup + args.steps):
        batch = batches(i)
        if i == args.warmup:
            start, tokens = time.perf_counter(), 0
        if args.variant == "alambic":
            loss = alambic_step(recipe, batch, optimizer)
        else:
            loss = naive_step(recipe, batch, optimizer, kind)
        tokens += int(batch["attention_mask"].sum())
    float(loss)
    elapsed = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": args.variant, "tokens_per_s": tokens / elapsed, "step_s": elapsed / args.steps,
            "peak_rss_mb": peak_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--layers", default="every-other")
    parser.add_argument("--data", default="bbc-news:train")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--variant", choices=["alambic", "naive"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args)))
        return

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    print(f"machine: {machine()}")
    print(f"setup:   teacher {args.teacher}, student layers {args.layers}, batch {args.batch_size} x {args.seq_len}, "
          f"{args.steps} timed steps after {args.warmup} warm-up")
    results = {}
    for variant in ("naive", "alambic"):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--variant", variant]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
        if out.returncode != 0:
            sys.exit(f"{variant} run failed:\n{out.stderr[-2000:]}")
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{'step':<10}{'tokens/s':>10}{'s/step':>9}{'peak RSS (MB)':>15}")
    for r in results.values():
        print(f"{r['variant']:<10}{r['tokens_per_s']:>10.0f}{r['step_s']:>9.2f}{r['peak_rss_mb']:>15.0f}")
    speedup = results["alambic"]["tokens_per_s"] / results["naive"]["tokens_per_s"]
    memory = results["alambic"]["peak_rss_mb"] / results["naive"]["peak_rss_mb"]
    print(f"alambic / naive: {speedup:.2f}x tokens/s, {memory:.2f}x peak memory")


if __name__ == "__main__":
    main()
