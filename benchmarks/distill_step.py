"""How fast is one distillation step, how close to the hardware, and what does alambic buy over a naive step?

    python benchmarks/distill_step.py                      # decoder (SmolLM2 -> 15 layers) and encoder setups
    python benchmarks/distill_step.py --setups decoder-128 --steps 3
    python benchmarks/distill_step.py --compile            # alambic's step with torch.compile'd bodies

For each setup, two steps run on the same batches of real text, each in its own process (so its peak resident or
device memory is its own):
- alambic: teacher under inference_mode (bf16 on GPU), vocabulary projection fused with the KL and cross-entropy
  and run a chunk of rows at a time (gradients from closed forms, nothing vocabulary-sized kept for backward),
  host-side row counts (no device synchronisation), SDPA attention;
- naive, as a straightforward script writes it: eager attention, fp32, teacher forward with autograd on (its
  parameters trainable, logits not detached), full ``model(...).logits`` of teacher and student, ``F.kl_div`` over
  every position of the [B, L, V] logits, cross-entropy through ``labels=``.
Printed per step: tokens/s, FLOPs counted by ``torch.utils.flop_counter`` for that step, achieved FLOP/s and its
ratio to this machine's dense matmul FLOP/s measured in the same run (fp32 on CPU, bf16 on GPU), peak memory, and
alambic / naive ratios, and the loss of the first step (same weights, same batch: the two compute one loss; dropout
draws differ). The triple-loss weights are DistilBERT's (5, 2, 1, T = 2).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

SETUPS = {  # name: (teacher, student layers, batch size, sequence length)
    "decoder-128": ("smollm2-135m", "every-other", 4, 128),
    "decoder-256": ("smollm2-135m", "every-other", 2, 256),
    "decoder-1024": ("smollm2-135m", "every-other", 1, 1024),  # long sequence: logits memory stays bounded
    "encoder-128": ("minilm-l6", "linspace:3", 8, 128),
}


def machine() -> str:
    cpu = platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), {gpu}"


def dense_matmul_flops() -> float:
    """The machine's own dense matmul rate: fp32 2048^2 on CPU, bf16 8192^2 on GPU; best of a few repeats."""
    cuda = torch.cuda.is_available()
    n, dtype, device = (8192, torch.bfloat16, "cuda") if cuda else (2048, torch.float32, "cpu")
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(5):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def load(teacher_name: str, layers: str, naive: bool, device):
    """Teacher with an LM head (MiniLM ships none: its encoder gets a fresh MLM head, which costs the same) and a
    student copied from it."""
    from transformers import AutoModelForMaskedLM

    from alambic.modeling import has_lm_head, model_kind
    from alambic.students import init_student
    from alambic.teachers import load_teacher, resolve_model_path

    teacher, tokenizer = load_teacher(teacher_name)
    if not has_lm_head(teacher):
        teacher = AutoModelForMaskedLM.from_pretrained(resolve_model_path(teacher_name)).eval().requires_grad_(False)
    student = init_student(teacher, layers=layers).model.train()
    if naive:
        for model in (teacher, student):
            model.config._attn_implementation = "eager"
            model.set_attn_implementation("eager")
        teacher.requires_grad_(True)
    return teacher.to(device), student.to(device), tokenizer, model_kind(teacher)


def naive_step(teacher, student, batch, kind, optimizer):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    labels = torch.full_like(ids, -100)
    labels.view(-1)[batch["lm_positions"]] = batch["lm_targets"]
    if kind == "causal":  # HF shifts causal labels itself
        labels = ids.masked_fill(mask == 0, -100)
    t_out = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    s_out = student(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True)
    T = 2.0
    kd = F.kl_div(F.log_softmax(s_out.logits.flatten(0, 1) / T, -1), F.softmax(t_out.logits.flatten(0, 1) / T, -1),
                  reduction="batchmean") * T * T
    h_s, h_t = s_out.hidden_states[-1].flatten(0, 1), t_out.hidden_states[-1].flatten(0, 1)
    cos = F.cosine_embedding_loss(h_s, h_t, torch.ones(len(h_s), device=h_s.device))
    loss = 5 * kd + 2 * s_out.loss + 1 * cos
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    teacher.zero_grad(set_to_none=True)
    return loss


def alambic_step(recipe, batch, optimizer, autocast):
    counts = {k: torch.tensor(float(v), device=batch["input_ids"].device) for k, v in recipe.row_counts(batch).items()}
    with autocast():
        targets = recipe.teacher_targets(batch)
        loss, _ = recipe.objective(batch, targets, counts)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def measure(args) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from alambic.config import DataConfig
    from alambic.data.pipeline import training_batches
    from alambic.modeling import lm_body
    from alambic.recipes.distilbert import DistilBERTLossConfig, DistilBERTRecipe

    teacher_name, layers, batch_size, seq_len = SETUPS[args.setup]
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    naive = args.variant == "naive"
    teacher, student, tokenizer, kind = load(teacher_name, layers, naive, device)
    loss_cfg = DistilBERTLossConfig()
    batches = training_batches(["bbc-news:train"], tokenizer, kind, DataConfig(max_length=seq_len),
                               loss_cfg if kind == "masked" else None, batch_size, seed=0)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    if naive:
        def step(batch):
            return naive_step(teacher, student, batch, kind, optimizer)
    else:
        if cuda:
            teacher = teacher.to(torch.bfloat16)
        recipe = DistilBERTRecipe(teacher, student, loss_cfg)
        if args.compile:  # as training.compile does
            for model in (student, teacher):
                lm_body(model).compile()

        def autocast():
            return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

        def step(batch):
            return alambic_step(recipe, batch, optimizer, autocast)

    def on_device(i):
        return {k: v.to(device) for k, v in batches(i).items()}

    first_loss = float(step(on_device(0)))  # also the warm-up
    with FlopCounterMode(display=False) as counter:
        step(on_device(1))
    flops = counter.get_total_flops()
    times, tokens = [], 0
    for i in range(2, 2 + args.steps):
        batch = on_device(i)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = step(batch)
        float(loss)
        times.append(time.perf_counter() - start)
        tokens = int(batch["attention_mask"].sum())
    seconds = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": args.variant, "tokens_per_s": tokens / seconds, "step_s": seconds, "flops_per_step": flops,
            "achieved_flops": flops / seconds, "peak_mb": peak, "first_loss": first_loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated, from: {', '.join(SETUPS)}")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median) after one warm-up and one counted")
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer bodies in alambic's step "
                        "(compilation happens in the untimed warm-up step)")
    parser.add_argument("--setup", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=["alambic", "naive"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args)))
        return

    peak_flops = dense_matmul_flops()
    memory = "peak GPU MB" if torch.cuda.is_available() else "peak RSS MB"
    print(f"machine: {machine()}")
    print(f"dense matmul: {peak_flops / 1e9:.1f} GFLOP/s ({'bf16' if torch.cuda.is_available() else 'fp32'})")
    print(f"{'setup':<13}{'step':<9}{'tokens/s':>10}{'s/step':>8}{'GFLOP/step':>12}{'GFLOP/s':>9}{'% of mm':>9}"
          f"{memory:>13}{'1st loss':>10}")
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for setup in args.setups.split(","):
        results = {}
        for variant in ("naive", "alambic"):
            cmd = [sys.executable, __file__, "--setup", setup, "--variant", variant, "--steps", str(args.steps)]
            cmd += ["--compile"] if args.compile and variant == "alambic" else []
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                sys.exit(f"{setup} {variant} failed:\n{out.stderr[-3000:]}")
            r = results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{setup:<13}{variant:<9}{r['tokens_per_s']:>10.0f}{r['step_s']:>8.2f}{r['flops_per_step'] / 1e9:>12.1f}"
                  f"{r['achieved_flops'] / 1e9:>9.1f}{100 * r['achieved_flops'] / peak_flops:>8.0f}%{r['peak_mb']:>13.0f}"
                  f"{r['first_loss']:>10.4f}")
        a, n = results["alambic"], results["naive"]
        print(f"{setup:<13}alambic / naive: {a['tokens_per_s'] / n['tokens_per_s']:.2f}x tokens/s, "
              f"{a['peak_mb'] / n['peak_mb']:.2f}x peak memory, {a['flops_per_step'] / n['flops_per_step']:.2f}x FLOPs")


if __name__ == "__main__":
    main()
