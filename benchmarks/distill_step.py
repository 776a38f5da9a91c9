"""How fast is one distillation step, how close to the hardware, and what does alambic buy over the reference?

    python benchmarks/distill_step.py --setups bert-base --repeats 3     # the BERT-base-shape setup, fp32 and bf16
    python benchmarks/distill_step.py --setups bert-base --profile       # + where alambic's step spends its time
    python benchmarks/distill_step.py --setups decoder-128,encoder-128 --variants naive,alambic
    python benchmarks/distill_step.py --compile            # alambic's steps with torch.compile'd bodies
    python benchmarks/distill_step.py --setups bert-base --repeats 3 --keep-freed-memory all   # the allocator's share
    # issue 22 item 2: compilation and attention dropout, each against the default step in the same run
    python benchmarks/distill_step.py --setups bert-base --repeats 3 \
        --variants reference,alambic-bf16,alambic-bf16-compile,alambic-bf16-no-attention-dropout

For each setup, each step variant runs on the same batches of real text (``bbc-news:train``) in its own process (so
its peak resident or device memory is its own):
- reference: the step of Hugging Face's DistilBERT distiller (transformers research_projects/distillation,
  ``Distiller.step``) on today's transformers: fp32, the models' default (SDPA) attention, teacher under no_grad,
  full ``[B, L, V]`` logits of both models, ``masked_select`` of the non-pad rows, ``KLDivLoss(batchmean)`` x T^2,
  cross-entropy over the full logits, ``masked_select`` + ``CosineEmbeddingLoss`` on the last hidden states,
  ``loss.item()``, gradient clipping at 5, torch's default AdamW;
- naive: an even more straightforward step (eager attention, teacher with autograd on, ``F.kl_div`` over every
  position), the baseline of the earlier figures in docs/benchmarks.md;
- alambic, alambic-bf16, alambic-bf16-autocast: the engine's step (``alambic.engine.loop``'s optimiser and clipping,
  the recipe's teacher targets and objective): teacher under inference_mode, vocabulary projection fused with the KL
  and cross-entropy a chunk of rows at a time, host-side row counts; in fp32, in bf16 (``mixed_precision: bf16``: a
  bf16 student with fp32 master weights in the optimiser, bf16 teacher) and in bf16 autocast (fp32 weights cast on
  every matmul, bf16 teacher) where the machine has bf16 (a GPU, or a CPU with native bf16 matrix instructions);
- any alambic variant + ``-compile``: its student and teacher bodies torch.compile'd (as ``training.compile``); the
  first step's time, compilation included, is printed with the number of steps after which compiling pays off;
- any alambic variant + ``-no-attention-dropout``: the student's attention-probability dropout set to 0 (hidden
  dropout kept), which lets CPU attention take SDPA's fused flash kernel (dropout keeps it on the math path).
Printed per step: tokens/s (non-pad tokens), FLOPs counted by ``torch.utils.flop_counter`` for that step, achieved
FLOP/s and its share of this machine's dense matmul rates in fp32 and bf16 measured in the same run, peak memory,
the loss of the first step (same weights, same batch; dropout draws differ), and each variant's ratio to the
reference. alambic's variants keep freed host memory for reuse, as the engine does on a CPU
(:mod:`alambic.engine.host_memory`); ``--keep-freed-memory all`` does the same for the reference and naive steps,
``none`` for no step. ``--profile`` adds torch.profiler's breakdown of alambic's steps by kind of work. The triple-loss weights
are DistilBERT's (5, 2, 1, T = 2; encoders mask with smoothing 0.7).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

SETUPS = {  # name: (teacher, student layers, batch size, sequence length)
    "bert-base": ("random:bert-base", "linspace:6", 8, 128),  # BERT-base shape, random weights (seed 0) -> DistilBERT
    "decoder-128": ("smollm2-135m", "every-other", 4, 128),
    "decoder-256": ("smollm2-135m", "every-other", 2, 256),
    "decoder-1024": ("smollm2-135m", "every-other", 1, 1024),  # long sequence: logits memory stays bounded
    "encoder-128": ("minilm-l6", "linspace:3", 8, 128),
}
PRECISIONS = ("alambic", "alambic-bf16", "alambic-bf16-autocast")
OPTIONS = ("-compile", "-no-attention-dropout")
VARIANTS = ("reference", "naive", *PRECISIONS, *(p + o for p in PRECISIONS for o in OPTIONS))
PROFILE_KINDS = {  # kind of work: substrings of the aten op names it covers (first match wins)
    "matmul": ("addmm", "::mm", "bmm", "matmul", "linear"),
    "vocabulary softmax + loss math": ("log_softmax", "::exp", "::dot", "gather", "scatter", "nll_loss", "kl_div",
                                       "cross_entropy"),
    "attention": ("scaled_dot_product", "flash_attention", "_softmax"),
    "optimizer": ("_fused_adamw", "_foreach", "lerp", "addcdiv", "addcmul", "::sqrt"),
    "dropout": ("bernoulli", "dropout"),
    "layer norm + GELU": ("layer_norm", "gelu", "rms_norm"),
    "copies + casts": ("copy_", "::to", "clone", "contiguous", "index_select", "masked_select", "index_copy"),
    "allocation + fill": ("empty", "fill_", "zero_", "zeros"),
}


def machine() -> str:
    from alambic.evaluation.speed import cpu_name

    cpu = cpu_name()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), {gpu}"


def dense_matmul_flops(dtype: torch.dtype) -> float:
    """This machine's dense matmul rate in ``dtype``: 2048^2 on CPU, 8192^2 on GPU; best of a few repeats."""
    from alambic.engine.precision import matmul_flops

    cuda = torch.cuda.is_available()
    return matmul_flops(8192 if cuda else 2048, dtype, repeats=6, device="cuda" if cuda else "cpu")


def has_bf16() -> bool:
    from alambic.engine.precision import Hardware

    hardware = Hardware.detect()
    return hardware.cuda_bf16 if hardware.cuda else hardware.cpu_bf16 is not None


def load(teacher_name: str, layers: str, variant: str, device):
    """Teacher with an LM head (MiniLM ships none: its encoder gets a fresh MLM head, which costs the same) and a
    student copied from it; ``random:bert-base`` is a BertForMaskedLM of BERT-base's shape with random weights and
    MiniLM's tokenizer (bert-base-uncased's 30,522-token vocabulary)."""
    from transformers import AutoModelForMaskedLM, BertConfig, BertForMaskedLM

    from alambic.modeling import has_lm_head, model_kind
    from alambic.students import init_student
    from alambic.teachers import load_teacher, resolve_model_path

    if teacher_name == "random:bert-base":
        _, tokenizer = load_teacher("minilm-l6")
        torch.manual_seed(0)
        teacher = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer))).eval().requires_grad_(False)
    else:
        teacher, tokenizer = load_teacher(teacher_name)
    if not has_lm_head(teacher):
        teacher = AutoModelForMaskedLM.from_pretrained(resolve_model_path(teacher_name)).eval().requires_grad_(False)
    student = init_student(teacher, layers=layers).model.train()
    if variant == "naive":
        for model in (teacher, student):
            model.config._attn_implementation = "eager"
            model.set_attn_implementation("eager")
        teacher.requires_grad_(True)
    return teacher.to(device), student.to(device), tokenizer, model_kind(teacher)


def lm_labels(batch, kind):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if kind == "causal":  # HF shifts causal labels itself
        return ids.masked_fill(mask == 0, -100)
    labels = torch.full_like(ids, -100)
    labels.view(-1)[batch["lm_positions"]] = batch["lm_targets"]
    return labels


def reference_step(teacher, student, batch, kind, optimizer, T=2.0):
    """Hugging Face's ``Distiller.step`` and ``optimize``, as the distiller runs them (its loss weights 5 / 2 / 1)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    labels = lm_labels(batch, kind)
    s_out = student(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    with torch.no_grad():
        t_out = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    s_logits, t_logits = s_out.logits, t_out.logits
    vocab = s_logits.size(-1)
    select = mask.bool().unsqueeze(-1).expand_as(s_logits)
    s_rows, t_rows = torch.masked_select(s_logits, select).view(-1, vocab), torch.masked_select(t_logits, select).view(-1, vocab)
    loss_kd = torch.nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s_rows / T, -1), F.softmax(t_rows / T, -1)) * T**2
    if kind == "causal":
        loss_lm = F.cross_entropy(s_logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=-100)
    else:
        loss_lm = F.cross_entropy(s_logits.view(-1, vocab), labels.view(-1), ignore_index=-100)
    s_hidden, t_hidden = s_out.hidden_states[-1], t_out.hidden_states[-1]
    dim = s_hidden.size(-1)
    select = mask.bool().unsqueeze(-1).expand_as(s_hidden)
    s_h, t_h = torch.masked_select(s_hidden, select).view(-1, dim), torch.masked_select(t_hidden, select).view(-1, dim)
    loss_cos = torch.nn.CosineEmbeddingLoss()(s_h, t_h, s_h.new_ones(s_h.size(0)))
    loss = 5 * loss_kd + 2 * loss_lm + 1 * loss_cos
    loss.item(), loss_kd.item(), loss_lm.item(), loss_cos.item()  # the distiller logs each term every step
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 5.0)
    optimizer.step()
    optimizer.zero_grad()
    return loss


def naive_step(teacher, student, batch, kind, optimizer, T=2.0):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    t_out = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    s_out = student(input_ids=ids, attention_mask=mask, labels=lm_labels(batch, kind), output_hidden_states=True)
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


def alambic_step(recipe, batch, optimizer, autocast, master):
    """What ``alambic.engine.loop.train`` does for one micro-batch per step."""
    from alambic.engine.loop import apply_gradients

    counts = {k: torch.tensor(float(v), device=batch["input_ids"].device) for k, v in recipe.row_counts(batch).items()}
    with autocast():
        targets = recipe.teacher_targets(batch)
    with autocast():
        loss, _ = recipe.objective(batch, targets, counts)
    loss.backward()
    apply_gradients(optimizer, master, recipe.objective.parameters(), 5.0)
    return loss


def _inplace_addmm_flops(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """torch's FLOP counter misses in-place ``addmm_`` (the fp32 weight-gradient accumulation uses it)."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


PROFILED_STEPS = 2


def _self_us(event) -> float:
    """An op's own time (microseconds, over the profiled steps): on the device where there is one, else on the CPU."""
    return event.self_device_time_total if torch.cuda.is_available() else event.self_cpu_time_total


def top_ops(profiler, count: int = 8) -> list[tuple[str, str, float, float]]:
    """The ``count`` aten ops with the most self time, by input shapes: (name, shapes, milliseconds per step, calls per
    step)."""
    events = [e for e in profiler.key_averages(group_by_input_shape=True) if e.key.startswith("aten::")]
    events.sort(key=lambda e: -_self_us(e))
    return [(e.key, str(e.input_shapes), _self_us(e) / 1e3 / PROFILED_STEPS, e.count / PROFILED_STEPS)
            for e in events[:count]]


def breakdown(profiler) -> dict[str, float]:
    """Seconds of self CPU (or device) time per step and kind of work in :data:`PROFILE_KINDS`, the rest as
    "other"."""
    seconds: dict[str, float] = {}
    for event in profiler.key_averages():
        name = event.key
        if not name.startswith("aten::"):
            continue
        kind = next((k for k, parts in PROFILE_KINDS.items() if any(p in name for p in parts)), "other")
        seconds[kind] = seconds.get(kind, 0.0) + _self_us(event) / 1e6 / PROFILED_STEPS
    return seconds


def measure(args) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from alambic.config import DataConfig, TrainingConfig
    from alambic.data.pipeline import training_batches
    from alambic.engine.host_memory import keep_freed_memory
    from alambic.engine.loop import build_optimizer
    from alambic.engine.master_weights import MasterWeights
    from alambic.modeling import lm_body
    from alambic.recipes.distilbert import DistilBERTLossConfig, DistilBERTRecipe

    teacher_name, layers, batch_size, seq_len = SETUPS[args.setup]
    if args.keep_freed_memory == "all" or (args.keep_freed_memory == "engine" and args.variant.startswith("alambic")):
        keep_freed_memory()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    variant = args.variant
    compiled = args.compile or variant.endswith("-compile")
    teacher, student, tokenizer, kind = load(teacher_name, layers, variant, device)
    if variant.endswith("-no-attention-dropout"):
        for module in student.modules():  # BERT's attention keeps its probability dropout as .dropout
            if type(module).__name__.endswith("SelfAttention") and isinstance(module.dropout, torch.nn.Dropout):
                module.dropout.p = 0.0
    variant = next((variant.removesuffix(o) for o in OPTIONS if variant.endswith(o)), variant)
    loss_cfg = DistilBERTLossConfig(mlm_smoothing=0.7 if kind == "masked" else None)
    batches = training_batches(["bbc-news:train"], tokenizer, kind, DataConfig(max_length=seq_len),
                               loss_cfg if kind == "masked" else None, batch_size, seed=0)
    lr = 5e-4
    if variant in ("reference", "naive"):
        # the reference's AdamW (eps 1e-6), torch's default implementation
        optimizer = torch.optim.AdamW(student.parameters(), lr=lr, eps=1e-6)
        step_fn = reference_step if variant == "reference" else naive_step

        def step(batch):
            return step_fn(teacher, student, batch, kind, optimizer)
    else:
        autocast_bf16 = variant == "alambic-bf16-autocast"
        if variant != "alambic":  # as the engine does under bf16: the frozen teacher in bf16
            teacher = teacher.to(torch.bfloat16)
        recipe = DistilBERTRecipe(teacher, student, loss_cfg)
        # mixed_precision: bf16 -> a bf16 student, its fp32 master weights in the optimiser
        master = MasterWeights(recipe.objective) if variant == "alambic-bf16" else None
        parameters = master.trainable_masters() if master else recipe.objective.parameters()
        optimizer = build_optimizer(parameters, TrainingConfig(lr=lr, eps=1e-6))
        if compiled:  # as training.compile does
            for model in (student, teacher):
                lm_body(model).compile()

        def autocast():
            return torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16)

        def step(batch):
            return alambic_step(recipe, batch, optimizer, autocast, master)

    def on_device(i):
        return {k: v.to(device) for k, v in batches(i).items()}

    start = time.perf_counter()
    first_loss = float(step(on_device(0)))  # also the warm-up (and the compilation)
    first_step_s = time.perf_counter() - start
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: _inplace_addmm_flops}) as counter:
        step(on_device(1))
    flops = counter.get_total_flops()
    seconds, tokens, collation = 0.0, 0, 0.0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt  # pages first touched (or touched again) by the steps
    for i in range(2, 2 + args.steps):
        start = time.perf_counter()
        batch = on_device(i)  # collation (masking, padding) and the copy to the device, outside the step's timer
        collation += time.perf_counter() - start
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        float(step(batch))
        seconds += time.perf_counter() - start
        tokens += int(batch["attention_mask"].sum())  # non-pad tokens
    result = {"variant": args.variant, "tokens_per_s": tokens / seconds, "step_s": seconds / args.steps,
              "first_step_s": first_step_s,
              "flops_per_step": flops, "achieved_flops": flops * args.steps / seconds, "first_loss": first_loss,
              "collation_ms": 1000 * collation / args.steps,
              "page_faults_per_step": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / args.steps}
    result["peak_mb"] = (torch.cuda.max_memory_allocated() / 2**20 if cuda
                         else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if args.profile and variant.startswith("alambic"):
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities, record_shapes=True) as profiler:
            for i in range(2 + args.steps, 2 + args.steps + PROFILED_STEPS):
                float(step(on_device(i)))
        result["profile_s"] = breakdown(profiler)
        result["top_ops"] = top_ops(profiler)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", default="bert-base,decoder-128,encoder-128",
                        help=f"comma-separated, from: {', '.join(SETUPS)}")
    parser.add_argument("--variants", default="reference,alambic,alambic-bf16,alambic-bf16-autocast",
                        help=f"comma-separated, from: {', '.join(VARIANTS)} (the bf16 ones only where the machine has "
                             "bf16)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up and one counted step")
    parser.add_argument("--repeats", type=int, default=1, help="run every variant this many times, interleaved, and "
                        "compare medians (shared or throttled machines vary by 10-30%% between runs)")
    parser.add_argument("--profile", action="store_true", help="also profile two of alambic's steps and print the "
                        "time per kind of work")
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer bodies in alambic's "
                        "steps (compilation happens in the untimed warm-up step)")
    parser.add_argument("--keep-freed-memory", choices=("engine", "all", "none"), default="engine",
                        help="which steps run with freed host memory kept for reuse: alambic's, as its engine does on "
                             "a CPU (engine), every step including the reference (all), or none")
    parser.add_argument("--setup", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args)))
        return

    bf16 = has_bf16()
    variants = [v for v in args.variants.split(",") if "bf16" not in v or bf16]
    peaks = {"fp32": dense_matmul_flops(torch.float32)}
    if bf16:
        peaks["bf16"] = dense_matmul_flops(torch.bfloat16)
    memory = "peak GPU MB" if torch.cuda.is_available() else "peak RSS MB"
    print(f"machine: {machine()}")
    print("dense matmul: " + ", ".join(f"{v / 1e9:,.0f} GFLOP/s {k}" for k, v in peaks.items()))
    print(f"{'setup':<13}{'step':<23}{'tokens/s':>10}{'s/step':>8}{'GFLOP/step':>12}{'GFLOP/s':>9}"
          + "".join(f"{'% ' + k:>8}" for k in peaks) + f"{memory:>13}{'1st loss':>10}")
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for setup in args.setups.split(","):
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        for repeat in range(args.repeats):  # interleaved, so a slow spell of a shared machine hits every variant
            for variant in variants:
                cmd = [sys.executable, __file__, "--setup", setup, "--variant", variant, "--steps", str(args.steps),
                       "--keep-freed-memory", args.keep_freed_memory]
                cmd += ["--compile"] if args.compile and variant.startswith("alambic") else []
                cmd += ["--profile"] if args.profile and repeat == 0 else []
                out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if out.returncode != 0:
                    sys.exit(f"{setup} {variant} failed:\n{out.stderr[-3000:]}")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                runs[variant].append(r)
                print(f"{setup:<13}{variant:<23}{r['tokens_per_s']:>10.0f}{r['step_s']:>8.2f}"
                      f"{r['flops_per_step'] / 1e9:>12.1f}{r['achieved_flops'] / 1e9:>9.1f}"
                      + "".join(f"{100 * r['achieved_flops'] / v:>7.0f}%" for v in peaks.values())
                      + f"{r['peak_mb']:>13.0f}{r['first_loss']:>10.4f}", flush=True)
        speed = {v: statistics.median(r["tokens_per_s"] for r in rs) for v, rs in runs.items()}
        if args.repeats > 1:
            for name, rs in runs.items():
                values = sorted(r["tokens_per_s"] for r in rs)
                print(f"{setup:<13}{name}: median {speed[name]:.0f} tokens/s over {len(rs)} runs "
                      f"(range {values[0]:.0f}-{values[-1]:.0f}), "
                      + ", ".join(f"{100 * statistics.median(r['achieved_flops'] for r in rs) / v:.0f}% of {k}"
                                  for k, v in peaks.items()))
        base_name = "reference" if "reference" in runs else "naive" if "naive" in runs else None
        if base_name:
            base = runs[base_name][0]
            for name, rs in runs.items():
                if name != base_name:
                    print(f"{setup:<13}{name} / {base_name}: {speed[name] / speed[base_name]:.2f}x tokens/s"
                          f"{' (medians)' if args.repeats > 1 else ''}, {rs[0]['peak_mb'] / base['peak_mb']:.2f}x "
                          f"peak memory, {rs[0]['flops_per_step'] / base['flops_per_step']:.2f}x FLOPs")
        for name, rs in runs.items():
            eager = name.removesuffix("-compile")
            if name.endswith("-compile") and eager in runs:  # compilation pays once its cost is made up
                cost = statistics.median(r["first_step_s"] for r in rs) - statistics.median(
                    r["first_step_s"] for r in runs[eager])
                gain = statistics.median(r["step_s"] for r in runs[eager]) - statistics.median(
                    r["step_s"] for r in rs)
                pays = f"pays off after {cost / gain:,.0f} steps" if gain > 0 else "never pays off (no faster)"
                print(f"{setup:<13}{name}: first step {cost:.1f} s longer than {eager}'s, each step {gain:+.3f} s "
                      f"faster: {pays}")
        for name, rs in runs.items():
            collation = statistics.median(r["collation_ms"] for r in rs)
            faults = statistics.median(r["page_faults_per_step"] for r in rs)
            print(f"{setup:<13}{name}: collation {collation:.2f} ms per micro-batch "
                  f"({100 * collation / 1000 / rs[0]['step_s']:.2f}% of a step); {faults:,.0f} minor page faults "
                  "per step")
            if "profile_s" in rs[0]:
                total = sum(rs[0]["profile_s"].values())
                parts = sorted(rs[0]["profile_s"].items(), key=lambda kv: -kv[1])
                print(f"{setup:<13}{name} profile, {total:.2f} s of op time per step: "
                      + ", ".join(f"{k} {v:.2f} s ({100 * v / total:.0f}%)" for k, v in parts))
                for op, shapes, ms, calls in rs[0]["top_ops"]:
                    print(f"{setup:<13}{name} profile: {op} {shapes}: {ms:.1f} ms per step in {calls:g} calls")

if __name__ == "__main__":
    main()
