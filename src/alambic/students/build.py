"""Build a student from its teacher: fewer layers (and optionally narrower), initialised by copying.

DistilBERT's ablation: a student initialised from one teacher layer in two trains ~3.7 GLUE points better than a
random one, so everything whose shape still matches is copied, and what cannot be copied is listed in ``notes``.
"""

import copy
import math
import re
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import torch
from torch import nn

from alambic import modeling
from alambic.cache import atomic_directory
from alambic.config import TOKEN_TYPES, WIDTH_INITS, StudentConfig
from alambic.errors import AlambicError, did_you_mean
from alambic.ranges import check_value

LAYER_SPECS = ("every-other", "even", "odd", "all", "linspace:K", "0,2,4,...", "auto[:greedy|influence]")
TASK_HEADS = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")
HEAD_DIM_READERS = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2")
"""Model types whose attention reads ``config.head_dim`` when set (else hidden / heads): a narrower student of
these keeps its teacher's head size by writing it down, even when the teacher's config left it implicit."""


def with_task_head(teacher: nn.Module) -> nn.Module:
    """A fine-tuned task model whose head ``load_model`` left out (it loads language models, and keeps a bare
    encoder when the checkpoint has no LM head), reloaded with its saved task class so the student gets the head."""
    archs = getattr(teacher.config, "architectures", None) or []
    if modeling.has_lm_head(teacher) or type(teacher).__name__.endswith(TASK_HEADS):
        return teacher
    if not archs or not archs[0].endswith(TASK_HEADS):
        return teacher
    import transformers

    cls, path = getattr(transformers, archs[0], None), getattr(teacher.config, "_name_or_path", "")
    if cls is None or not path or not (Path(path) / "config.json").is_file():
        return teacher
    return cls.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)


def round_half_up(x: float) -> int:
    """2.5 -> 3 (Python's round() gives 2: halves to even)."""
    return math.floor(x + 0.5)


def linspace_layers(k: int, n: int) -> list[int]:
    """``k`` of ``n`` layers evenly spaced with both ends kept, rounded half up: 6 of 12 gives DistilBERT's
    [0, 2, 4, 7, 9, 11], 15 of 30 gives [0, 2, 4, 6, 8, 10, 12, 15, 17, ..., 27, 29]."""
    return [0] if k == 1 else [round_half_up(i * (n - 1) / (k - 1)) for i in range(k)]


def parse_layer_spec(spec, num_teacher_layers: int) -> list[int]:
    """Teacher layer indices to copy, in order; every mistake is refused with the valid range in the message.

    ``every-other``: ceil(N/2) layers spaced as ``linspace`` (the first and the last kept: the head was trained on
    the last layer's output); ``even``: 0, 2, 4, ...; ``odd``: 1, 3, ..., N-1."""
    n = num_teacher_layers
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "auto" or text.startswith("auto:"):
            raise AlambicError(f"layer spec {spec!r} is chosen by measuring on calibration data: use "
                               "init_student(..., calibration_data=...) or select_layers(), or give fixed layers")
        if not text:
            layers = []
        elif text == "every-other":
            layers = linspace_layers(math.ceil(n / 2), n)
        elif text == "even":
            layers = list(range(0, n, 2))
        elif text == "odd":
            layers = list(range(1, n, 2)) or [0]
        elif text == "all":
            layers = list(range(n))
        elif text.startswith("linspace:"):
            try:
                k = int(text.split(":", 1)[1])
            except ValueError:
                raise AlambicError(f"layer spec {spec!r}: linspace needs a whole number of layers, e.g. linspace:6")
            if k < 1:
                raise AlambicError(f"layer spec {spec!r}: a student needs at least 1 layer")
            if k > n:
                raise AlambicError(f"layer spec {spec!r}: student deeper than its teacher ({k} > {n} layers)")
            layers = linspace_layers(k, n)
        elif re.fullmatch(r"\s*-?\d+\s*(,\s*-?\d+\s*)*,?\s*", text):
            layers = [int(part) for part in text.split(",") if part.strip()]
        else:
            hint = did_you_mean(text, ["every-other", "even", "odd", "all", "linspace", "auto"])
            raise AlambicError(f"unknown layer spec {spec!r}{hint}; use one of: {', '.join(LAYER_SPECS)}")
    else:
        layers = [int(i) for i in spec]
    if not layers:
        raise AlambicError("empty layer spec: a student needs at least 1 layer")
    for i in layers:
        if not 0 <= i < n:
            raise AlambicError(f"layer {i} is out of range: the teacher has {n} layers, 0-{n - 1}")
    if len(layers) > n:
        raise AlambicError(f"student deeper than its teacher ({len(layers)} > {n} layers)")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise AlambicError(f"layers {layers} must be strictly increasing, without repeats (e.g. 0,2,4)")
    return layers


@dataclass
class StudentInit:
    model: nn.Module
    layers: list[int]
    teacher_class: str
    teacher_layers: int
    teacher_parameters: int
    student_parameters: int
    copied_parameters: int
    notes: list[str] = field(default_factory=list)
    tokenizer: object = None  # the teacher's, when init_student loaded the teacher itself
    selection: object = None  # a LayerSelection when the layers were chosen by measurement (layers="auto...")
    teacher_name: str = ""
    pruning: object = None  # a WidthPruning when a narrower student was sliced by importance
    search: object = None  # a ShapeSearch when the shape was chosen to meet a speed or size budget
    fresh_width: bool = False  # a narrower hidden size, freshly initialised: its layers hold none of the teacher's

    def source_layers(self) -> tuple[list[int], int] | None:
        """``(teacher layers it was copied from, teacher depth)``, as a layer map reads them; None if not copied."""
        return None if self.fresh_width else (self.layers, self.teacher_layers)

    def model_card(self, teacher_name: str | None = None) -> str | None:
        """README.md text recording how the shape was searched, how the layers were chosen and what width pruning
        kept; None when none of them was measured."""
        name = teacher_name or self.teacher_name or self.teacher_class
        if self.selection is None and self.pruning is None and self.search is None:
            return None
        card = self.selection.card(name, self.teacher_class) if self.selection is not None else self._header(name)
        if self.pruning is not None:
            lines = ["", "## Width pruning", "",
                     "Narrower widths keep the teacher's most important channels, heads and neurons, measured on "
                     "calibration text (Minitron, Muralidharan et al. 2024):", ""]
            card += "\n".join(lines + [f"- {line}" for line in self.pruning.summary()]) + "\n"
        return card + (self.search.card() if self.search is not None else "")

    def _header(self, name: str) -> str:
        return "\n".join(["---", "library_name: transformers", "---", "",
                          f"# A {len(self.layers)}-layer student of {name}", "",
                          f"Initialised from the teacher `{name}` ({self.teacher_class}, {self.teacher_layers} "
                          f"layers): layers {', '.join(map(str, self.layers))}"
                          + (" sliced to a narrower width" if self.pruning is not None else "")
                          + ". Not yet distilled unless stated elsewhere.", ""]) + "\n"

    def summary(self) -> str:
        share = 100 * self.student_parameters / self.teacher_parameters
        lines = [
            f"teacher  {self.teacher_class}: {self.teacher_layers} layers, "
            f"{self.teacher_parameters / 1e6:.1f}M parameters",
            f"student  {type(self.model).__name__}: {len(self.layers)} layers, "
            f"{self.student_parameters / 1e6:.1f}M parameters ({share:.1f}% of the teacher)",
            f"layers kept: {', '.join(map(str, self.layers))}; "
            f"{100 * self.copied_parameters / self.student_parameters:.1f}% of the student's parameters copied",
        ]
        return "\n".join(lines + [f"note: {note}" for note in self.notes])

    __str__ = summary


def count_parameters(model: nn.Module) -> int:
    """Tied weights count once, as they are stored once."""
    return sum(p.numel() for p in model.parameters())


def student_config(teacher_config, layers, hidden, ffn, heads, keep_token_types, notes, allow_wider=False):
    """The student's configuration: ``teacher_config`` with the ``layers`` kept and the widths given (None: the
    teacher's; the head size is kept, so a narrower width has fewer heads). Every shape mistake is refused in one
    line, and what changes beyond the shape is appended to ``notes``."""
    config = copy.deepcopy(teacher_config)
    n = modeling.num_layers(config)
    for name, value in list(vars(config).items()):  # per-layer settings (Qwen2's layer_types) follow their layers
        if "layer" in name and isinstance(value, (list, tuple)) and len(value) == n:
            setattr(config, name, [value[i] for i in layers])
    modeling.set_num_layers(config, len(layers))
    config.__dict__.pop("quantization_config", None)
    config.architectures = None
    if getattr(config, "type_vocab_size", 1) > 1 and not keep_token_types:
        notes.append(f"token types dropped (type_vocab_size {config.type_vocab_size} -> 1): the teacher's type-0 "
                     "embedding is kept, so outputs are unchanged for token_type_ids=0")
        config.type_vocab_size = 1
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        notes.append("attention is scaled by layer index, so copied layers at new positions behave differently")
    t_hidden, t_heads = modeling.hidden_size(config), modeling.num_heads(config)
    for name, value in (("hidden_size", hidden), ("intermediate_size", ffn), ("num_heads", heads)):
        if value is not None and value < 1:
            raise AlambicError(f"{name} must be a positive number, got {value}")
    # The student keeps the teacher's head size, so that whole heads can be sliced out of the teacher: a config
    # with its own head_dim (Llama, Qwen2) keeps it; otherwise a narrower width drops heads (hidden / head size).
    t_head_dim = modeling.head_dim(config)
    head_field = getattr(config, "head_dim", None) is not None or config.model_type in HEAD_DIM_READERS
    if head_field:
        config.head_dim = t_head_dim
    hidden = hidden or t_hidden
    wider = [f"{name} {value} > {teacher_value}" for name, value, teacher_value in (
        ("hidden size", hidden, t_hidden), ("FFN size", ffn or 0, modeling.intermediate_size(config)),
        ("attention heads", heads or 0, t_heads)) if value > teacher_value]
    if wider and not allow_wider:
        raise AlambicError(f"the student would be wider than its teacher ({', '.join(wider)}): its extra width "
                           "cannot be copied and it would be larger, not smaller; choose smaller sizes, or pass "
                           "--allow-wider (student.allow_wider=true) if that is what you want")
    if heads is None:
        # keep the head size (whole heads are sliced) and the teacher's ratio of heads x head size to hidden size:
        # SmolLM2's 9 heads of 64 at 576 wide become 6 at 384 (what llama.cpp's qwen2 graph needs, heads x size =
        # hidden), Qwen3-0.6B's 16 of 128 at 1024 become 14 at 896
        heads = t_heads * hidden // t_hidden if (t_heads * hidden) % t_hidden == 0 else t_heads
    if hidden % heads:
        whole = hidden // t_head_dim if hidden % t_head_dim == 0 else None
        divisor = whole or max(h for h in range(1, t_heads + 1) if hidden % h == 0)
        why = (f"which keeps the teacher's head size ({t_head_dim})" if whole else
               f"or a hidden size that is a multiple of the teacher's head size ({t_head_dim}) to keep heads whole")
        raise AlambicError(f"hidden size {hidden} is not divisible by {heads} attention heads: give --num-heads "
                           f"{divisor}, {why}")
    if hidden != t_hidden:
        modeling.set_hidden_size(config, hidden)
    if heads != t_heads:
        modeling.set_num_heads(config, heads)
        if not head_field and hidden == t_hidden:
            notes.append(f"{t_heads} -> {heads} attention heads: projections copied but regrouped into new heads, "
                         "so attention differs from the teacher's until trained")
    kv = getattr(config, "num_key_value_heads", None)
    if kv is not None and heads != t_heads:
        group = t_heads // kv
        new_kv = heads // group if heads % group == 0 else math.gcd(kv, heads)
        if new_kv * group != heads:
            notes.append(f"key/value heads {kv} -> {new_kv} so that they divide {heads} attention heads "
                         f"(groups of {heads // new_kv} instead of {group}: attention is not sliced from the teacher)")
        config.num_key_value_heads = new_kv
    if ffn is not None:
        modeling.set_intermediate_size(config, ffn)
    return config


def _compact(names, layers_prefix):
    """'bert.encoder.layer.3.output.dense.weight' -> 'bert.encoder.layer.*.output.dense', once each."""
    out = {}
    for name in names:
        name = re.sub(rf"^{re.escape(layers_prefix)}\.\d+\.", f"{layers_prefix}.*.", name)
        out[re.sub(r"\.(weight|bias)$", "", name)] = None
    items = list(out)
    return ", ".join(items[:8]) + (f" and {len(items) - 8} more" if len(items) > 8 else "")


@torch.no_grad()
def _copy_weights(teacher, student, layers, notes, resize=None):
    """Copy every teacher tensor whose shape matches its student place; ``resize(key, tensor)`` (width pruning)
    may first slice a tensor whose shape does not."""
    t_state = teacher.state_dict()
    t_body = modeling.module_name(teacher, modeling.lm_body(teacher))
    t_layers = modeling.module_name(teacher, modeling.transformer_layers(teacher))
    s_body = modeling.module_name(student, modeling.lm_body(student))
    s_layers = modeling.module_name(student, modeling.transformer_layers(student))
    layer_key = re.compile(rf"^{re.escape(s_layers)}\.(\d+)\.(.*)$")

    def source_key(name):
        match = layer_key.match(name)
        if match:
            return f"{t_layers}.{layers[int(match.group(1))]}.{match.group(2)}"
        if name.startswith(s_body + "."):
            return (t_body + "." if t_body else "") + name[len(s_body) + 1:]
        return name  # the head keeps its name across teacher and student of one class

    groups = {}  # tied tensors appear under several names; copy each tensor once, from whichever name has a source
    named = chain(student.named_parameters(remove_duplicate=False), student.named_buffers(remove_duplicate=False))
    for name, tensor in named:
        groups.setdefault(id(tensor), (tensor, []))[1].append(name)
    used, tried, reshaped, absent, copied = set(), set(), [], [], 0
    for tensor, names in groups.values():
        sources = [(key, t_state[key]) for key in map(source_key, names) if key in t_state]
        tried.update(key for key, _ in sources)
        for key, src in sources:
            if resize is not None and src.shape != tensor.shape:
                src = resize(key, src)
            if key.endswith("token_type_embeddings.weight") and src.shape[1:] == tensor.shape[1:]:
                src = src[: tensor.shape[0]]  # type 0 only: the student has one token type
            if src.shape == tensor.shape:
                tensor.copy_(src)
                used.add(key)
                copied += tensor.numel() if isinstance(tensor, nn.Parameter) else 0
                break
        else:
            if isinstance(tensor, nn.Parameter):
                (reshaped if sources else absent).append(names[0])
    if reshaped:
        notes.append(f"freshly initialised (shape differs from the teacher): {_compact(reshaped, s_layers)}")
    if absent:
        notes.append(f"freshly initialised (not in the teacher): {_compact(absent, s_layers)}")
    skipped = tuple(f"{t_layers}.{i}." for i in range(len(modeling.transformer_layers(teacher))) if i not in layers)
    left = [k for k, _ in teacher.named_parameters() if k not in tried and not k.startswith(skipped)]
    if left:
        notes.append(f"teacher weights with no place in the student, left out: {_compact(left, t_layers)}")
    return copied


def init_student(teacher, *, layers="every-other", hidden_size=None, intermediate_size=None, num_heads=None,
                 seed=0, depth=None, calibration_data=None, selection_budget=None,
                 calibration_tokens=None, tokenizer=None, log=None, token_types="auto",
                 width_init="importance", allow_wider=False, importance=None) -> StudentInit:
    """A float32 *ForMaskedLM / *ForCausalLM student of ``teacher`` (a model, or a spec ``load_model`` understands).

    ``layers="auto"`` / ``"auto:greedy"`` / ``"auto:influence"`` chooses ``depth`` layers (default ceil(N/2)) by
    measuring on ``calibration_data`` (data specs, tokenised with ``tokenizer`` or the teacher's, or ready batches);
    see :func:`alambic.students.selection.select_layers`. ``log`` receives its progress lines.
    A narrower student (``hidden_size``, ``intermediate_size``, ``num_heads``) is sliced out of the teacher by the
    importance of its channels, neurons and heads measured on ``calibration_data``
    (:mod:`alambic.students.pruning`); ``width_init="random"`` initialises what changed width at random instead.
    A width above the teacher's is refused unless ``allow_wider``. ``importance``: scores already measured on the
    calibration data (:func:`alambic.students.pruning.measure_importance`), so that several students of one teacher
    share one measurement.
    ``token_types`` (BERT-style segment embeddings): ``drop`` keeps type 0 only (DistilBERT), ``keep`` keeps them
    all (sentence-pair tasks), ``auto`` keeps them for a fine-tuned task teacher and drops them otherwise.
    The student comes back in eval mode, like a freshly loaded model; the training loop switches it to train.
    """
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    from alambic.students import pruning
    from alambic.students import selection as sel
    from alambic.teachers import load_model

    for name, value in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size),
                        ("num_heads", num_heads)):
        check_value(f"the student's {name}", value, StudentConfig.RANGES[name])
    if token_types not in TOKEN_TYPES:
        raise AlambicError(f"token types must be one of {', '.join(TOKEN_TYPES)}, got {token_types!r}")
    if width_init not in WIDTH_INITS:
        raise AlambicError(f"width init must be one of {', '.join(WIDTH_INITS)}, got {width_init!r}")
    method = sel.parse_auto_spec(layers)
    if method is None and (depth is not None or selection_budget is not None):
        raise AlambicError("depth and a selection budget apply to layers='auto[:METHOD]'; "
                           "for a fixed subset give the layers (e.g. linspace:K)")
    teacher_name = ""
    if not isinstance(teacher, nn.Module):
        teacher_name = str(teacher)
        teacher, loaded_tokenizer = load_model(teacher)
        tokenizer = tokenizer or loaded_tokenizer
    teacher = with_task_head(teacher)
    n = modeling.num_layers(teacher.config)
    kind = modeling.model_kind(teacher)
    tokens = calibration_tokens or sel.DEFAULT_CALIBRATION_TOKENS
    notes = []
    task_head = type(teacher).__name__.endswith(TASK_HEADS)
    keep_token_types = token_types == "keep" or (token_types == "auto" and task_head)
    # the shape is checked before any measurement, so a size mistake costs no calibration pass
    config = student_config(teacher.config, list(range(n)), hidden_size, intermediate_size, num_heads, keep_token_types,
                             notes, allow_wider)
    narrower = _narrower(teacher.config, config)
    if narrower and width_init == "importance" and calibration_data is None:
        raise AlambicError(f"a narrower student ({', '.join(narrower)}) is sliced out of the teacher by measured "
                           "importance: give calibration text (--calibration-data PATH, e.g. the training data), "
                           "or --width-init random for fresh weights")
    batches = None
    if calibration_data is not None:
        batches = sel.resolve_calibration(calibration_data, tokenizer, kind, max_tokens=tokens, seed=seed)
    selection = None
    if method is not None:
        selection = sel.select_layers(teacher, method, depth=depth, calibration=batches, budget=selection_budget,
                                      seed=seed, log=log)
        selection.calibration = sel.describe_calibration(calibration_data)
        chosen = selection.layers
    else:
        chosen = parse_layer_spec(layers, n)
    notes = []
    config = student_config(teacher.config, chosen, hidden_size, intermediate_size, num_heads, keep_token_types, notes,
                             allow_wider)
    if not modeling.has_lm_head(teacher) and not task_head:
        notes.append(f"{type(teacher).__name__} has no LM head: the student's head is freshly initialised "
                     "(train it, e.g. with the MLM loss, before using the student's logits)")
    auto = AutoModelForCausalLM if kind == "causal" else AutoModelForMaskedLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if task_head:  # a fine-tuned task teacher: the student keeps its class, its label map and (copied) head
            student = type(teacher)(config).to(torch.float32)
        else:
            student = auto.from_config(config, dtype=torch.float32)  # trainable weights, whatever the teacher's dtype
    plan = None
    if narrower and width_init == "importance":
        importance = importance or pruning.measure_importance(teacher, batches)
        plan = pruning.plan_pruning(teacher, config, chosen, importance)
        notes += [f"sliced from the teacher: {line}" for line in plan.summary()]
    elif narrower:
        notes.append(f"width init random: {', '.join(narrower)} freshly initialised")
    copied = _copy_weights(teacher, student, chosen, notes, resize=plan.slice if plan else None)
    student.eval()
    return StudentInit(student, chosen, type(teacher).__name__, n, count_parameters(teacher),
                       count_parameters(student), copied, notes, tokenizer, selection, teacher_name, plan,
                       fresh_width=plan is None
                       and modeling.hidden_size(config) != modeling.hidden_size(teacher.config))


def _narrower(teacher_config, student_config) -> list[str]:
    """The widths the student shrinks, in words (empty when it keeps the teacher's)."""
    pairs = (("hidden size", modeling.hidden_size), ("FFN size", modeling.intermediate_size),
             ("attention heads", modeling.num_heads))
    return [f"{name} {get(teacher_config)} -> {get(student_config)}" for name, get in pairs
            if get(student_config) != get(teacher_config)]


def save_student(model, tokenizer, out_dir, *, overwrite=False, card: str | None = None,
                 files: dict[str, str] | None = None) -> Path:
    """Write ``model`` with ``tokenizer`` as a plain Hugging Face folder (safetensors, config, tokenizer) that loads
    without alambic installed. Written atomically; refuses to overwrite a non-empty folder unless asked.
    ``card``: a Hugging Face model card, written as README.md; ``files``: more text files, ``{name: text}``."""
    out_dir = Path(out_dir)
    if tokenizer is None:
        raise AlambicError("save_student needs the teacher's tokenizer: the student shares its vocabulary")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise AlambicError(f"{out_dir} already exists and is not empty; choose a new folder or pass overwrite")
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if card:
            (Path(tmp) / "README.md").write_text(card, encoding="utf-8")
        for name, text in (files or {}).items():
            (Path(tmp) / name).write_text(text, encoding="utf-8")
    return out_dir
