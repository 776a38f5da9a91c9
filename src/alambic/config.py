"""Declarative run configuration: one dataclass tree fed by YAML, command-line overrides and Python alike.

Everything is validated here, before any model or data loads, so a typo costs a second, not a teacher load.
Overrides use dotted keys (``loss.temperature=4``); values are parsed as YAML scalars (``4`` is an int, ``[a, b]`` a list).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from alambic.errors import AlambicError, did_you_mean
from alambic.ranges import ABOVE_ZERO, FRACTION, NON_NEGATIVE, POSITIVE, UNIT_INTERVAL, Range, check_ranges


SELECTION_METHODS = ("greedy", "influence")
DATA_FORMATS = ("auto", "text", "chat")
DECODER_TASK_FORMATS = {"chat": "chat", "lm": "text"}
"""``finetune --task`` values that fine-tune a decoder by next-token cross-entropy, with the data.format each reads."""
WIDTH_INITS = ("importance", "random")


TOKEN_TYPES = ("auto", "keep", "drop")
"""What a student does with BERT-style segment embeddings (see :func:`alambic.students.init_student`)."""


@dataclass
class StudentConfig:
    init: str | None = None
    """An existing student model folder to train; when empty the student is built from the teacher."""
    layers: str = "default"
    """Teacher layers the student keeps: default (auto:influence for decoders, every-other for encoders), every-other (ceil(N/2) evenly spaced, first and last kept), even, odd, linspace:K, a list such as 0,2,4,7,9,11, or auto[:greedy|influence] (chosen by measuring on student.calibration_data, else the training data)."""
    hidden_size: int | None = None
    """Narrower hidden width; empty keeps the teacher's."""
    intermediate_size: int | None = None
    """Narrower feed-forward width; empty keeps the teacher's."""
    num_heads: int | None = None
    """Fewer attention heads; empty keeps the teacher's head size (fewer heads when hidden_size shrinks)."""
    allow_wider: bool = False
    """Allow a student wider than its teacher (hidden, FFN or heads above the teacher's); refused otherwise."""
    width_init: str = "importance"
    """How narrower widths start: importance (the teacher's most important channels, heads and FFN neurons, measured on student.calibration_data or else the training data; Minitron) or random."""
    save_init: bool = False
    """Also save the student as initialised, before training, to OUT/student-init."""
    calibration_data: list[str] = field(default_factory=list)
    """Text that layers=auto and width pruning measure the teacher on (files, folders, globs or packaged corpora such as bbc-news:train); empty: the training data."""
    depth: int | None = None
    """Layers a layers=auto student keeps; empty: ceil(N/2), the every-other count."""
    selection_budget: float | None = None
    """Seconds for the greedy layer search; after that the remaining removals follow the influence ranking."""
    calibration_tokens: int = 4096
    """Tokens of calibration_data measured by layers=auto (at least 256)."""
    token_types: str = "auto"
    """BERT-style segment embeddings: drop (DistilBERT: type 0 only), keep, or auto (keep for task teachers only)."""
    target_speedup: float | None = None
    """A budget instead of a shape: the student runs this many times faster than the teacher (shape search)."""
    target_latency_ms: float | None = None
    """A budget instead of a shape: a forward of the student takes at most this many milliseconds."""
    target_params: int | None = None
    """A budget instead of a shape: the student has at most this many parameters."""
    budget_batch_size: int = 1
    """Batch of the forward the budget is timed on."""
    budget_seq_len: int = 128
    """Tokens of the forward the budget is timed on."""
    budget_device: str = "cpu"
    """Where the budget is timed: cpu or cuda."""
    budget_threads: int | None = None
    """torch CPU threads while timing the budget; empty: torch's choice."""
    budget_precision: str | None = None
    """float32 or bfloat16; empty: float32 on CPU, bfloat16 on GPU."""
    budget_seconds: float | None = None
    """Time limit of the shape search's timing; empty: none."""
    timing_cache: str | None = None
    """Folder of the per-machine timing cache; empty: $ALAMBIC_CACHE/shape-timings."""
    search_steps: int = 0
    """Distil each shape that meets the budget this many steps on the calibration text and rank them after it."""

    RANGES: typing.ClassVar[dict] = {
        "hidden_size": POSITIVE, "intermediate_size": POSITIVE, "num_heads": POSITIVE, "depth": POSITIVE,
        "selection_budget": NON_NEGATIVE, "calibration_tokens": Range(256), "budget_seconds": ABOVE_ZERO,
        "target_speedup": Range(1, low_open=True), "target_latency_ms": ABOVE_ZERO, "target_params": POSITIVE,
        "budget_batch_size": POSITIVE, "budget_seq_len": POSITIVE, "budget_threads": POSITIVE,
        "search_steps": NON_NEGATIVE,
    }

    def validate(self):
        if self.token_types not in TOKEN_TYPES:
            raise AlambicError(f"student.token_types must be one of {', '.join(TOKEN_TYPES)}, got {self.token_types!r}")
        check_ranges(self, "student.")
        text = str(self.layers).strip().lower()
        auto = text == "auto" or text.startswith("auto:")
        if text == "default":
            pass  # resolved once the teacher's kind is known (alambic.students.selection.default_layers)
        elif auto:
            method = text.split(":", 1)[1].strip() if ":" in text else "greedy"
            if method not in SELECTION_METHODS:
                raise AlambicError(f"student.layers={self.layers}: unknown selection method {method!r}"
                                   f"{did_you_mean(method, SELECTION_METHODS)}; use auto:greedy or auto:influence")
        else:
            used = [name for name in ("depth", "selection_budget") if getattr(self, name) is not None]
            if self.calibration_data and not self.narrows():
                used.append("calibration_data")
            if used:
                raise AlambicError(f"student.{used[0]} only applies to student.layers=auto[:METHOD]"
                                   f"{' or a narrower student' if used[0] == 'calibration_data' else ''}; "
                                   f"set student.layers=auto or drop student.{used[0]}")
        if self.width_init not in WIDTH_INITS:
            raise AlambicError(f"student.width_init must be importance or random, got {self.width_init!r}")
        budget = self.budget()
        if budget is not None:
            target = next(f"student.{name}" for name in ("target_speedup", "target_latency_ms", "target_params")
                          if getattr(self, name) is not None)
            shape = [f"student.{name}" for name in ("init", "hidden_size", "intermediate_size", "num_heads", "depth")
                     if getattr(self, name) is not None]
            shape += ["student.layers"] if text != "default" else []
            if shape:
                raise AlambicError(f"give the student's shape or a budget, not both: drop {shape[0]} (the search "
                                   f"chooses it for {target}) or drop {target}")
        else:
            stray = next((name for name in ("budget_seconds", "search_steps") if getattr(self, name)), None)
            if stray:
                raise AlambicError(f"student.{stray} applies to a shape search: set student.target_speedup, "
                                   "target_latency_ms or target_params, or drop it")

    def budget(self):
        """The :class:`alambic.search.Budget` of a searched student (checked), or None when the shape is given."""
        if all(getattr(self, name) is None for name in ("target_speedup", "target_latency_ms", "target_params")):
            return None
        from alambic.search.budget import Budget

        return Budget(self.target_speedup, self.target_latency_ms, self.target_params, self.budget_batch_size,
                      self.budget_seq_len, self.budget_device, self.budget_threads, self.budget_precision).check()

    def narrows(self) -> bool:
        """Whether a width option is set (the built student may be narrower than its teacher)."""
        return any(getattr(self, name) is not None for name in ("hidden_size", "intermediate_size", "num_heads"))

    def prunes(self) -> bool:
        """Whether the built student is sliced out of the teacher by importance measured on calibration text."""
        return self.narrows() and self.width_init == "importance"


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)
    """Training text: files, folders, globs (.txt, .jsonl, .json, .csv, .parquet) or packaged corpora (bbc-news)."""
    eval: list[str] = field(default_factory=list)
    """Held-out text evaluated at the start and end of training (optional)."""
    format: str = "auto"
    """text (raw text), chat (conversations: .jsonl / .json / .parquet records with messages, or prompt and completion; rendered with the chat template, loss on assistant tokens only) or auto (chat when the records have one of those fields)."""
    text_field: str = "text"
    """Field or column holding the text in .jsonl / .json / .csv / .parquet files."""
    split_documents: str = "file"
    """How .txt files split into documents: file, line or blank-line."""
    max_length: int = 128
    """Tokens per training sequence (encoder chunks, decoder blocks)."""
    min_tokens: int = 8
    """Encoder chunks with fewer content tokens are dropped."""
    eval_max_tokens: int = 32768
    """Cap on held-out tokens evaluated."""

    RANGES: typing.ClassVar[dict] = {"max_length": Range(8), "min_tokens": POSITIVE, "eval_max_tokens": POSITIVE}

    def validate(self, train_required: bool = True):
        if not self.train and train_required:
            raise AlambicError("no training data: give --data PATH (a file, folder, glob or packaged corpus such as bbc-news)")
        if self.format not in DATA_FORMATS:
            raise AlambicError(f"data.format must be one of {', '.join(DATA_FORMATS)}, got {self.format!r}"
                               f"{did_you_mean(self.format, DATA_FORMATS)}")
        if self.split_documents not in ("file", "line", "blank-line"):
            raise AlambicError(f"data.split_documents must be file, line or blank-line, got {self.split_documents!r}")
        check_ranges(self, "data.")


MIXED_PRECISIONS = ("auto", "bf16", "bf16-autocast", "fp16", "no")
MIXED_PRECISION_HELP = ("training.mixed_precision: auto (default: bf16 where this machine multiplies bf16 natively and "
                        "faster, else fp32), bf16 (a bf16 student, fp32 master weights), bf16-autocast, fp16, "
                        "no (fp32)")


@dataclass
class TrainingConfig:
    max_steps: int = 1000
    """Optimiser steps."""
    batch_size: int = 8
    """Sequences per micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimiser step (effective batch = batch_size x grad_accum x processes)."""
    lr: float = 5e-4
    """Peak learning rate. Left unset, `distill`'s distilbert recipe trains a decoder student at 1e-3 on raw text and
    3e-4 on chat data (each chosen on validation); encoders and the other recipes keep this 5e-4 (DistilBERT's)."""
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    """Share of max_steps spent warming the learning rate up linearly."""
    schedule: str = "linear"
    """Decay after warm-up: linear, cosine or constant."""
    grad_clip: float = 5.0
    """Clip the global gradient norm to this value (0 disables)."""
    seed: int = 42
    mixed_precision: str = "auto"
    """auto (bf16 on a GPU with bf16 and on a CPU with native bf16 matrix instructions where a quick check finds it
    faster; fp32 elsewhere), bf16 (a bf16 student with fp32 master weights), bf16-autocast (fp32 weights, bf16
    autocast), fp16 or no (fp32)."""
    compile: bool = False
    """torch.compile the student."""
    distributed: str = "ddp"
    """Several processes: ddp (each holds the whole student) or fsdp (FSDP2: the student's parameters, gradients and optimiser state sharded, every transformer layer a unit; sharded checkpoints)."""
    fsdp_teacher: str = "shard"
    """With distributed=fsdp: shard (the teacher's layers sharded too, gathered layer by layer) or replicate (a whole teacher per process)."""
    log_every: int = 10
    """Steps between metric lines in metrics.jsonl (each costs one host synchronisation)."""
    save_every: int = 500
    """Steps between checkpoints (a final one is always written)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (oldest removed first); the best model (OUT/best) is kept apart."""
    min_free_disk_mb: int = 1024
    """Free space (MB) a run leaves on its device: it refuses to start, or to save a checkpoint, when that would leave less."""
    eval_every: int = 0
    """Steps between evaluations on the held-out data (0: only before and after training)."""
    best_metric: str | None = None
    """Evaluation metric whose best value keeps a copy of the student in OUT/best (e.g. accuracy, perplexity)."""
    best_metric_mode: str = "max"
    """Whether a larger (max) or smaller (min) best_metric is better."""
    early_stopping_patience: int = 0
    """Stop after this many evaluations in a row without a better best_metric (0: never)."""

    RANGES: typing.ClassVar[dict] = {
        "max_steps": POSITIVE, "batch_size": POSITIVE, "grad_accum": POSITIVE, "log_every": POSITIVE,
        "save_every": POSITIVE, "keep_checkpoints": POSITIVE, "min_free_disk_mb": NON_NEGATIVE, "lr": ABOVE_ZERO, "betas": FRACTION, "eps": ABOVE_ZERO,
        "weight_decay": NON_NEGATIVE, "warmup_ratio": FRACTION, "grad_clip": NON_NEGATIVE, "seed": NON_NEGATIVE,
        "eval_every": NON_NEGATIVE, "early_stopping_patience": NON_NEGATIVE,
    }

    def validate(self):
        check_ranges(self, "training.")
        if self.schedule not in ("linear", "cosine", "constant"):
            raise AlambicError(f"training.schedule must be linear, cosine or constant, got {self.schedule!r}")
        if self.distributed not in ("ddp", "fsdp"):
            raise AlambicError(f"training.distributed must be ddp or fsdp, got {self.distributed!r}")
        if self.fsdp_teacher not in ("shard", "replicate"):
            raise AlambicError(f"training.fsdp_teacher must be shard or replicate, got {self.fsdp_teacher!r}")
        if self.distributed == "fsdp" and self.mixed_precision == "fp16":
            raise AlambicError("training.distributed=fsdp trains in fp32 or bf16 (fp16 needs a gradient scaler FSDP "
                               "does not get here): set training.mixed_precision to bf16, auto or no")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise AlambicError("training.mixed_precision must be auto, bf16, bf16-autocast, fp16 or no, got "
                               f"{self.mixed_precision!r}")
        if self.best_metric_mode not in ("max", "min"):
            raise AlambicError(f"training.best_metric_mode must be max or min, got {self.best_metric_mode!r}")
        if self.early_stopping_patience and not (self.best_metric and self.eval_every):
            raise AlambicError("training.early_stopping_patience needs training.best_metric and training.eval_every")


@dataclass
class OnPolicyConfig:
    """GKD's mixed data (Agarwal et al. 2024): some batches' answers are written by the student itself."""

    lmbda: float = 0.0
    """Probability that a batch's answers are sampled from the current student (on-policy) instead of read from the data; the teacher scores the sampled tokens. 0: off (chat data only)."""
    max_new_tokens: int = 64
    """Longest sampled answer (also capped by data.max_length)."""
    temperature: float = 1.0
    """Sampling temperature of the student's answers (0: greedy); unrelated to loss.temperature."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens holding this share of probability."""

    RANGES: typing.ClassVar[dict] = {"lmbda": UNIT_INTERVAL, "max_new_tokens": POSITIVE, "temperature": NON_NEGATIVE,
                                     "top_p": Range(0, 1, low_open=True)}

    def validate(self):
        check_ranges(self, "on_policy.")


@dataclass
class DistillConfig:
    teacher: str = ""
    """Teacher: a local Hugging Face model folder, a .gguf file, or a packaged name (smollm2-135m, minilm-l6)."""
    teacher_logits: str = ""
    """A teacher cache made by `alambic cache-teacher`: soft targets (and hidden states) are read from it and no teacher runs while training; the data are its sequences (data.train, when given, must be the cached data). The student comes from student.init, or is built from the teacher, loaded only for that."""
    out: str = ""
    """Run folder: checkpoints, metrics.jsonl, and the exported student in OUT/student."""
    recipe: str = "distilbert"
    """Distillation method: distilbert (triple loss), tinybert (embedding, hidden and attention), minilm (relations)."""
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: typing.Any = None
    """The recipe's loss options (see ``alambic distill --help``); defaults depend on the recipe."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    on_policy: OnPolicyConfig = field(default_factory=OnPolicyConfig)

    explicit: typing.ClassVar[frozenset | None] = None
    """The dotted options the user set (YAML or flags), filled by :func:`load_config`. A default the run can adapt
    (the cosine term of a narrower student, a cache's temperature) is adapted only when not in it. None (a config
    built in Python): every option counts as set, so nothing is replaced behind the caller's back."""

    def is_explicit(self, option: str) -> bool:
        return self.explicit is None or option in self.explicit

    def validate(self) -> "DistillConfig":
        if not self.teacher and not self.teacher_logits:
            raise AlambicError("no teacher: give --teacher (a model folder, a .gguf file, or smollm2-135m / minilm-l6) "
                               "or --teacher-logits CACHE (from `alambic cache-teacher`)")
        if not self.out:
            raise AlambicError("no output folder: give --out DIR")
        if self.teacher_logits and self.recipe != "distilbert":
            raise AlambicError(f"--teacher-logits serves the distilbert recipe (soft targets and hidden states); "
                               f"{self.recipe} reads the teacher's intermediate layers, so it needs the teacher live: "
                               "give --teacher instead")
        if self.teacher_logits and not self.teacher and not self.student.init:
            raise AlambicError("--teacher-logits without --teacher needs the student to train: give --student DIR, or "
                               "--teacher to build it from (the teacher is loaded only for that)")
        if self.training.distributed == "fsdp" and self.recipe != "distilbert":
            raise AlambicError(f"training.distributed=fsdp runs the distilbert recipe (live or --teacher-logits) for "
                               f"now; {self.recipe} reads intermediate layers through hooks, untested under FSDP: use "
                               "training.distributed=ddp for it")
        if self.on_policy.lmbda > 0 and (self.teacher_logits or self.recipe != "distilbert"
                                         or self.training.distributed == "fsdp"):
            raise AlambicError("on_policy.lmbda > 0 needs the teacher live to score the student's answers, with the "
                               "distilbert recipe and training.distributed=ddp: drop --teacher-logits / use those, or "
                               "set on_policy.lmbda=0")
        if self.loss is None:
            self.loss = loss_config_class(self.recipe)()
        for section in (self.student, self.loss, self.training, self.on_policy):
            section.validate()
        if self.on_policy.lmbda > 0 and self.loss.alpha_kd == 0:
            raise AlambicError("on_policy.lmbda > 0 trains the divergence on the student's own answers, but "
                               "loss.alpha_kd is 0: set loss.alpha_kd > 0 or on_policy.lmbda=0")
        self.data.validate(train_required=not self.teacher_logits)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(value, annotation, key: str):
    """Convert a YAML value to the field's declared type, or say which key is wrong and what it expects."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if value is None:
        if type(None) in args:
            return None
        raise AlambicError(f"{key} cannot be empty")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", ())):
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is list:
        items = value if isinstance(value, list) else [value]
        return [_coerce(v, args[0], key) for v in items]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise AlambicError(f"{key} expects {len(args)} values such as [0.9, 0.98], got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise AlambicError(f"{key} expects true or false, got {value!r}")
    if annotation in (int, float):
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (annotation is int and value != int(value)):
            raise AlambicError(f"{key} expects {'an integer' if annotation is int else 'a number'}, got {value!r}")
        return annotation(value)
    if annotation is str:
        return str(value)
    return value


def option_names(config, prefix: str = "") -> list[str]:
    """Every option of ``config`` by its dotted name (``training.max_steps``), sections walked."""
    names = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        names += option_names(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else [prefix + f.name]
    return names


def _suggest_option(dotted: str, here: list[str], everywhere: list[str]) -> str:
    """' (did you mean X?)': the same name in another section (``max_steps`` -> ``training.max_steps``), else the
    closest spelling in this section, else the closest name in any section."""
    import difflib

    leaf_of = {name: name.rsplit(".", 1)[-1] for name in everywhere}
    leaf = dotted.rsplit(".", 1)[-1]
    same = [name for name in everywhere if leaf_of[name] == leaf]
    if not same:
        hint = did_you_mean(dotted, here)
        if hint:
            return hint
        close = difflib.get_close_matches(leaf, set(leaf_of.values()), n=1)
        same = [name for name in everywhere if close and leaf_of[name] == close[0]]
    return f" (did you mean {' or '.join(repr(name) for name in same)}?)" if same else ""


def _apply(target, values: dict, prefix: str = "", root=None):
    root = root if root is not None else target
    hints = typing.get_type_hints(type(target))
    names = [f.name for f in dataclasses.fields(target)]
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            options = [f"{prefix}{n}" for n in names]
            raise AlambicError(f"unknown option {dotted!r}{_suggest_option(dotted, options, option_names(root))}; "
                               f"options here: {', '.join(options)}")
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise AlambicError(f"{dotted} is a section: give its options as {dotted}.NAME=VALUE")
            _apply(current, value, f"{dotted}.", root)
        else:
            setattr(target, key, _coerce(value, hints[key], dotted))


class _YAML12Loader(yaml.SafeLoader):
    """YAML with the 1.2 core schema's booleans: only true / false are booleans, so the words options take
    (``mixed_precision: no``, ``on``, ``off``, ``yes``) stay words, in files and ``--set`` alike."""


_YAML12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YAML12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))


def read_yaml(text: str):
    """Parse YAML as alambic's configuration does (see :class:`_YAML12Loader`)."""
    return yaml.load(text, Loader=_YAML12Loader)


def parse_override(text: str) -> dict:
    """``a.b=value`` -> ``{"a": {"b": value}}`` with value parsed as YAML."""
    if "=" not in text:
        raise AlambicError(f"override {text!r} is not KEY=VALUE (for example loss.temperature=4)")
    key, raw = text.split("=", 1)
    value = read_yaml(raw) if raw.strip() else None
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | Path | None = None, overrides: list[dict] = ()) -> DistillConfig:
    """Defaults <- YAML file <- overrides (in order), then validated."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise AlambicError(f"config file {str(path)!r} does not exist")
        try:
            values = read_yaml(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise AlambicError(f"config file {str(path)!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(values, dict):
            raise AlambicError(f"config file {str(path)!r} must hold a mapping of options")
    for extra in overrides:
        values = _merge(values, extra)
    recipe = values.get("recipe", DistillConfig.recipe)
    config = DistillConfig(recipe=str(recipe), loss=loss_config_class(str(recipe))())
    _apply(config, values)
    config.explicit = frozenset(_dotted_keys(values))
    return config.validate()


def _dotted_keys(values: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in values.items():
        keys += _dotted_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]
    return keys


def loss_config_class(recipe: str):
    """The loss-options dataclass of ``recipe``; an unknown name is a clear error."""
    from alambic.recipes import recipe_parts

    return recipe_parts(recipe)[0]


def config_help(config_type=DistillConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, default, help) for every option, read from the dataclass docstrings, for ``--help``."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    tree = ast.parse(inspect.getsource(config_type))
    body = tree.body[0].body
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
            docs[node.target.id] = str(following.value.value)
    rows = []
    for f in dataclasses.fields(config_type):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            rows.extend(config_help(type(default), f"{prefix}{f.name}."))
        elif f.name == "loss":
            continue  # per recipe: config_help(loss_config_class(name), "loss.")
        else:
            rows.append((f"{prefix}{f.name}", repr(default), docs.get(f.name, "")))
    return rows
