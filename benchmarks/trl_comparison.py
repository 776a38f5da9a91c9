"""The chat benchmark's on-policy distillation (variant "gkd" of benchmarks/chat_distillation.py) run with TRL instead.

Trains the same student (OUT/student-init of the chat benchmark) from the same teacher (OUT/teacher/best) on the same
chat data (OUT/data/train.jsonl), at the same steps, batch size, max length, learning rate, on-policy share (lmbda),
answer length and divergence (JSD, beta 0.5), with TRL 1.16 — so the two can be compared on wall / CPU seconds,
tokens/s, and (with `alambic eval-chat` on OUT/student) quality. trl is never a dependency of alambic: this script runs
in its own virtual environment, which sees alambic's torch / transformers / accelerate / datasets through a .pth file:

    python3 -m venv /tmp/trl-venv \\
      && echo $(.venv/bin/python -c "import site;print(site.getsitepackages()[0])") \\
         > $(/tmp/trl-venv/bin/python -c "import site;print(site.getsitepackages()[0])")/alambic-stack.pth \\
      && /tmp/trl-venv/bin/pip install --no-deps trl==1.16.0

    /tmp/trl-venv/bin/python benchmarks/trl_comparison.py --teacher runs/chat-bench/teacher/best \\
        --student runs/chat-bench/student-init --data runs/chat-bench/data/train.jsonl \\
        --out runs/chat-bench/trl-gkd-s0 --steps 40 --batch-size 8 --lr 1e-4 --max-length 192 --max-new-tokens 24 \\
        --lmbda 0.5 --beta 0.5 --temperature 1.0 --seed 0
    .venv/bin/alambic eval-chat runs/chat-bench/trl-gkd-s0/student --names trl-gkd-s0 \\
        --data runs/chat-bench/data/test.jsonl --teacher runs/chat-bench/teacher/best --max-new-tokens 24 \\
        --max-examples 120 --json --out runs/chat-bench/trl-gkd-s0/eval-test.json

Outputs: OUT/student (the trained student, save_pretrained + tokenizer: a plain Hugging Face folder), OUT/trl.json
(timings, tokens/s, versions, CPU, every setting) and OUT/steps.jsonl (one line per optimiser step).

Trainer (--trainer gkd, the default): trl.experimental.gkd.GKDTrainer / GKDConfig. It runs on CPU. It is the one that
matches alambic's `on_policy.lmbda`: each step, with probability lmbda (Python's `random.random() <= lmbda`), the
batch's gold answers are replaced by the current student's samples (`model.generate`, do_sample, top_k 0, top_p 1,
temperature, max_new_tokens; everything after the first EOS masked), otherwise the gold answers are used; the loss is
the generalised JSD(beta) between teacher and student over the answer tokens only (same convention as alambic's
`jsd`: beta 0 = forward KL, 1 = reverse KL). seq_kd stays off (alambic's gkd variant samples no teacher answers).
`--trainer distillation` runs the stable trl.DistillationTrainer instead (also runs on CPU: on a CPU its chunked
divergence kernel falls back to plain torch, `trl/kernels/chunked_logprob.py::_use_triton` is False off cuda/xpu), but
it is *always* on-policy (no lmbda: every answer is the student's, i.e. lmbda = 1), trains on prompts only, and
applies `temperature` to the loss too; --lmbda is then ignored (recorded as 1.0), and --max-length is not applied
(it has no prompt truncation; the loss is normalised by the sampled-token count, unlike GKD's, see below).

Settings, alambic (`alambic distill ... --divergence jsd --set on_policy.lmbda=0.5 --set on_policy.max_new_tokens=24
--set training.warmup_ratio=0.1 --set loss.alpha_cos=0`) -> TRL:
  training.max_steps / batch_size / lr / seed -> max_steps / per_device_train_batch_size / learning_rate / seed
                                                 (gradient_accumulation_steps 1; data_seed = seed)
  data.max_length                             -> max_length (GKD's DataCollatorForChatML)
  on_policy.lmbda / max_new_tokens            -> lmbda / max_new_tokens
  on_policy.temperature (sampling, 1.0)       -> temperature (GKD: sampling only, see below)
  loss.divergence=jsd, divergence_param 0.5   -> beta
  AdamW betas (0.9, 0.98), eps 1e-6, wd 0     -> adam_beta1/2, adam_epsilon, weight_decay, optim adamw_torch_fused
  grad_clip 5.0                               -> max_grad_norm 5.0
  warmup_ratio 0.1, linear decay              -> warmup_steps int(0.1 * steps), lr_scheduler_type linear
  training.mixed_precision auto               -> --precision auto: bf16 autocast (bf16=True, teacher loaded in bf16,
                                                 as alambic casts it) on a CPU with AVX512-BF16 / AMX-BF16, else fp32
Known differences, not settings (TRL's code as it is in 1.16):
  - loss: alambic's distilbert recipe trains on alpha_kd * T^2 * JSD_T + alpha_lm * CE (defaults 5, 2, loss.temperature
    2.0 in the benchmark's gkd variant); GKDTrainer's loss is the JSD alone, at temperature 1
    (`GKDTrainer.compute_loss` calls `generalized_jsd_loss` without `temperature=`, so `temperature` only sets the
    sampling temperature). The update's direction differs (no CE term, T 1 vs 2), not only its scale. For a like-for-like
    loss, run alambic's gkd variant with --set loss.temperature=1 --set loss.alpha_kd=1 --set loss.alpha_lm=0.
  - normalisation: the Trainer computes `num_items_in_batch` from the collated *gold* labels before GKD's
    training_step swaps in the sampled answers, and `generalized_jsd_loss` divides the on-policy JSD sum by it
    (DistillationTrainer.compute_loss corrects exactly this; GKDTrainer does not). OUT/steps.jsonl records both counts.
  - truncation: TRL keeps the *last* max_length tokens (the prompt's start goes); alambic cuts the answer's end and drops
    a conversation whose prompt alone is too long. Sampled answers: TRL generates max_new_tokens whatever the room
    left, alambic min(max_new_tokens, max_length - longest prompt).
  - padding: TRL pads on the left; the warm-up starts at lr/warmup (alambic) vs 0 (transformers); the batches' order
    differs (each samples its own shuffle).

Measured (OUT/trl.json): train_wall_s (wall seconds of trainer.train()), train_cpu_s (user + system CPU seconds of this
process during trainer.train(), resource.getrusage(RUSAGE_SELF): every thread), process_wall_s / process_cpu_s (the
whole script: imports, loading, training, saving; comparable to the chat benchmark's per-command cpu_s / wall_s),
tokens = the non-pad tokens (prompt + answer, attention_mask == 1) of every batch the loss ran on, i.e. after the
on-policy swap, counted in compute_loss; the same thing alambic's tokens_per_s counts (all non-pad tokens of the
training batch, sampled answers included). tokens_per_s = tokens / train_wall_s. generation_s: seconds in the student's
sampling.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # GKDTrainer lives in trl.experimental
for _name in ("WANDB_DISABLED", "DISABLE_MLFLOW_INTEGRATION"):
    os.environ.setdefault(_name, "true")

RECREATE = (
    'python3 -m venv /tmp/trl-venv && echo $(.venv/bin/python -c "import site;print(site.getsitepackages()[0])") > '
    '$(/tmp/trl-venv/bin/python -c "import site;print(site.getsitepackages()[0])")/alambic-stack.pth && '
    "/tmp/trl-venv/bin/pip install --no-deps trl==1.16.0"
)
TRL_VERSION = "1.16.0"


def process_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def cpu_bf16_instructions() -> str | None:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return None
    return "AMX-BF16" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else None


def resolve_precision(requested: str) -> tuple[str, str]:
    """``(bf16 | fp32, why)``; auto follows alambic's CPU rule (native bf16 matrix instructions), not its speed check."""
    if requested != "auto":
        return requested, "requested"
    native = cpu_bf16_instructions()
    return ("bf16", f"auto: CPU with {native}") if native else ("fp32", "auto: no native bf16 on this CPU")


def load_records(path: Path, limit: int | None) -> list[dict]:
    """The chat records, reduced to {"messages": [...]} (TRL's conversational format; "options" and others dropped)."""
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        messages = record.get("messages")
        if not messages or messages[-1].get("role") != "assistant":
            sys.exit(f"{path}:{number}: expected a record with 'messages' ending in an assistant turn")
        records.append({"messages": [{"role": m["role"], "content": m["content"]} for m in messages]})
        if limit and len(records) >= limit:
            break
    return records


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="teacher model folder (runs/chat-bench/teacher/best)")
    parser.add_argument("--student", required=True, help="student model folder (runs/chat-bench/student-init)")
    parser.add_argument("--data", required=True, help="chat JSON lines (runs/chat-bench/data/train.jsonl)")
    parser.add_argument("--out", required=True, help="output folder: student/, trl.json, steps.jsonl")
    parser.add_argument("--trainer", choices=("gkd", "distillation"), default="gkd",
                        help="gkd: trl.experimental.gkd.GKDTrainer (lmbda mix, as alambic's on_policy.lmbda); "
                             "distillation: trl.DistillationTrainer (always on-policy, lmbda ignored)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--lmbda", type=float, default=0.5)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="sampling temperature (gkd: sampling only; distillation: sampling and loss)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup-ratio", type=float, default=0.1, help="as the benchmark's training.warmup_ratio")
    parser.add_argument("--grad-clip", type=float, default=5.0, help="alambic's training.grad_clip default")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="auto: bf16 on a CPU with AVX512-BF16 / AMX-BF16 (as alambic's auto), else fp32")
    parser.add_argument("--max-examples", type=int, default=0,
                        help="read only the first N records (0: all; the trainer draws steps x batch-size of them)")
    return parser.parse_args()


def main() -> None:
    process_start, process_cpu_start = time.perf_counter(), process_cpu_s()
    args = parse_args()
    try:
        import trl
    except ImportError:
        sys.exit(f"trl is not importable from {sys.executable}; run this with /tmp/trl-venv/bin/python, made by:\n"
                 f"  {RECREATE}")
    import datasets
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    if trl.__version__ != TRL_VERSION:
        print(f"warning: trl {trl.__version__}, this script was written against trl {TRL_VERSION}", file=sys.stderr)
    if torch.cuda.is_available():
        print("note: a GPU is visible; use_cpu=True keeps training on the CPU", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    precision, precision_why = resolve_precision(args.precision)
    bf16 = precision == "bf16"
    lmbda = args.lmbda if args.trainer == "gkd" else 1.0
    warmup_steps = int(args.warmup_ratio * args.steps)

    # ---- data and models -------------------------------------------------------------------------------------------
    records = load_records(Path(args.data), args.max_examples or None)
    if args.trainer == "gkd":
        dataset = datasets.Dataset.from_list(records)
    else:  # DistillationTrainer samples every answer: it reads the prompts only
        dataset = datasets.Dataset.from_list([{"prompt": r["messages"][:-1]} for r in records])
    student_dir, teacher_dir = Path(args.student), Path(args.teacher)
    tokenizer_dir = student_dir if (student_dir / "tokenizer_config.json").exists() else teacher_dir
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        sys.exit(f"{tokenizer_dir}: the tokenizer has no chat template")
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)  # fp32 master weights
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.bfloat16 if bf16 else torch.float32)
    teacher.eval().requires_grad_(False)

    # ---- measurement -----------------------------------------------------------------------------------------------
    steps_log = (out / "steps.jsonl").open("w")
    stats = {"tokens": 0, "answer_tokens": 0, "on_policy_steps": 0, "generation_s": 0.0, "micro_batches": 0}
    current: dict = {}

    class Measured:
        """Counts what each training step's loss ran on (after any on-policy swap) and times the sampling."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                if "attention_mask" in inputs:  # GKD: prompt + answer, left-padded, answers after EOS masked
                    tokens = int(inputs["attention_mask"].sum())
                    answer = int((inputs["labels"][:, 1:] != -100).sum())
                    length = int(inputs["input_ids"].shape[1])
                else:  # DistillationTrainer: prompt_mask + completion_mask
                    answer = int(inputs["completion_mask"].sum())
                    tokens = int(inputs["prompt_mask"].sum()) + answer
                    length = int(inputs["prompt_ids"].shape[1] + inputs["completion_ids"].shape[1])
                stats["tokens"] += tokens
                stats["answer_tokens"] += answer
                stats["micro_batches"] += 1
                current.update(tokens=current.get("tokens", 0) + tokens, loss_rows=answer, sequence_length=length,
                               num_items_in_batch=None if num_items_in_batch is None else float(num_items_in_batch))
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    def timed_generation(call):
        start = time.perf_counter()
        result = call()
        seconds = time.perf_counter() - start
        stats["generation_s"] += seconds
        current["on_policy"] = True
        current["generation_s"] = current.get("generation_s", 0.0) + seconds
        return result

    if args.trainer == "gkd":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        class Trainer(Measured, GKDTrainer):
            def generate_on_policy_outputs(self, model, inputs, generation_config):  # a staticmethod in GKDTrainer
                return timed_generation(lambda: GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config))
    else:
        from trl import DistillationConfig, DistillationTrainer

        class Trainer(Measured, DistillationTrainer):
            def _generate(self, prompts):
                return timed_generation(lambda: DistillationTrainer._generate(self, prompts))

    class StepLog(TrainerCallback):
        def on_step_begin(self, targs, state, control, **kwargs):
            current.clear()
            current["start"] = time.perf_counter()

        def on_step_end(self, targs, state, control, **kwargs):
            row = {"step": state.global_step, "seconds": time.perf_counter() - current.pop("start"),
                   "on_policy": bool(current.pop("on_policy", False)), **current}
            stats["on_policy_steps"] += row["on_policy"]
            steps_log.write(json.dumps(row) + "\n")
            steps_log.flush()

        def on_log(self, targs, state, control, logs=None, **kwargs):
            if logs:
                steps_log.write(json.dumps({"step": state.global_step, "log": logs}) + "\n")

    # ---- configuration ---------------------------------------------------------------------------------------------
    common = dict(
        output_dir=str(out / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=warmup_steps,
        optim="adamw_torch_fused", adam_beta1=0.9, adam_beta2=0.98, adam_epsilon=1e-6, weight_decay=0.0,
        max_grad_norm=args.grad_clip, seed=args.seed, data_seed=args.seed, use_cpu=True, bf16=bf16, fp16=False,
        activation_checkpointing=False, report_to="none", push_to_hub=False, save_strategy="no", eval_strategy="no",
        logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, temperature=args.temperature, beta=args.beta,
    )
    if args.trainer == "gkd":
        config = GKDConfig(**common, lmbda=lmbda, max_new_tokens=args.max_new_tokens, max_length=args.max_length,
                           seq_kd=False, disable_dropout=True)
        trainer = Trainer(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[StepLog()])
    else:
        config = DistillationConfig(**common, max_completion_length=args.max_new_tokens, disable_dropout=True,
                                    use_vllm=False)
        trainer = Trainer(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[StepLog()])

    # ---- training --------------------------------------------------------------------------------------------------
    print(f"trl {trl.__version__} {type(trainer).__mro__[2].__name__}: {args.steps} steps x {args.batch_size}, "
          f"precision {precision} ({precision_why}), {torch.get_num_threads()} torch threads, {cpu_model()}", flush=True)
    train_start, train_cpu_start = time.perf_counter(), process_cpu_s()
    result = trainer.train()
    train_wall, train_cpu = time.perf_counter() - train_start, process_cpu_s() - train_cpu_start
    steps_log.close()

    trainer.model.save_pretrained(out / "student")
    tokenizer.save_pretrained(out / "student")
    try:
        (out / "trainer").rmdir()  # save_strategy="no": the Trainer's output_dir stays empty
    except OSError:
        pass

    report = {
        "trainer": f"trl.{'experimental.gkd.GKDTrainer' if args.trainer == 'gkd' else 'DistillationTrainer'}",
        "steps": trainer.state.global_step,
        "train_wall_s": train_wall,
        "train_cpu_s": train_cpu,
        "tokens": stats["tokens"],
        "answer_tokens": stats["answer_tokens"],
        "tokens_per_s": stats["tokens"] / max(train_wall, 1e-9),
        "tokens_counted_as": "non-pad tokens (prompt + answer) of each training batch the loss ran on, after the "
                             "on-policy swap (counted in compute_loss); tokens_per_s = tokens / train_wall_s",
        "on_policy_steps": stats["on_policy_steps"],
        "generation_s": stats["generation_s"],
        "train_loss": result.training_loss,
        "precision": precision,
        "precision_reason": precision_why,
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "settings": {**vars(args), "lmbda_used": lmbda, "warmup_steps": warmup_steps, "records": len(records),
                     "tokenizer": str(tokenizer_dir), "optimizer": "adamw_torch_fused (0.9, 0.98), eps 1e-6, wd 0",
                     "scheduler": "linear", "gradient_accumulation_steps": 1, "use_cpu": True, "report_to": "none"},
        "student": str(out / "student"),
    }
    report["process_wall_s"] = time.perf_counter() - process_start
    report["process_cpu_s"] = process_cpu_s() - process_cpu_start
    (out / "trl.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("steps", "train_wall_s", "train_cpu_s", "tokens", "tokens_per_s",
                                              "on_policy_steps", "generation_s", "train_loss", "precision")}))
    print(f"wrote {out / 'trl.json'}, {out / 'steps.jsonl'} and {out / 'student'}")


if __name__ == "__main__":
    main()
