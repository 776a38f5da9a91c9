"""Choose the teacher layers a shallower student keeps by measuring, on a small calibration sample of the user's text,
what each layer is worth.

Methods (``--layers auto[:METHOD]``):

- ``greedy`` (default): drop, one at a time, the layer whose removal raises the calibration loss least, until the
  target depth. Each step evaluates every remaining layer's removal; within a budget of seconds, after which the
  remaining removals follow the influence ranking (and the selection says so).
- ``influence``: one forward pass; a layer's influence is ``1 - cos(input, output)`` of its hidden states, averaged
  over non-pad tokens; the ``depth`` most influential layers are kept.

Calibration loss (``criterion``): next-token cross-entropy for decoders; masked-LM cross-entropy with fixed masks for
encoders with an MLM head; for encoders without one (MiniLM), ``1 - cos`` between the candidate's and the teacher's
own final hidden states over non-pad tokens (the unmasked text), so the full teacher scores 0.

How a candidate runs: the teacher itself, with the contents of its transformer-layer ``ModuleList`` temporarily
swapped for the kept layers (and the config's layer count and per-layer settings to match), through the model's own
forward. No weights are copied and there is no per-architecture code: rotary embeddings, causal and extended masks are
built by the model as usual. Greedy also caches the hidden state entering each layer of the current model, so the
candidate without the layer at position ``p`` runs the embeddings and only the layers after ``p`` (a forward pre-hook
on the first of them replaces its input by the cached state); on average that halves the layer work of a step. The
cache is checked once against the plain swapped forward and switched off, with a note, if it does not match (a model
whose layers read more than the hidden state, e.g. per-layer embeddings).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from alambic import modeling
from alambic.errors import AlambicError, did_you_mean

METHODS = ("greedy", "influence")
CRITERIA = ("auto", "lm", "hidden")
MIN_CALIBRATION_TOKENS = 256
DEFAULT_CALIBRATION_TOKENS = 4096
DEFAULT_MAX_LENGTH = 128
_CRITERION_TEXT = {
    "causal": "next-token cross-entropy",
    "masked": "masked-LM cross-entropy (fixed masks)",
    "hidden": "hidden-state distance to the teacher (mean 1 - cos of final hidden states, non-pad tokens)",
}


DEFAULT_SPEC = "default"


def default_layers(kind: str, calibration_at_hand: bool) -> str:
    """What ``layers="default"`` means: measured selection (``auto:influence``, one forward pass) for a decoder when
    calibration text is at hand, else ``every-other``. On SmolLM2-135M -> 15 layers, influence starts at held-out
    perplexity 710 where every-other starts at 1.46M (docs/benchmarks.md): a decoder's few layers
    that change the hidden state most (here 0, 1, 24, 29) are not evenly spaced."""
    return "auto:influence" if kind == "causal" and calibration_at_hand else "every-other"


def parse_auto_spec(spec) -> str | None:
    """``"auto"`` / ``"auto:METHOD"`` -> the method; any other layer spec -> None."""
    if not isinstance(spec, str):
        return None
    text = spec.strip().lower()
    if text != "auto" and not text.startswith("auto:"):
        return None
    method = text.split(":", 1)[1].strip() if ":" in text else "greedy"
    if method not in METHODS:
        raise AlambicError(f"unknown layer selection method {method!r}{did_you_mean(method, METHODS)}; "
                           f"use auto:greedy or auto:influence")
    return method


def default_depth(num_teacher_layers: int) -> int:
    """The every-other count, ceil(N / 2)."""
    return math.ceil(num_teacher_layers / 2)


def check_depth(depth, num_teacher_layers: int) -> int:
    n = num_teacher_layers
    if depth is None:
        return default_depth(n)
    if isinstance(depth, bool) or int(depth) != depth:
        raise AlambicError(f"target depth must be a whole number of layers, got {depth!r}")
    if not 1 <= depth <= n:
        raise AlambicError(f"target depth {depth} is out of range: the teacher has {n} layers, give a depth from 1 to {n}")
    return int(depth)


def check_budget(budget) -> float | None:
    if budget is not None and not budget >= 0:
        raise AlambicError(f"selection budget must be >= 0 seconds, got {budget}")
    return None if budget is None else float(budget)


def describe_tokens(read: int, scored: int) -> str:
    """How much calibration text was measured: the tokens read, and those the loss scores when fewer (chat data
    scores assistant tokens only)."""
    return f"{read} tokens" + (f" ({scored} scored by the loss)" if scored != read else "")


def calibration_batches(specs, tokenizer, kind: str, *, max_tokens: int = DEFAULT_CALIBRATION_TOKENS,
                        max_length: int = DEFAULT_MAX_LENGTH, text_field: str = "text", split_documents: str = "file",
                        batch_size: int = 4, seed: int = 0) -> list[dict]:
    """A fixed calibration sample of about ``max_tokens`` tokens (the first sequences of ``specs``), in the batch
    contract; refused when the text has fewer than ``MIN_CALIBRATION_TOKENS`` scored tokens."""
    from alambic.config import DataConfig
    from alambic.data.pipeline import heldout_batches

    if not specs:
        raise AlambicError("measuring the teacher (auto layers, width pruning) needs calibration data: give --calibration-data PATH "
                           "(a few thousand tokens of your text, e.g. bbc-news:train)")
    if max_tokens < MIN_CALIBRATION_TOKENS:
        raise AlambicError(f"calibration sample of {max_tokens} tokens is too small: "
                           f"give at least {MIN_CALIBRATION_TOKENS} (a few thousand is typical)")
    specs = [str(s) for s in specs] if isinstance(specs, (list, tuple)) else [str(specs)]
    data_cfg = DataConfig(train=specs, max_length=max_length, eval_max_tokens=max_tokens, text_field=text_field,
                          split_documents=split_documents)
    try:
        batches = heldout_batches(specs, tokenizer, kind, data_cfg, batch_size, seed)
    except AlambicError as err:
        if "fewer than one block" in str(err) or "no chunk of the data" in str(err):
            raise AlambicError(f"calibration data {', '.join(specs)} is too short: measuring the teacher needs at least "
                               f"{max(MIN_CALIBRATION_TOKENS, max_length)} tokens; give more text") from None
        raise
    _check_enough(batches, ", ".join(specs))
    return batches


def _ready(calibration) -> bool:
    return isinstance(calibration, (list, tuple)) and bool(calibration) and all(isinstance(b, dict)
                                                                                for b in calibration)


def resolve_calibration(calibration, tokenizer, kind: str, *, max_tokens: int = DEFAULT_CALIBRATION_TOKENS,
                        max_length: int = DEFAULT_MAX_LENGTH, seed: int = 0) -> list[dict]:
    """Calibration batches from data specs (tokenised with ``tokenizer``) or batches already in the batch contract."""
    if _ready(calibration):
        batches = list(calibration)
        _check_enough(batches)
        return batches
    if calibration is not None and tokenizer is None:
        raise AlambicError("calibration data given as paths needs the teacher's tokenizer (tokenizer=...)")
    return calibration_batches(calibration, tokenizer, kind, max_tokens=max_tokens, max_length=max_length, seed=seed)


def describe_calibration(calibration) -> str:
    """The data specs in words ('' for ready batches)."""
    if calibration is None or _ready(calibration):
        return ""
    return ", ".join(map(str, calibration)) if isinstance(calibration, (list, tuple)) else str(calibration)


def _check_enough(batches, what=""):
    found = sum(len(b["token_positions"]) for b in batches)
    if found < MIN_CALIBRATION_TOKENS:
        raise AlambicError(f"calibration data{' ' + what if what else ''} gives only {found} tokens: measuring the teacher needs at least "
                           f"{MIN_CALIBRATION_TOKENS}; give more text")


@dataclass
class Candidate:
    layers: tuple[int, ...]
    removed: int | None
    loss: float


@dataclass
class LayerSelection:
    """What a selection chose and what it measured on the way."""

    layers: list[int]
    method: str
    criterion: str
    teacher_layers: int
    teacher_loss: float
    loss: float
    """Calibration loss of the chosen layers."""
    influence: list[float]
    """1 - cos(input, output) of each teacher layer, averaged over non-pad calibration tokens."""
    steps: list[list[Candidate]] = field(default_factory=list)
    """Greedy: the candidates evaluated at each step (the chosen one has the lowest loss)."""
    chosen: list[Candidate] = field(default_factory=list)
    """Greedy: the removal accepted at each completed step."""
    tokens: int = 0
    """Calibration tokens the loss scores (with chat data: assistant tokens only)."""
    read_tokens: int = 0
    """Non-pad calibration tokens the teacher reads (influence averages over these)."""
    seconds: float = 0.0
    fell_back: bool = False
    notes: list[str] = field(default_factory=list)
    calibration: str = ""

    def describe_tokens(self) -> str:
        return describe_tokens(self.read_tokens or self.tokens, self.tokens)

    @property
    def candidates_evaluated(self) -> int:
        return sum(len(step) for step in self.steps)

    def summary(self) -> str:
        lines = [f"layer selection: {self.method}, {len(self.layers)} of {self.teacher_layers} layers, "
                 f"{self.candidates_evaluated} candidates evaluated on {self.describe_tokens()} of calibration text "
                 f"in {self.seconds:.1f} s",
                 f"calibration loss ({self.criterion}): teacher {self.teacher_loss:.4g}, chosen layers {self.loss:.4g}",
                 f"chosen layers: {', '.join(map(str, self.layers))}"]
        return "\n".join(lines + [f"note: {note}" for note in self.notes])

    __str__ = summary

    def card(self, teacher: str, teacher_class: str = "") -> str:
        """A plain Hugging Face model card (README.md) recording the choice."""
        cls = f" ({teacher_class}, {self.teacher_layers} layers)" if teacher_class else f" ({self.teacher_layers} layers)"
        method = {"greedy": "greedy removal: drop, one at a time, the layer whose removal raises the calibration loss "
                            "least", "influence": "influence: keep the layers that change the hidden state most "
                            "(1 - cos of each layer's input and output, averaged over non-pad tokens)"}[self.method]
        lines = [
            "---", "library_name: transformers", "---", "",
            f"# A {len(self.layers)}-layer student of {teacher}", "",
            f"Initialised from the teacher `{teacher}`{cls} by copying the teacher layers listed below with the "
            "embeddings, final norm and LM head. Not yet distilled unless stated elsewhere.", "",
            "## Layer selection", "",
            f"- teacher: `{teacher}`{cls}",
            f"- method: {method}",
            f"- calibration: {self.describe_tokens()}" + (f" of `{self.calibration}`" if self.calibration else "")
            + f"; loss: {self.criterion}",
            f"- kept layers: {', '.join(map(str, self.layers))}",
            f"- calibration loss: teacher {self.teacher_loss:.4g}, kept layers {self.loss:.4g}",
        ]
        lines += [f"- note: {note}" for note in self.notes]
        if self.chosen:
            lines += ["", "| step | layers left | layer removed | calibration loss | candidates evaluated |",
                      "| ---: | ---: | ---: | ---: | ---: |"]
            for i, (cand, step) in enumerate(zip(self.chosen, self.steps), 1):
                lines.append(f"| {i} | {len(cand.layers)} | {cand.removed} | {cand.loss:.4g} | {len(step)} |")
        if self.influence:
            lines += ["", "Influence of each teacher layer (1 - cos): "
                      + ", ".join(f"{i}: {s:.3g}" for i, s in enumerate(self.influence))]
        return "\n".join(lines) + "\n"


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


class _Runner:
    """Runs the teacher with only some of its layers, by swapping its layer list, and measures a calibration loss."""

    def __init__(self, model, batches, criterion):
        self.model, self.body = model, modeling.lm_body(model)
        self.blocks = modeling.transformer_layers(model)
        self.modules = list(self.blocks)
        self.n = len(self.modules)
        self.kind = modeling.model_kind(model)
        self.criterion = criterion
        self.head = modeling.lm_head(model) if criterion == "lm" else None
        self.config = _text_config(model)
        self.per_layer = {name: value for name, value in vars(self.config).items()
                          if "layer" in name and isinstance(value, (list, tuple)) and len(value) == self.n}
        device = next(model.parameters()).device
        self.extra = {"use_cache": False} if self.kind == "causal" else {}
        self.batches = []
        for b in batches:
            ids = b["input_ids"]
            if criterion == "hidden" and self.kind == "masked" and len(b["lm_positions"]):
                ids = ids.flatten().index_put((b["lm_positions"],), b["lm_targets"].to(ids.dtype)).view_as(ids)
            self.batches.append({"input_ids": ids.to(device), "attention_mask": b["attention_mask"].to(device),
                                 "token_positions": b["token_positions"].to(device),
                                 "lm_positions": b["lm_positions"].to(device), "lm_targets": b["lm_targets"].to(device)})
        self.tokens = sum(len(b["token_positions" if criterion == "hidden" else "lm_positions"]) for b in self.batches)
        self.read_tokens = sum(len(b["token_positions"]) for b in self.batches)
        self.targets = None
        self.current_batch = 0

    @contextlib.contextmanager
    def _swapped(self, layers):
        layers = list(layers)
        saved = {name: getattr(self.config, name) for name in self.per_layer}
        count = modeling.num_layers(self.config)
        del self.blocks[:]
        self.blocks.extend(self.modules[i] for i in layers)
        for name, value in self.per_layer.items():
            setattr(self.config, name, type(value)(value[i] for i in layers))
        modeling.set_num_layers(self.config, len(layers))
        try:
            yield
        finally:
            del self.blocks[:]
            self.blocks.extend(self.modules)
            for name, value in saved.items():
                setattr(self.config, name, value)
            modeling.set_num_layers(self.config, count)

    @staticmethod
    def _hidden_of(args, kwargs):
        return args[0] if args else kwargs["hidden_states"]

    @torch.inference_mode()
    def run(self, layers, *, inject=None, record=False, influence=None) -> tuple[float, list | None]:
        """Calibration loss of the teacher running ``layers`` (teacher indices, in order).

        ``inject``: per-batch hidden states that replace the input of ``layers[0]`` (the embeddings still run, their
        output is discarded). ``record``: also return, per position and batch, the hidden state entering each layer.
        ``influence``: a list of per-layer [sum, count] accumulators of 1 - cos(input, output).
        """
        handles, recorded = [], [[] for _ in layers] if record else None
        if inject is not None:
            def replace(module, args, kwargs):
                state = inject[self.current_batch]
                if args:
                    return (state,) + tuple(args[1:]), kwargs
                return args, {**kwargs, "hidden_states": state}

            handles.append(self.modules[layers[0]].register_forward_pre_hook(replace, with_kwargs=True, prepend=False))
        if record or influence is not None:
            for position, index in enumerate(layers):
                def capture(module, args, kwargs, position=position):
                    captured[position] = self._hidden_of(args, kwargs)

                def compare(module, args, kwargs, output, position=position, index=index):
                    if influence is None:
                        return
                    out = output[0] if isinstance(output, tuple) else output
                    rows = self._rows(captured[position]), self._rows(out)
                    influence[index][0] += (1 - F.cosine_similarity(rows[0].float(), rows[1].float(), dim=-1)).sum().item()
                    influence[index][1] += len(rows[0])

                handles.append(self.modules[index].register_forward_pre_hook(capture, with_kwargs=True))
                handles.append(self.modules[index].register_forward_hook(compare, with_kwargs=True))
        total, count = 0.0, 0
        try:
            with self._swapped(layers):
                for b, batch in enumerate(self.batches):
                    self.current_batch, captured = b, {}
                    self._positions = batch["token_positions"]
                    hidden = self.body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                       **self.extra).last_hidden_state
                    if record:
                        for position in range(len(layers)):
                            recorded[position].append(captured[position])
                    loss, rows = self._loss(hidden, batch, b)
                    total += loss
                    count += rows
        finally:
            for handle in handles:
                handle.remove()
        value = total / max(count, 1)
        return (value if math.isfinite(value) else math.inf), recorded

    def _rows(self, hidden):
        return hidden.flatten(0, 1).index_select(0, self._positions)

    def _loss(self, hidden, batch, b):
        rows = hidden.flatten(0, 1)
        if self.criterion == "hidden":
            rows = rows.index_select(0, batch["token_positions"]).float()
            if self.targets is None:  # the first run is the full teacher: its own final states are the targets
                raise RuntimeError("hidden-distance targets not set")
            cos = F.cosine_similarity(rows, self.targets[b], dim=-1)
            return (1 - cos).double().sum().item(), len(rows)
        logits = self.head(rows.index_select(0, batch["lm_positions"])).float()
        return F.cross_entropy(logits, batch["lm_targets"], reduction="sum").double().item(), len(logits)

    @torch.inference_mode()
    def set_hidden_targets(self):
        self.targets = []
        for batch in self.batches:
            hidden = self.body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               **self.extra).last_hidden_state
            self.targets.append(hidden.flatten(0, 1).index_select(0, batch["token_positions"]).float())


def _resolve_criterion(model, criterion: str) -> str:
    if criterion not in CRITERIA:
        raise AlambicError(f"unknown selection criterion {criterion!r}{did_you_mean(criterion, CRITERIA)}; "
                           f"use one of: {', '.join(CRITERIA)}")
    if criterion == "auto":
        return "lm" if modeling.has_lm_head(model) else "hidden"
    if criterion == "lm" and not modeling.has_lm_head(model):
        raise AlambicError(f"{type(model).__name__} has no LM head, so it has no LM loss: use criterion hidden")
    return criterion


def select_layers(teacher, method: str = "greedy", *, depth: int | None = None, calibration=None, tokenizer=None,
                  budget: float | None = None, calibration_tokens: int = DEFAULT_CALIBRATION_TOKENS,
                  max_length: int = DEFAULT_MAX_LENGTH, criterion: str = "auto", seed: int = 0,
                  log=None) -> LayerSelection:
    """Teacher layers to keep for a ``depth``-layer student (default ceil(N/2)), measured on ``calibration``.

    ``calibration``: data specs (files, folders, globs, packaged corpora; tokenised with ``tokenizer``) or batches
    already in the batch contract. ``budget``: seconds for the greedy search; when they run out, the remaining
    removals follow the influence ranking. ``log``: called with each progress line (e.g. ``print``).
    """
    say = log or (lambda line: None)
    method = parse_auto_spec(f"auto:{method}") if method else "greedy"
    budget = check_budget(budget)
    n = modeling.num_layers(teacher.config)
    depth = check_depth(depth, n)
    kind = modeling.model_kind(teacher)
    criterion = _resolve_criterion(teacher, criterion)
    batches = resolve_calibration(calibration, tokenizer, kind, max_tokens=calibration_tokens,
                                  max_length=max_length, seed=seed)
    described = describe_calibration(calibration)

    start = time.perf_counter()
    was_training = teacher.training
    teacher.eval()
    runner = _Runner(teacher, batches, criterion)
    if criterion == "hidden":
        runner.set_hidden_targets()
    label = "hidden" if criterion == "hidden" else kind
    full = list(range(n))
    influence_sums = [[0.0, 0] for _ in range(n)]
    try:
        teacher_loss, cache = runner.run(full, record=method == "greedy", influence=influence_sums)
        influence = [s / max(c, 1) for s, c in influence_sums]
        say(f"calibration: {describe_tokens(runner.read_tokens, runner.tokens)}, "
            f"loss = {_CRITERION_TEXT[label]}; teacher ({n} layers): "
            f"{teacher_loss:.4f}")
        say("influence (1 - cos) per layer: " + ", ".join(f"{i}:{s:.3f}" for i, s in enumerate(influence)))
        ranking = sorted(range(n), key=lambda i: (-influence[i], i))
        selection = LayerSelection([], method, _CRITERION_TEXT[label], n, teacher_loss, math.nan, influence,
                                   tokens=runner.tokens, read_tokens=runner.read_tokens, calibration=described)
        if method == "influence" or depth == n:
            kept = sorted(ranking[:depth])
            selection.layers = kept
            selection.loss = teacher_loss if depth == n else runner.run(kept)[0]
            selection.steps = [[Candidate(tuple(kept), None, selection.loss)]]
            say(f"keep the {depth} most influential layers {','.join(map(str, kept))}: loss {selection.loss:.4f}")
        else:
            _greedy(runner, selection, cache, depth, budget, start, ranking, say)
    finally:
        teacher.train(was_training)
    selection.seconds = time.perf_counter() - start
    say(f"chosen layers: {', '.join(map(str, selection.layers))} (calibration loss {selection.loss:.4f}, teacher "
        f"{teacher_loss:.4f}; {selection.candidates_evaluated} candidates evaluated in {selection.seconds:.1f} s)")
    return selection


def _greedy(runner: _Runner, selection: LayerSelection, cache, depth, budget, start, ranking, say):
    current = list(range(runner.n))
    use_cache, checked = True, False
    removals = runner.n - depth
    while len(current) > depth:
        say(f"step {runner.n - len(current) + 1}/{removals}: {len(current)} -> {len(current) - 1} layers")
        step = []
        for p, layer in enumerate(current):
            if budget is not None and time.perf_counter() - start >= budget:
                _fall_back(runner, selection, current, depth, budget, ranking, say)
                return
            candidate = current[:p] + current[p + 1:]
            at = p if p < len(candidate) else p - 1  # without the last layer, re-run the one before it
            if use_cache and at > 0:
                loss = runner.run(candidate[at:], inject=cache[at])[0]
                if not checked:
                    plain = runner.run(candidate)[0]
                    checked = True
                    say(f"  (activation cache checked against the full forward: {loss:.6f} vs {plain:.6f})")
                    if not math.isclose(loss, plain, rel_tol=1e-4, abs_tol=1e-6):
                        use_cache = False
                        selection.notes.append(f"activation cache switched off: cached loss {loss:.6g} != full "
                                               f"forward {plain:.6g} for this architecture; every candidate ran in full")
                        loss = plain
            else:
                loss = runner.run(candidate)[0]
            step.append(Candidate(tuple(candidate), layer, loss))
            say(f"  without layer {layer:>3}: loss {loss:.4f}")
        best_p, best = min(enumerate(step), key=lambda item: (item[1].loss, item[0]))
        selection.steps.append(step)
        selection.chosen.append(best)
        say(f"  -> drop layer {best.removed} (loss {best.loss:.4f})")
        current = list(best.layers)
        if use_cache and best_p < len(current):  # states entering the layers after the removed one changed
            cache = cache[:best_p] + runner.run(current[best_p:], inject=cache[best_p] if best_p else None,
                                                record=True)[1]
        else:
            cache = cache[:len(current)]
        selection.layers, selection.loss = current, best.loss


def _fall_back(runner, selection, current, depth, budget, ranking, say):
    done = runner.n - len(current)
    left = len(current) - depth
    kept = sorted([i for i in ranking if i in current][:depth])
    loss = runner.run(kept)[0]
    partial = f" ({selection.candidates_evaluated} candidates evaluated)" if selection.steps else ""
    note = (f"budget of {budget:g} s ran out after {done} of {runner.n - depth} greedy removals{partial}; "
            f"the remaining {left} followed the influence ranking")
    selection.notes.append(note)
    selection.fell_back = True
    selection.layers, selection.loss = kept, loss
    say(f"note: {note}")
