"""Choose the student's shape for a budget: enumerate, discard by FLOPs, time on this machine, rank by divergence.

1. **Enumerate** the candidate shapes (:mod:`alambic.search.shapes`): depth x hidden width (head size kept) x FFN.
2. **Discard the hopeless by FLOPs**: a shape whose FLOP ratio to the teacher is below ``FLOP_SLACK`` (0.8) times
   the speed-up asked cannot meet it (measured speed-ups fall short of the FLOP ratio: fixed costs do not shrink).
   A latency budget becomes a speed-up once the teacher is timed: teacher latency / target latency.
3. **Time the rest**, largest first (parameters), each interleaved with the teacher in the budget's conditions
   (:mod:`alambic.search.timing`, cached per machine). A shape no larger in any dimension (depth, width, FFN) than one
   that meets the budget is *dominated*: it is not timed, as it can only be faster and worse. ``max_seconds`` bounds
   the timing; shapes left are listed as not timed.
4. **Rank** the shapes that meet the budget (at most ``max_finalists``, the largest of each depth) by the forward KL
   from the teacher on the calibration text after importance slicing of the widths and influence selection of the
   layers: the student each would start from. With ``search_steps`` K, each is first distilled K steps on three
   quarters of the calibration text and ranked on the last quarter (Minitron's short retraining: a shallow, wide
   student starts close to its teacher but learns less). The lowest divergence is chosen (ties: more parameters).

A size budget (``params``) skips the timing: parameters are counted.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from alambic import modeling
from alambic.errors import AlambicError
from alambic.evaluation.flops import head_type
from alambic.losses.divergences import divergence_rows
from alambic.losses.features import attention_relation_kl
from alambic.search.budget import PROMISE_TOLERANCE, Budget
from alambic.search.shapes import (Shape, enumerate_shapes, flops, instantiate, parameter_counts, shape_config,
                                   teacher_shape)
from alambic.search import timing as timing_mod
from alambic.search.timing import TimingCache, machine_key
from alambic.search.timing import timing_cache as timing_cache_for

FLOP_SLACK = 0.8
MAX_FINALISTS = 8
SEARCH_LR = 1e-4
"""Learning rate of the short distillation that re-ranks the finalists (``search_steps``)."""
HELD_OUT_SHARE = 0.25
"""With ``search_steps``, the last quarter of the calibration batches is held out to rank the trained finalists."""
SEARCH_FILE = "alambic-search.json"
"""Written next to the searched student's weights: the budget and every candidate, read by ``alambic report``."""


@dataclass
class Candidate:
    shape: Shape
    params: int
    flops: float
    flop_ratio: float
    timing: dict | None = None
    """latency_ms, teacher_ms, speedup, notch, rounds, cached."""
    divergence: float | None = None
    """Calibration divergence from the teacher as sliced (held-out batches when the finalists were trained)."""
    trained_divergence: float | None = None
    """The same after ``search_steps`` of distillation on the other batches."""
    status: str = "pending"
    """chosen, meets, misses, hopeless, dominated, out of time."""
    reason: str = ""

    def meets(self, budget: Budget) -> bool:
        timing = self.timing or {}
        return budget.met_by(speedup=timing.get("speedup"), latency_ms=timing.get("latency_ms"), params=self.params)

    @property
    def score(self) -> float | None:
        """What the finalists are ranked by: the divergence after the short distillation, else as sliced."""
        return self.trained_divergence if self.trained_divergence is not None else self.divergence

    def to_dict(self) -> dict:
        return {"shape": self.shape.to_dict(), "key": self.shape.key, "params": self.params, "flops": self.flops,
                "flop_ratio": self.flop_ratio, "timing": self.timing, "divergence": self.divergence,
                "trained_divergence": self.trained_divergence, "score": self.score, "status": self.status,
                "reason": self.reason}


@dataclass
class ShapeSearch:
    budget: Budget
    teacher: Shape
    teacher_params: int
    candidates: list[Candidate]
    chosen: Candidate
    layers: list[int]
    seconds: float
    machine: dict = field(default_factory=dict)
    search_steps: int = 0

    def rows(self) -> list[Candidate]:
        """The candidates worth a line: every one timed or ranked, the chosen first."""
        shown = [c for c in self.candidates if c.timing is not None or c.divergence is not None]
        return sorted(shown, key=lambda c: (c is not self.chosen, c.score is None,
                                            c.score if c.score is not None else 0, -c.params))

    def table(self) -> list[str]:
        trained = f" KL after {self.search_steps} steps |" if self.search_steps else ""
        lines = ["| shape | params (M) | GFLOPs/token | FLOP ratio | latency (ms) | speed-up | calibration KL |"
                 f"{trained} decision |", "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if trained else "")
                 + "---|"]
        for c in self.rows():
            t = c.timing or {}
            speedup = f"{t['speedup']:.2f}x +-{t['notch']:.2f}" if t else "-"
            after = "" if not trained else \
                (f" {c.trained_divergence:.4f} |" if c.trained_divergence is not None else " - |")
            lines.append(f"| {c.shape.label()} | {c.params / 1e6:.2f} | {c.flops / 1e9:.3f} | {c.flop_ratio:.2f}x | "
                         + (f"{t['latency_ms']:.2f}" if t else "-") + f" | {speedup} | "
                         + (f"{c.divergence:.4f}" if c.divergence is not None else "-")
                         + f" |{after} {c.status}{': ' + c.reason if c.reason else ''} |")
        untimed = {}
        for c in self.candidates:
            if c.timing is None and c.divergence is None:
                untimed[c.status] = untimed.get(c.status, 0) + 1
        if untimed:
            lines += ["", "Not timed: " + "; ".join(f"{n} {status}" for status, n in sorted(untimed.items()))
                      + f" (hopeless: a FLOP ratio below {FLOP_SLACK} x the speed-up asked; dominated: no larger "
                      "in any dimension than a shape that meets the budget)."]
        return lines

    def summary(self) -> str:
        c, t = self.chosen, self.chosen.timing or {}
        measured = f", measured {t['speedup']:.2f}x +-{t['notch']:.2f} ({t['latency_ms']:.1f} ms)" if t else ""
        after = (f", {c.trained_divergence:.4f} after {self.search_steps} steps" if self.search_steps else "")
        return (f"shape search: {self.chosen.shape.label()} (layers {','.join(map(str, self.layers))}), "
                f"{c.params / 1e6:.2f}M parameters{measured}, calibration KL {c.divergence:.4f}{after}; "
                f"budget {self.budget.describe()}; {sum(x.timing is not None for x in self.candidates)} shapes "
                f"timed, {sum(x.divergence is not None for x in self.candidates)} ranked in {self.seconds:.0f} s")

    def card(self) -> str:
        lines = ["", "## Shape search", "",
                 f"Budget: {self.budget.describe()}. The shape was searched by `alambic init-student` on "
                 f"{self.machine.get('cpu', 'this machine')} ({self.machine.get('cores')} cores): candidates timed "
                 "interleaved with the teacher (random weights), those meeting the budget ranked by the forward KL "
                 "from the teacher on calibration text after slicing"
                 + (f" and {self.search_steps} steps of distillation on it (a quarter held out)"
                    if self.search_steps else "") + ". Teacher: "
                 f"{self.teacher.label()}, {self.teacher_params / 1e6:.2f}M parameters.", ""]
        return "\n".join(lines + self.table()) + "\n"

    def to_json(self) -> str:
        return json.dumps({
            "version": 1, "budget": self.budget.to_dict(), "promise_tolerance": PROMISE_TOLERANCE,
            "teacher": self.teacher.to_dict(), "teacher_params": self.teacher_params, "machine": self.machine,
            "chosen": self.chosen.shape.key, "layers": self.layers, "seconds": self.seconds,
            "search_steps": self.search_steps,
            "candidates": [c.to_dict() for c in self.candidates]}, indent=1)


def searched_shape(folder) -> str | None:
    """The search file of a student folder built by a shape search (it travels with the student through
    distillation, so that ``alambic report`` can check the budget), or None."""
    from pathlib import Path

    path = Path(folder) / SEARCH_FILE
    return path.read_text(encoding="utf-8") if path.is_file() else None


def _dominated_by(candidate: Candidate, others: list[Candidate]) -> Candidate | None:
    s = candidate.shape
    return next((o for o in others if o.shape.depth >= s.depth and o.shape.hidden >= s.hidden
                 and o.shape.ffn >= s.ffn), None)


def _progress(total: int, enabled: bool, what: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=what, unit="shape", disable=not enabled, leave=False)


def _time_candidates(teacher, candidates: list[Candidate], budget: Budget, cache: TimingCache, *, deadline, say,
                     progress: bool) -> None:
    device, dtype = torch.device(budget.device), budget.dtype
    timed_teacher = teacher if (device.type, dtype) == ("cpu", torch.float32) else \
        instantiate(teacher, teacher.config, device, dtype)
    need = budget.speedup
    if need is None:  # a latency: the speed-up it implies on this machine
        teacher_ms = timing_mod.time_against_teacher(timed_teacher, timed_teacher, budget)["teacher_ms"]
        need = teacher_ms / budget.latency_ms
        say(f"teacher: {teacher_ms:.1f} ms at {budget.conditions()}; {budget.latency_ms:g} ms is a {need:.2f}x "
            "speed-up")
    for c in candidates:
        if c.flop_ratio < need * FLOP_SLACK:
            c.status, c.reason = "hopeless", f"FLOP ratio {c.flop_ratio:.2f}x"
    queue = sorted((c for c in candidates if c.status == "pending"), key=lambda c: (-c.params, c.shape))
    meeting: list[Candidate] = []
    with _progress(len(queue), progress, "timing shapes") as bar:
        for c in queue:
            bar.update(1)
            better = _dominated_by(c, meeting)
            if better is not None:
                c.status, c.reason = "dominated", f"{better.shape.label()} meets the budget"
                continue
            timing = cache.get(c.shape)
            if timing is None:
                if deadline is not None and time.perf_counter() > deadline:
                    c.status = "out of time"
                    continue
                model = instantiate(teacher, shape_config(teacher.config, c.shape), device, dtype)
                timing = timing_mod.time_against_teacher(timed_teacher, model, budget)
                del model
                cache.put(c.shape, timing)
            else:
                timing = {**timing, "cached": True}
            c.timing = timing
            if c.meets(budget):
                c.status = "meets"
                meeting.append(c)
            else:
                c.status = "misses"
                c.reason = (f"{timing['speedup']:.2f}x < {budget.speedup:g}x" if budget.speedup is not None else
                            f"{timing['latency_ms']:.1f} ms > {budget.latency_ms:g} ms")


def _finalists(candidates: list[Candidate], budget: Budget, limit: int) -> list[Candidate]:
    """The largest shape of each depth among those meeting the budget (undominated), evenly spread over the depths
    when there are more than ``limit``."""
    meeting = [c for c in candidates if c.status == "meets" or (not budget.timed and c.meets(budget))]
    if not budget.timed:  # sizes are counted, not timed: keep the undominated ones
        meeting = sorted(meeting, key=lambda c: (-c.params, c.shape))
        kept = []
        for c in meeting:
            better = _dominated_by(c, kept)
            if better is None:
                kept.append(c)
                c.status = "meets"
            else:
                c.status, c.reason = "dominated", f"{better.shape.label()} meets the budget"
        for c in candidates:
            if c.status == "pending":
                c.status, c.reason = "misses", f"{c.params / 1e6:.2f}M > {budget.params / 1e6:.4g}M parameters"
        meeting = kept
    best = {}
    for c in meeting:
        if c.shape.depth not in best or c.params > best[c.shape.depth].params:
            best[c.shape.depth] = c
    depths = sorted(best)
    if len(depths) > limit:
        depths = sorted({depths[round(i * (len(depths) - 1) / (limit - 1))] for i in range(limit)})
    chosen = [best[d] for d in depths]
    for c in meeting:
        if c not in chosen:
            c.reason = "not ranked: a larger shape of its depth was" if c.shape.depth in depths else \
                f"not ranked: beyond the {limit} depths ranked"
    return chosen


def _logit_rows(output, batch: dict) -> torch.Tensor:
    """The rows of class scores a divergence is taken over: per example (sequence classification), per real token
    (token tasks, language models: the scored positions when the batch names them), per start/end (QA)."""
    if getattr(output, "logits", None) is None:  # extractive QA: start and end positions over the tokens
        mask = batch["attention_mask"].bool()
        rows = [getattr(output, name).float().masked_fill(~mask.to(output.start_logits.device), -1e4)
                for name in ("start_logits", "end_logits")]
        return torch.cat(rows)
    logits = output.logits.float()
    if logits.dim() == 2:
        return logits
    flat = logits.flatten(0, 1)
    if "token_positions" in batch:
        return flat[batch["token_positions"].to(flat.device)]
    return flat[batch["attention_mask"].flatten().bool().to(flat.device)]


@dataclass
class TeacherTargets:
    """What the teacher says on each calibration batch, computed once for every finalist: its class-score rows
    (:func:`_logit_rows`), or the last hidden states of a bare encoder. Rows beyond ``FULL_PRECISION_ELEMENTS`` in all
    are kept in bfloat16 (a language model's vocabulary: SmolLM2's 4,096 calibration tokens are 200M scores), which
    moves a KL by about 1e-3, far below the gaps that rank shapes."""

    kind: str
    """logits or hidden."""
    values: list[torch.Tensor]


FULL_PRECISION_ELEMENTS = 64_000_000


@torch.no_grad()
def teacher_targets(teacher: torch.nn.Module, batches: list[dict]) -> TeacherTargets:
    device = modeling.model_device(teacher)
    values, head = [], None
    for batch in batches:
        out = teacher(**{k: v.to(device) for k, v in modeling.model_inputs(teacher, batch).items()},
                      output_hidden_states=True)
        if head is None:
            head = getattr(out, "logits", None) is not None or getattr(out, "start_logits", None) is not None
        values.append(_logit_rows(out, batch) if head else out.hidden_states[-1].float())
    if head and sum(v.numel() for v in values) > FULL_PRECISION_ELEMENTS:
        values = [v.to(torch.bfloat16) for v in values]
    return TeacherTargets("logits" if head else "hidden", values)


def _batch_divergence(target: torch.Tensor, kind: str, student: torch.nn.Module, batch: dict
                      ) -> tuple[torch.Tensor, int]:
    """The summed divergence of :func:`calibration_divergence` on one batch and its row count; differentiable with
    respect to the student."""
    device = modeling.model_device(student)
    s = student(**{k: v.to(device) for k, v in modeling.model_inputs(student, batch).items()},
                output_hidden_states=True)
    if kind == "hidden":
        mask = batch["attention_mask"].bool().to(device)
        valid = mask[:, :, None] & mask[:, None, :]
        count = int(mask.sum())
        return attention_relation_kl(s.hidden_states[-1], target, valid, 1) * count, count
    s_rows = _logit_rows(s, batch)
    log_p = F.log_softmax(target.float(), -1)
    return divergence_rows(log_p, F.log_softmax(s_rows, -1), "forward_kl").sum(), target.shape[0]


@torch.no_grad()
def calibration_divergence(teacher: torch.nn.Module, student: torch.nn.Module, batches: list[dict],
                           targets: TeacherTargets | None = None) -> float:
    """How far a student is from its teacher on the calibration batches, whatever its width:

    - a teacher with an output head: ``sum_rows KL(p_teacher || q_student) / rows`` (T = 1), rows as
      :func:`_logit_rows`;
    - a bare encoder (no head): MiniLM's relation KL of the last hidden states,
      ``sum_rows KL(softmax(H_t H_t^T / sqrt(d_t)) || softmax(H_s H_s^T / sqrt(d_s))) / rows`` over the real tokens
      (:func:`alambic.losses.features.attention_relation_kl`), which compares students of any width.

    ``targets``: the teacher's, computed once by :func:`teacher_targets` (else here).
    """
    targets = targets or teacher_targets(teacher, batches)
    total, rows = 0.0, 0
    for target, batch in zip(targets.values, batches):
        value, count = _batch_divergence(target, targets.kind, student, batch)
        total, rows = total + float(value), rows + count
    return total / max(rows, 1)


def distil_briefly(targets: TeacherTargets, student: torch.nn.Module, batches: list[dict], steps: int,
                   lr: float = SEARCH_LR) -> None:
    """``steps`` AdamW steps of the student on the divergence of :func:`calibration_divergence` (per-row mean of
    each batch), cycling through ``batches``: Minitron's short retraining, which ranks candidates better than
    their starting divergence (a shallow, wide student starts close but learns less)."""
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr)
    student.train()
    try:
        for step in range(steps):
            index = step % len(batches)
            value, count = _batch_divergence(targets.values[index], targets.kind, student, batches[index])
            (value / max(count, 1)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        student.eval()


def _layer_chooser(teacher, batches: list[dict]):
    """depth -> teacher layers: the most influential (one forward; :func:`select_layers` ``influence``) on language
    model calibration text, evenly spaced (first and last kept) on task batches."""
    from alambic.students.build import linspace_layers
    from alambic.students.selection import select_layers

    n = modeling.num_layers(teacher.config)
    if not all("lm_positions" in b for b in batches):
        return lambda depth: linspace_layers(depth, n)
    influence = select_layers(teacher, "influence", depth=1, calibration=batches).influence
    ranking = sorted(range(n), key=lambda i: (-influence[i], i))
    return lambda depth: sorted(ranking[:depth])


def search_shape(teacher: torch.nn.Module, budget: Budget, calibration: list[dict], *, align: int | None = None,
                 max_seconds: float | None = None, max_finalists: int = MAX_FINALISTS, timing_cache=None,
                 search_steps: int = 0, seed: int = 0, token_types: str = "auto", log=None, progress: bool = True):
    """Search the shape (module docstring) and build the chosen student. Returns ``(ShapeSearch, StudentInit)``;
    the student's ``search`` is the search, so its model card holds the candidate table.
    ``timing_cache``: the folder of the timing cache (default ``$ALAMBIC_CACHE/shape-timings``).
    ``search_steps``: distil every finalist that many steps on the calibration text (a quarter held out) and rank
    them by their divergence after it, as Minitron ranks its candidates (0: rank by the starting divergence)."""
    from alambic.students import pruning
    from alambic.students.build import init_student, with_task_head

    budget.check()
    teacher = with_task_head(teacher)
    if max_seconds is not None and max_seconds <= 0:
        raise AlambicError(f"--budget-seconds must be positive, got {max_seconds:g}")
    if search_steps < 0:
        raise AlambicError(f"--search-steps must be 0 or more, got {search_steps}")
    say = log or (lambda line: None)
    start = time.perf_counter()
    deadline = start + max_seconds if max_seconds is not None else None
    align = align or (64 if budget.device == "cpu" else 128)
    config = teacher.config
    head = head_type(teacher)
    t_shape = teacher_shape(config)
    t_flops = flops(config, budget.seq_len, head)
    t_params = sum(p.numel() for p in teacher.parameters())
    shapes = [shape for shape in enumerate_shapes(config, align) if shape != t_shape]
    params = parameter_counts(teacher, shapes)
    candidates = []
    for shape in shapes:
        f = flops(shape_config(config, shape), budget.seq_len, head)
        candidates.append(Candidate(shape, params[shape], f, t_flops / f))
    if not candidates:
        raise AlambicError(f"the teacher ({t_shape.label()}) has no smaller shape with widths in multiples of "
                           f"{align}: give the student's shape (--layers, --hidden-size) instead of a budget")
    say(f"shape search: {len(candidates)} candidate shapes of {t_shape.label()} for a budget of {budget.describe()}")
    machine = machine_key(budget)
    threads = torch.get_num_threads()
    if budget.threads:
        torch.set_num_threads(budget.threads)
    try:
        if budget.timed:
            cache = timing_cache_for(teacher, budget, timing_cache)
            _time_candidates(teacher, candidates, budget, cache, deadline=deadline, say=say, progress=progress)
    finally:
        torch.set_num_threads(threads)
    finalists = _finalists(candidates, budget, max_finalists)
    if not finalists:
        raise AlambicError(_nothing_meets(candidates, budget))
    train, held = calibration, calibration
    if search_steps:
        held_count = max(1, round(len(calibration) * HELD_OUT_SHARE))
        if len(calibration) - held_count < 1:
            raise AlambicError(f"--search-steps trains on calibration text and ranks on a held-out quarter of it, "
                               f"but it is only {len(calibration)} batch: raise --calibration-tokens")
        train, held = calibration[:-held_count], calibration[-held_count:]
    say(f"shape search: {len(finalists)} shapes meet the budget; ranking them by calibration divergence"
        + (f" after {search_steps} steps of distillation on calibration text" if search_steps else ""))
    choose_layers = _layer_chooser(teacher, calibration)
    importance = pruning.measure_importance(teacher, calibration)

    def build(c: Candidate):
        return init_student(teacher, layers=choose_layers(c.shape.depth), hidden_size=c.shape.hidden,
                            intermediate_size=c.shape.ffn, num_heads=c.shape.heads, seed=seed,
                            calibration_data=calibration, importance=importance, token_types=token_types)

    held_targets = teacher_targets(teacher, held)
    train_targets = teacher_targets(teacher, train) if search_steps else None
    best, built_best = None, None
    with _progress(len(finalists), progress, "ranking shapes") as bar:
        for c in finalists:
            built = build(c)
            c.divergence = calibration_divergence(teacher, built.model, held, held_targets)
            if search_steps:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    distil_briefly(train_targets, built.model, train, search_steps)
                c.trained_divergence = calibration_divergence(teacher, built.model, held, held_targets)
            bar.update(1)
            if best is None or (c.score, -c.params) < (best.score, -best.params):
                best, built_best = c, (None if search_steps else built)
    for c in finalists:
        if c is not best:
            c.reason = (f"KL after {search_steps} steps {c.score:.4f} > {best.score:.4f}" if search_steps else
                        f"calibration KL {c.score:.4f} > {best.score:.4f}")
    best.status, best.reason = "chosen", ""
    built_best = built_best or build(best)  # as sliced: the short distillation only ranked it
    result = ShapeSearch(budget, t_shape, t_params, candidates, best, list(built_best.layers),
                         time.perf_counter() - start, machine, search_steps)
    built_best.search = result
    return result, built_best


def _nothing_meets(candidates: list[Candidate], budget: Budget) -> str:
    if not budget.timed:
        smallest = min(candidates, key=lambda c: c.params)
        return (f"no student shape meets {budget.describe()}: the smallest, {smallest.shape.label()}, has "
                f"{smallest.params / 1e6:.2f}M parameters; raise --target-params")
    timed = [c for c in candidates if c.timing is not None]
    late = sum(c.status == "out of time" for c in candidates)
    if late and not any(c.status == "meets" for c in candidates):
        return (f"the shape search ran out of time before any shape met {budget.describe()}: {len(timed)} timed, "
                f"{late} left; raise --budget-seconds")
    if not timed:
        return (f"no student shape can meet {budget.describe()}: even the smallest has a FLOP ratio of "
                f"{max(c.flop_ratio for c in candidates):.2f}x; ask for less")
    fastest = max(timed, key=lambda c: c.timing["speedup"])
    t = fastest.timing
    return (f"no student shape meets {budget.describe()}: the fastest timed, {fastest.shape.label()}, runs "
            f"{t['speedup']:.2f}x ({t['latency_ms']:.1f} ms); ask for less")
