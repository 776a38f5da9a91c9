"""The one training loop every recipe runs on (accelerate: one process, or DDP over many with no code change, or
FSDP2 with ``training.distributed: fsdp``, see :mod:`alambic.engine.sharding`).

Reads top to bottom as one optimiser step:
1. take this process's ``grad_accum`` micro-batches of the global batch (indexed, so resume is exact);
2. count, on the host, the rows each loss term averages over, summed over the micro-batches and all processes;
3. per micro-batch: teacher targets under inference_mode, student loss normalised by those global counts, backward
   (gradients synchronised only on the last micro-batch);
4. clip, step, schedule; every ``log_every`` steps one host synchronisation for metrics and the NaN check;
   every ``save_every`` steps an atomic checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
from accelerate.utils import broadcast_object_list, gather_object
from tqdm.auto import tqdm

from alambic.cache import atomic_write_text
from alambic.config import TrainingConfig
from alambic.engine import sharding
from alambic.engine.disk import DiskGuard, estimated_checkpoint_bytes
from alambic.engine.checkpoint import (checkpoint_path, latest_checkpoint, load_checkpoint, resume_checkpoint,
                                       rng_state, save_checkpoint, save_model_folder)
from alambic.engine.master_weights import MasterWeights
from alambic.engine.host_memory import keep_freed_memory
from alambic.engine.precision import PrecisionChoice, choose_precision
from alambic.errors import AlambicError


class BatchSource(Protocol):
    """Micro-batches addressed by a global index, so any process can fetch its share and a resumed run the rest."""

    def __call__(self, index: int) -> dict[str, torch.Tensor]: ...


class Recipe(Protocol):
    """What the loop needs from a distillation method."""

    objective: torch.nn.Module
    """Holds the student (and any trainable projection); ``forward(batch, targets, num_items) -> (loss, terms)``."""
    student: torch.nn.Module
    teacher: torch.nn.Module | None
    """Frozen, outside the objective (DDP does not wrap it); the loop puts it on the training device, in bf16 when
    training in bf16 (it only runs forward)."""

    def row_counts(self, batch: dict) -> dict[str, int]:
        """Rows each loss term averages over in this micro-batch, read from the batch on the host."""

    def teacher_targets(self, batch: dict) -> dict:
        """Everything the losses need from the teacher, computed without autograd."""


class NonFiniteLoss(AlambicError):
    pass


@dataclass
class TrainResult:
    step: int
    metrics: dict
    student: torch.nn.Module | None = None
    """Under FSDP, the student gathered whole on the main process (the one to export); else None: export the
    recipe's student as it is."""


def _lr_lambda(cfg: TrainingConfig) -> Callable[[int], float]:
    warmup = int(cfg.warmup_ratio * cfg.max_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, cfg.max_steps - warmup)
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, 1.0 - progress)

    return factor


def build_optimizer(parameters, cfg: TrainingConfig) -> torch.optim.Optimizer:
    """AdamW over ``parameters`` (a model's, or its fp32 masters), fused (one kernel updates every tensor, on CPU and
    GPU alike: the per-tensor loop of the default implementation cost ~15% of a CPU step); biases and norm weights
    (1-D tensors) are not decayed."""
    params = [p for p in parameters if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=True)


def apply_gradients(optimizer, master: MasterWeights | None, parameters, grad_clip: float,
                    clip=torch.nn.utils.clip_grad_norm_) -> torch.Tensor:
    """The update of one optimiser step, once the backward passes are done: the gradients into the fp32 masters
    (bf16 with master weights), clipping to ``grad_clip`` (0: none), the optimiser step, then the masters rounded back
    into the model (or the gradients released). Returns the gradient norm before clipping, computed even without
    clipping: a non-finite gradient must stop the run before it is saved. ``clip``: accelerate's clip_grad_norm_
    in the training loop."""
    if master:
        master.gradients_in()
    grad_norm = clip(master.trainable_masters() if master else parameters, grad_clip or float("inf"))
    optimizer.step()
    if master:
        master.weights_out()  # the masters' fp32 gradients stay allocated: the next step overwrites them
    else:
        optimizer.zero_grad(set_to_none=True)
    return grad_norm


def agreed_precision(requested: str) -> PrecisionChoice:
    """``choose_precision`` decided once, on the main process, and given to every process: ``auto`` on a CPU times
    bf16 against fp32, and two processes timing on a busy machine could choose differently."""
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # under torchrun: joins the process group
    choice = [None]
    if state.is_main_process:
        try:
            choice = [choose_precision(requested)]
        except AlambicError as error:  # e.g. a bad ALAMBIC_CPU_BF16: every process stops with it
            choice = [error]
    if state.num_processes > 1:
        broadcast_object_list(choice)
    if isinstance(choice[0], AlambicError):
        raise choice[0]
    return choice[0]


def make_accelerator(cfg: TrainingConfig):
    """An accelerate ``Accelerator`` for the precision ``cfg.mixed_precision`` resolves to (printed), and that
    precision. Made before the data where one process writes files the others read, or stops them all."""
    from accelerate import Accelerator

    precision = agreed_precision(cfg.mixed_precision)
    # cpu=True is what makes accelerate honour torchrun's WORLD_SIZE on a machine without GPUs (DDP over gloo).
    accelerator = Accelerator(mixed_precision=precision.accelerate(cfg.distributed == "fsdp"),
                              cpu=not torch.cuda.is_available())
    check_engine(accelerator.distributed_type)
    accelerator.print(f"mixed precision: {precision.describe()}")
    if accelerator.device.type == "cpu" and keep_freed_memory():
        accelerator.print("host memory: freed blocks kept for reuse, so steps do not page-fault their buffers back in "
                          "(ALAMBIC_KEEP_FREED_MEMORY=0 returns them to the system)")
    return accelerator, precision


def check_engine(distributed_type) -> None:
    """Refuse accelerate's own sharding plugins: alambic's sharding is its FSDP2 set-up (``training.distributed:
    fsdp``, :mod:`alambic.engine.sharding`), whose checkpoints and export it knows how to gather."""
    name = getattr(distributed_type, "value", str(distributed_type))
    if name in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise AlambicError(
            f"accelerate is configured for {name}; alambic shards with its own FSDP2 set-up instead: launch with "
            "`accelerate launch --multi_gpu` (or torchrun) and set training.distributed=fsdp"
        )


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per logged step) and TensorBoard when it is installed; main process only."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.tensorboard = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line).get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))
        elif resume_step is None:
            self.path.unlink(missing_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        except ImportError:
            pass

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


class Evaluator:
    """Evaluation at the start, every ``eval_every`` steps and at the end; keeps the best student by one metric in
    ``RUN/best`` and says when ``early_stopping_patience`` evaluations in a row brought no improvement."""

    def __init__(self, evaluate, cfg: TrainingConfig, run_dir: Path, tokenizer, log: "MetricsLog", main: bool,
                 whole_student=None):
        self.evaluate, self.cfg, self.run_dir, self.tokenizer, self.log, self.main = evaluate, cfg, run_dir, tokenizer, log, main
        self.whole_student = whole_student or (lambda student: student)
        """The student to save as the best: itself, or (FSDP) gathered whole on the main process by every process."""
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.stale = 0
        self.last_step: int | None = None

    def due(self, step: int) -> bool:
        return self.evaluate is not None and bool(self.cfg.eval_every) and step % self.cfg.eval_every == 0

    def __call__(self, step: int, student: torch.nn.Module) -> dict:
        self.last_step = step
        results = self.evaluate(student)
        metrics = {f"eval/{k}": v for k, v in results.items()}
        name = self.cfg.best_metric
        if name is not None:
            if name not in results:
                raise AlambicError(f"training.best_metric {name!r} is not among the evaluation's metrics: {', '.join(results)}")
            value = float(results[name])
            better = self.best_value is None or (value > self.best_value if self.cfg.best_metric_mode == "max"
                                                 else value < self.best_value)
            if better:
                self.best_value, self.best_step, self.stale = value, step, 0
                whole = self.whole_student(student)
                if self.main:
                    save_model_folder(whole, self.tokenizer, self.run_dir / "best")
            else:
                self.stale += 1
            metrics[f"eval/best_{name}"] = self.best_value
        self.log.write({"step": step, **metrics})
        return metrics

    @property
    def should_stop(self) -> bool:
        patience = self.cfg.early_stopping_patience
        return bool(patience) and self.stale >= patience

    def state_dict(self) -> dict:
        return {"best_value": self.best_value, "best_step": self.best_step, "stale": self.stale}

    def load_state_dict(self, state: dict) -> None:
        self.best_value, self.best_step, self.stale = (state.get(k) for k in ("best_value", "best_step", "stale"))
        self.stale = self.stale or 0


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def train(
    recipe: Recipe,
    batches: BatchSource,
    cfg: TrainingConfig,
    run_dir: Path,
    *,
    accelerator=None,
    precision: PrecisionChoice | None = None,
    tokenizer=None,
    resume: bool = False,
    evaluate: Callable[[torch.nn.Module], dict] | None = None,
    progress: bool = True,
    label: str = "distill",
) -> TrainResult:
    """Train ``recipe.objective`` for ``cfg.max_steps`` optimiser steps; returns the final step and last metrics.
    ``precision``: the resolved ``cfg.mixed_precision`` (given with the ``accelerator`` made for it);
    ``label``: the progress bar's name (the verb running it)."""
    if accelerator is None:
        accelerator, precision = make_accelerator(cfg)
    elif precision is None:
        precision = PrecisionChoice(accelerator.mixed_precision.replace("bf16", "bf16-autocast"), "as given")
    run_dir = Path(run_dir)
    torch.manual_seed(cfg.seed)
    processes, rank, accum = accelerator.num_processes, accelerator.process_index, cfg.grad_accum
    fsdp = cfg.distributed == "fsdp"
    if getattr(recipe, "teacher", None) is not None:
        recipe.teacher.to(accelerator.device)
        if precision.bf16:
            recipe.teacher.to(torch.bfloat16)
    recipe.objective.to(accelerator.device)
    master = MasterWeights(recipe.objective) if precision.master_weights(fsdp) else None
    # where the student is read or written as a model (evaluation, checkpoints), its weights are the fp32 masters
    full_precision = master.full_precision if master else contextlib.nullcontext
    if fsdp:
        sharding.check_sharding(recipe, processes)
        sharding.shard(recipe, bf16=precision.bf16, shard_teacher=cfg.fsdp_teacher == "shard")
        optimizer = build_optimizer(recipe.objective.parameters(), cfg)  # over the shards
        objective = recipe.objective
        if evaluate is not None:
            evaluate = _gathered_for(evaluate, objective)
    else:
        optimizer = build_optimizer(master.trainable_masters() if master else recipe.objective.parameters(), cfg)
        objective, optimizer = accelerator.prepare(recipe.objective, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    student = recipe.student

    step, loop_state = 0, {}
    if resume:
        load = functools.partial(_load_sharded if fsdp else load_checkpoint, processes=processes)
        with full_precision():
            checkpoint, step, loop_state = resume_checkpoint(run_dir, accelerator.unwrap_model(objective), student,
                                                             optimizer, scheduler, rank, say=accelerator.print,
                                                             load=load)
        accelerator.print(f"resumed from {checkpoint} at step {step}")
    log = MetricsLog(run_dir, accelerator.is_main_process, step if resume else None)
    whole = (lambda model: sharding.whole_student(objective, model, accelerator.is_main_process)) if fsdp else None
    evaluator = Evaluator(evaluate, cfg, run_dir, tokenizer, log, accelerator.is_main_process, whole)
    evaluator.load_state_dict(loop_state.get("evaluation", {}))

    guard = DiskGuard(run_dir, estimated_checkpoint_bytes(recipe.objective), cfg.min_free_disk_mb,
                      cfg.keep_checkpoints)
    stop_everywhere(accelerator, guard.problem("starting") if accelerator.is_main_process else None)

    metrics: dict = {}
    if evaluate is not None and step == 0:
        with full_precision():
            metrics = evaluator(0, student)
        accelerator.print("held-out before training: " + ", ".join(
            f"{k[5:]} {v:.4g}" for k, v in metrics.items() if k.startswith("eval/") and "best_" not in k))

    device = accelerator.device
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    term_sums: dict[str, torch.Tensor] = {}
    # Throughput counts real tokens (non-pad), so padding never flatters it; ``tokens`` is the running total.
    tokens_seen = int(loop_state.get("tokens", 0))
    window_tokens, window_steps, window_start = 0, 0, time.perf_counter()
    # A batch source that samples (on-policy distillation) says how long it spent generating.
    window_generation = getattr(batches, "generation_seconds", None)
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not (progress and accelerator.is_main_process),
               desc=label, unit="step", dynamic_ncols=True)
    objective.train()
    while step < cfg.max_steps:
        first = (step * processes + rank) * accum
        micro_batches = [batches(first + a) for a in range(accum)]
        local_counts = {}
        for batch in micro_batches:
            for term, count in recipe.row_counts(batch).items():
                local_counts[term] = local_counts.get(term, 0) + count
        terms = list(local_counts)
        counts = torch.tensor([local_counts[t] for t in terms], dtype=torch.float32, device=device)
        if processes > 1:
            counts = accelerator.reduce(counts, reduction="sum")
        num_items = dict(zip(terms, counts))

        for a, batch in enumerate(micro_batches):
            window_tokens += int(batch["token_positions"].numel())
            batch = _to_device(batch, device)
            with accelerator.autocast():
                targets = recipe.teacher_targets(batch)
            if fsdp:
                sync = sharding.gradient_sync(objective, a == accum - 1)
            else:
                sync = contextlib.nullcontext() if a == accum - 1 else accelerator.no_sync(objective)
            with sync:
                loss, loss_terms = objective(batch, targets, num_items)
                # DDP averages gradients over processes; each loss is already a share of the global mean.
                accelerator.backward(loss * processes)
            nonfinite |= ~torch.isfinite(loss.detach())
            for name, value in loss_terms.items():
                term_sums[name] = term_sums.get(name, 0.0) + value.detach().float()
            term_sums["loss"] = term_sums.get("loss", 0.0) + loss.detach().float()

        grad_norm = apply_gradients(optimizer, master, objective.parameters(), cfg.grad_clip,
                                    clip=accelerator.clip_grad_norm_)
        grad_norm = sharding.local_norm(grad_norm) if fsdp else grad_norm
        nonfinite |= ~torch.isfinite(grad_norm)
        scheduler.step()
        step += 1
        window_steps += 1
        bar.update(1)

        if evaluator.due(step) and step < cfg.max_steps:
            with full_precision():
                evaluation = evaluator(step, student)
            objective.train()
            bar.set_postfix_str(", ".join(f"{k[5:]} {v:.4g}" for k, v in evaluation.items()))
        stopping = evaluator.should_stop
        if stopping:
            accelerator.print(f"early stop at step {step}: no better {cfg.best_metric} in {cfg.early_stopping_patience} "
                              f"evaluations (best {evaluator.best_value:.4g} at step {evaluator.best_step})")
        last = step == cfg.max_steps or stopping
        if step % cfg.log_every == 0 or step % cfg.save_every == 0 or last:
            if bool(nonfinite.item()):
                good = latest_checkpoint(run_dir)
                where = f"the last good checkpoint is {good}; " if good else "no checkpoint was written yet; "
                raise NonFiniteLoss(
                    f"the loss became NaN or infinite before step {step}: stopped without saving; {where}"
                    f"lower training.lr (now {cfg.lr}) or check the data, then rerun (with --resume to continue)"
                )
            values = torch.stack([term_sums[k] for k in term_sums] + [torch.tensor(float(window_tokens), device=device)])
            if processes > 1:
                values = accelerator.reduce(values, reduction="sum")
            *values, window_tokens = values.tolist()
            elapsed = time.perf_counter() - window_start
            metrics = {f"loss/{k}" if k != "loss" else "loss": v / window_steps for k, v in zip(term_sums, values)}
            tokens_seen += int(window_tokens)
            metrics.update(lr=scheduler.get_last_lr()[0], tokens_per_s=window_tokens / max(elapsed, 1e-9),
                           tokens=tokens_seen)
            metrics["grad_norm"] = float(grad_norm)
            if window_generation is not None:
                metrics["generate_share"] = (batches.generation_seconds - window_generation) / max(elapsed, 1e-9)
                window_generation = batches.generation_seconds
            log.write({"step": step, **metrics})
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            term_sums, window_tokens, window_steps, window_start = {}, 0, 0, time.perf_counter()
            if step % cfg.save_every == 0 or last:
                # Each process's RNG (dropout) goes into the checkpoint, so every process resumes where it stopped.
                rng_states = gather_object([rng_state()]) if processes > 1 else [rng_state()]
                loop_state = {"evaluation": evaluator.state_dict(), "tokens": tokens_seen}
                stop_everywhere(accelerator, guard.problem(f"saving the checkpoint of step {step}")
                                if accelerator.is_main_process else None)
                accelerator.wait_for_everyone()
                if fsdp:  # every process writes its shards
                    sharding.save_sharded_checkpoint(run_dir, step, objective, student, optimizer, scheduler,
                                                     tokenizer, cfg.keep_checkpoints, loop_state, rng_states,
                                                     accelerator.is_main_process, processes)
                elif accelerator.is_main_process:
                    with full_precision():
                        save_checkpoint(run_dir, step, accelerator.unwrap_model(objective), student, optimizer,
                                        scheduler, tokenizer, cfg.keep_checkpoints, loop_state, rng_states)
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    line = guard.saved(checkpoint_path(run_dir, step))
                    if line:
                        tqdm.write(line)
            if stopping:
                break
    bar.close()
    if master:
        master.release()  # training is over: the student is its fp32 masters from here on
    if evaluate is not None and evaluator.last_step != step:
        metrics.update(evaluator(step, student))
    log.close()
    return TrainResult(step=step, metrics=metrics, student=whole(student) if fsdp else None)


def stop_everywhere(accelerator, problem: str | None) -> None:
    """Raise ``problem`` (the main process's finding) on every process together, so none waits at a barrier for a
    process that has stopped."""
    if accelerator.num_processes > 1:
        shared = [problem]
        broadcast_object_list(shared)
        problem = shared[0]
    if problem is not None:
        raise AlambicError(problem)


def _gathered_for(evaluate, objective):
    """``evaluate`` run with the sharded objective's root parameters gathered (the student's forward needs them).
    The main process's results are the ones every process acts on: saving the best student is a collective, so the
    processes must not disagree about it over a rounding difference."""
    from accelerate.utils import broadcast_object_list

    def run(model):
        with sharding.gathered(objective):
            results = [evaluate(model)]
        broadcast_object_list(results)
        return results[0]
    return run


def _load_sharded(path, objective, student, optimizer, scheduler, process_index, *, processes):
    return sharding.load_sharded_checkpoint(path, objective, optimizer, scheduler, process_index, processes)
