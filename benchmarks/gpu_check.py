"""The GPU check: correctness and throughput of alambic's step on one CUDA device, in one call (benchmarks/gpu_check.sh).

    bash benchmarks/gpu_check.sh                 # on a GPU machine: well under 8 minutes on an H100
    python benchmarks/gpu_check.py --dry-run     # tiny shapes on the CPU: what the test suite runs

1. bf16 parity of a step: the first-step losses of the same student, batch and weights in fp32 and in bf16 (the
   engine's bf16 student with fp32 master weights and a bf16 teacher) agree within 1%.
2. The fused vocabulary loss (forward KL x T^2 + cross-entropy, chunked rows, closed-form gradients) against the full
   logits computed directly on the device: values and gradients.
3. One on-policy (GKD) step: the student samples answers on the device, the teacher scores them, the step trains
   (`alambic distill` on chat data with on_policy.lmbda=1).
4. Throughput: a 1B-shape Llama teacher (16 layers x 2,048, 32 heads in 8 KV groups, FFN 8,192, vocabulary 49,152)
   -> its half-depth student, 32 x 1,024 tokens per step in bf16, tokens/s against TRL's published 26.8k tokens/s
   for a 1B -> 1B distillation on an H100.
Each check prints its figures and peak memory; the table comes last. Exit 1 when a correctness check fails.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

TRL_TOKENS_PER_S = 26_800
"""TRL's distillation trainer, 1B -> 1B on one H100 (its documentation's figure)."""
ONE_B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
             intermediate_size=8192, vocab_size=49152, max_position_embeddings=2048)
TINY = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            vocab_size=512, max_position_embeddings=256)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def teacher_and_student(shape: dict, device: torch.device, seed: int = 0):
    import transformers

    from alambic.students import init_student

    torch.manual_seed(seed)
    teacher = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape, tie_word_embeddings=True))
    student = init_student(teacher, layers=f"linspace:{shape['num_hidden_layers'] // 2}").model.train()
    return teacher.eval().requires_grad_(False).to(device), student.to(device)


def random_batch(vocab: int, batch: int, length: int, device: torch.device, seed: int = 0) -> dict:
    from alambic.data.collate import CausalLMCollator

    generator = torch.Generator().manual_seed(seed)
    rows = [torch.randint(1, vocab, (length,), generator=generator).tolist() for _ in range(batch)]
    ids_only = SimpleNamespace(pad_token_id=0, eos_token_id=0)  # all the collator reads of a tokenizer
    return {k: v.to(device) for k, v in CausalLMCollator(ids_only)(rows).items()}


def trainer(recipe, bf16: bool):
    """The optimiser and (bf16) master weights alambic.engine.loop.train sets up: bf16 is a bf16 student with fp32
    masters, as ``training.mixed_precision: bf16`` trains."""
    from alambic.config import TrainingConfig
    from alambic.engine.loop import build_optimizer
    from alambic.engine.master_weights import MasterWeights

    master = MasterWeights(recipe.objective) if bf16 else None
    parameters = master.trainable_masters() if master else recipe.objective.parameters()
    return build_optimizer(parameters, TrainingConfig()), master


def step(recipe, batch, optimizer, master) -> float:
    """One step as alambic.engine.loop.train runs it (one micro-batch)."""
    from alambic.engine.loop import apply_gradients

    device = batch["input_ids"].device
    counts = {k: torch.tensor(float(v), device=device) for k, v in recipe.row_counts(batch).items()}
    targets = recipe.teacher_targets(batch)
    loss, _ = recipe.objective(batch, targets, counts)
    loss.backward()
    apply_gradients(optimizer, master, recipe.objective.parameters(), 5.0)
    return float(loss)


def check_bf16_parity(device, shape, batch_size, length) -> dict:
    from alambic.recipes.distilbert import DistilBERTLossConfig, DistilBERTRecipe

    batch = random_batch(shape["vocab_size"], batch_size, length, device)
    losses = {}
    for bf16 in (False, True):
        teacher, student = teacher_and_student(shape, device)
        if bf16:
            teacher = teacher.to(torch.bfloat16)
        recipe = DistilBERTRecipe(teacher, student, DistilBERTLossConfig())
        losses["bf16" if bf16 else "fp32"] = step(recipe, batch, *trainer(recipe, bf16))
    relative = abs(losses["bf16"] - losses["fp32"]) / abs(losses["fp32"])
    return {"check": "bf16 parity of a step", "figure": f"first-step loss fp32 {losses['fp32']:.4f}, bf16 "
            f"{losses['bf16']:.4f} ({100 * relative:.2f}% apart)", "ok": relative < 0.01}


def check_fused_loss(device) -> dict:
    from alambic.losses.vocabulary import fused_vocabulary_loss

    torch.manual_seed(0)
    rows, width, vocab, T = 300, 64, 5000, 2.0
    student_head, teacher_head = torch.nn.Linear(width, vocab).to(device), torch.nn.Linear(width, vocab).to(device)
    features = torch.randn(rows, width, device=device, requires_grad=True)
    teacher_features = torch.randn(rows, width, device=device)
    targets = torch.randint(0, vocab, (rows,), device=device)
    loss, _, _ = fused_vocabulary_loss(features, student_head, teacher_features, teacher_head, targets, T,
                                       kd_weight=5 / rows, ce_weight=2 / rows, chunk_rows=64)
    fused_grad = torch.autograd.grad(loss, features)[0]
    student_logits = student_head(features)
    p = torch.softmax(teacher_head(teacher_features) / T, -1)
    kd = (p * (p.log() - torch.log_softmax(student_logits / T, -1))).sum() * T * T
    ce = torch.nn.functional.cross_entropy(student_logits, targets, reduction="sum")
    direct = 5 / rows * kd + 2 / rows * ce
    direct_grad = torch.autograd.grad(direct, features)[0]
    value_gap = abs(float(loss) - float(direct)) / abs(float(direct))
    grad_gap = float((fused_grad - direct_grad).abs().max() / direct_grad.abs().max())
    return {"check": "fused vocabulary loss vs full logits", "figure": f"value {100 * value_gap:.1e}% apart, "
            f"gradients {grad_gap:.1e} of their scale", "ok": value_gap < 1e-4 and grad_gap < 1e-3}


def check_on_policy(device, dry_run: bool) -> dict:
    from alambic.cli import main

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as folder:  # a teacher, data and a run: ~80 MB
        work = Path(folder)
        subprocess.run([sys.executable, str(Path(__file__).with_name("chat_distillation.py")), "--data-only", "--out",
                        str(work)], check=True, capture_output=True)
        teacher = "smollm2-135m"
        if dry_run:  # a random 2-layer decoder with SmolLM2's tokenizer (and chat template)
            import transformers

            from alambic.teachers import load_model

            _, tokenizer = load_model("smollm2-135m")
            config = transformers.LlamaConfig(**{**TINY, "vocab_size": len(tokenizer), "num_hidden_layers": 2},
                                              tie_word_embeddings=True)
            transformers.LlamaForCausalLM(config).save_pretrained(work / "teacher")
            tokenizer.save_pretrained(work / "teacher")
            teacher = str(work / "teacher")
        start = time.perf_counter()
        code = main(["distill", "--teacher", teacher, "--data", str(work / "data" / "train.jsonl"), "--out",
                     str(work / "run"), "--layers", "0,1" if dry_run else "every-other", "--max-steps", "1",
                     "--batch-size", "2", "--max-length", "192", "--no-progress", "--set", "on_policy.lmbda=1",
                     "--set", "on_policy.max_new_tokens=8", "--set", "loss.alpha_cos=0", "--set", "training.log_every=1"])
        seconds = time.perf_counter() - start
        logged = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()] \
            if code == 0 else [{}]
    share = logged[-1].get("generate_share")
    # the real teacher's student writes answers the teacher scores (kd > 0); a random one may stop at once
    ok = code == 0 and share is not None and (dry_run or logged[-1].get("loss/kd", 0) > 0)
    return {"check": "one on-policy (GKD) step", "figure": f"exit {code}, {seconds:.1f} s with loading, generating "
            f"{100 * (share or 0):.0f}% of the step", "ok": ok}


def check_throughput(device, shape, batch_size, length, steps: int) -> dict:
    from alambic.recipes.distilbert import DistilBERTLossConfig, DistilBERTRecipe

    teacher, student = teacher_and_student(shape, device)
    bf16 = device.type == "cuda" or shape is TINY
    teacher = teacher.to(torch.bfloat16)
    recipe = DistilBERTRecipe(teacher, student, DistilBERTLossConfig(alpha_cos=1.0))
    optimizer, master = trainer(recipe, bf16)
    batches = [random_batch(shape["vocab_size"], batch_size, length, device, seed) for seed in range(steps + 2)]
    for batch in batches[:2]:  # warm-up: kernels chosen, memory pools grown
        step(recipe, batch, optimizer, master)
    reset_peak(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for batch in batches[2:]:
        step(recipe, batch, optimizer, master)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    tokens_per_s = steps * batch_size * length / seconds
    parameters = sum(p.numel() for p in teacher.parameters()) / 1e9
    student_parameters = sum(p.numel() for p in student.parameters()) / 1e9
    return {"check": f"throughput {parameters:.2f}B -> {student_parameters:.2f}B, {batch_size} x {length} bf16",
            "figure": f"{tokens_per_s:,.0f} tokens/s ({tokens_per_s / TRL_TOKENS_PER_S:.2f}x TRL's 1B -> 1B "
            f"{TRL_TOKENS_PER_S:,} on an H100), {seconds / steps:.2f} s per step", "ok": True,
            "peak_mb": peak_memory_mb(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (what the test suite runs)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps of the throughput check (default 10)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        raise SystemExit("gpu_check: no CUDA device here; --dry-run runs the same checks on tiny shapes on the CPU")
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name(device) if cuda else "CPU (dry run)"
    print(f"device: {name}, torch {torch.__version__}", flush=True)
    checks = [
        lambda: check_bf16_parity(device, ONE_B if cuda else TINY, 8 if cuda else 2, 512 if cuda else 32),
        lambda: check_fused_loss(device),
        lambda: check_on_policy(device, dry_run=not cuda),
        lambda: check_throughput(device, ONE_B if cuda else TINY, 32 if cuda else 2, 1024 if cuda else 64,
                                 args.steps if cuda else 2),
    ]
    rows = []
    for check in checks:
        reset_peak(device)
        row = check()
        row.setdefault("peak_mb", peak_memory_mb(device))
        print(f"{'ok  ' if row['ok'] else 'FAIL'} {row['check']}: {row['figure']}, peak {row['peak_mb']:,.0f} MB",
              flush=True)
        rows.append(row)
    print(f"\n| check | figure | peak memory ({'GPU' if cuda else 'CPU RSS'}) | ok |\n| --- | --- | ---: | --- |")
    for row in rows:
        print(f"| {row['check']} | {row['figure']} | {row['peak_mb']:,.0f} MB | {'yes' if row['ok'] else 'NO'} |")
    sys.exit(0 if all(row["ok"] for row in rows) else 1)


if __name__ == "__main__":
    main()
