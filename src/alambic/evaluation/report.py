"""The distillation report: measured size, speed and quality of a reference (usually the teacher) and its students.

``build_report`` measures, ``render_markdown`` prints the table a paper would print, ``write_report`` writes
``report.md``, ``report.json`` and the plots, each file atomically (an interrupted report leaves no half-written
file). Every figure and how it is computed is described in ``docs/report.md``; the JSON layout is versioned by
``schema_version`` (see :data:`SCHEMA_VERSION` and :data:`MODEL_KEYS`).
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from alambic import modeling
from alambic.cache import atomic_write_text
from alambic.errors import AlambicError
from alambic.evaluation import flops as flops_mod
from alambic.evaluation import speed as speed_mod
from alambic.search.search import searched_shape
from alambic.evaluation.report_format import (format_number, format_percent, format_value, headline, speed_row,
                                              speedup_row)
from alambic.students import count_parameters
from alambic.tasks import MAIN_METRIC
from alambic.tasks.data import check_task
from alambic.tasks.models import head_task
from alambic.tasks.workflow import DataOptions, evaluate_models, read_examples
from alambic.teachers import vocabulary_hash

SCHEMA_VERSION = 1
# The keys of report.json, pinned by the tests: adding one is a compatible change, renaming or removing one bumps
# SCHEMA_VERSION.
REPORT_KEYS = ("schema_version", "kind", "created", "command", "machine", "settings", "reference", "models",
               "warnings")
MODEL_KEYS = ("name", "spec", "path", "kind", "architecture", "layers", "hidden_size", "vocab_size", "tokenizer",
              "parameters", "disk_bytes", "flops", "speed", "quality", "ratios", "format", "runtime", "chat",
              "budget")
CHAT_RETAINED = ("accuracy", "option_accuracy", "rouge_l")
"""The gold chat metrics (higher is better) retained, model / reference in %, in ``ratios["chat_retention_pct"]``."""
CHAT_COLUMNS = (("accuracy", "accuracy"), ("option_accuracy", "option acc."), ("rouge_l", "ROUGE-L"),
                ("teacher_nll", "teacher NLL"), ("forward_kl", "forward KL"))
"""The chat metrics of the summary table (all of them are in report.json and the *Chat* table)."""


@dataclass
class ReportSettings:
    seq_lens: list[int] = field(default_factory=lambda: [64, 128])
    """Sequence lengths timed (and at which FLOPs per token are computed)."""
    batch_size: int = 8
    """Batch of the throughput measurement (latency is always batch 1)."""
    warmup: int = 2
    repeats: int = 5
    """Timed rounds at least (each round: one forward of every model, interleaved)."""
    max_repeats: int = 60
    """Timed rounds at most: rounds go on until every speed-up is known within ``tolerance``."""
    tolerance: float = speed_mod.DEFAULT_TOLERANCE
    """Relative half-width of each speed-up's ~95% interval at which timing stops (0.02: +-2%)."""
    devices: list[str] | None = None
    """cpu (always) and cuda when a GPU is present; None: that default."""
    threads: int | None = None
    """torch CPU threads (None: torch's default, recorded either way)."""
    lm_data: list[str] = field(default_factory=list)
    max_length: int | None = None
    """Tokens per evaluated sequence; None: the largest of seq_lens."""
    max_tokens: int = 8192
    eval_batch_size: int = 8
    text_field: str = "text"
    task: str | None = None
    qa_metric: str = "squad"
    """--task qa: squad (word F1) or korquad (KorQuAD 1.0, character F1)."""
    data: list[str] = field(default_factory=list)
    chat_data: list[str] = field(default_factory=list)
    """Chat records with gold answers (``alambic eval-chat``'s data): every PyTorch model answers them; the first
    model is the teacher of the teacher-scored metrics."""
    chat_max_new_tokens: int = 64
    chat_max_examples: int | None = None
    names: list[str] | None = None

    def check(self, n_models: int) -> None:
        if not self.seq_lens or any(length < 1 for length in self.seq_lens):
            raise AlambicError(f"--seq-lens must be positive token counts such as 64,128, got {self.seq_lens}")
        if self.max_repeats < self.repeats:
            raise AlambicError(f"--max-repeats ({self.max_repeats}) must be at least --repeats ({self.repeats})")
        if not 0 < self.tolerance < 1:
            raise AlambicError(f"--tolerance is a relative spread such as 0.02 (+-2%), got {self.tolerance}")
        for name, low in (("batch_size", 1), ("repeats", 1), ("warmup", 0), ("max_tokens", 1), ("eval_batch_size", 1)):
            if getattr(self, name) < low:
                flag = "--" + name.replace("_", "-")
                raise AlambicError(f"{flag} must be at least {low}, got {getattr(self, name)}")
        if self.chat_max_new_tokens < 1:
            raise AlambicError(f"--chat-max-new-tokens must be at least 1, got {self.chat_max_new_tokens}")
        if self.chat_max_examples is not None and self.chat_max_examples < 1:
            raise AlambicError(f"--chat-max-examples must be at least 1, got {self.chat_max_examples}")
        if self.threads is not None and self.threads < 1:
            raise AlambicError(f"--threads must be at least 1, got {self.threads}")
        if self.max_length is not None and self.max_length < 8:
            raise AlambicError(f"--max-length must be at least 8 tokens, got {self.max_length}")
        if self.task and self.lm_data:
            raise AlambicError("give either --task T --data F (task metric) or --lm-data F (held-out perplexity), "
                               "not both")
        if self.task and self.chat_data:
            raise AlambicError("give either --task T --data F (task heads) or --chat-data F (instruct models answering "
                               "chat prompts), not both")
        if self.task and not self.data:
            raise AlambicError(f"--task {self.task} needs its evaluation data: add --data FILE")
        if self.data and not self.task:
            raise AlambicError("--data is the data of a --task; for held-out perplexity use --lm-data FILE instead")
        if self.names is not None and len(self.names) != n_models:
            raise AlambicError(f"--names gives {len(self.names)} names for {n_models} models: give one per model")
        for device in self.devices or []:
            if device not in ("cpu", "cuda"):
                raise AlambicError(f"unknown device {device!r}: use cpu or cuda")
            if device == "cuda" and not torch.cuda.is_available():
                raise AlambicError("--devices cuda: no GPU is visible to torch on this machine; drop cuda")

    @property
    def eval_length(self) -> int:
        return self.max_length or max(self.seq_lens)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _geomean(values: list[float]) -> float | None:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def parameter_counts(model: torch.nn.Module) -> dict:
    """Total parameters (tied tensors once), those of embedding tables (token, position, token-type) and of an
    untied output embedding (the LM head's vocabulary matrix), and the rest: ``non_embedding``."""
    seen, embedding = set(), 0
    tables = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None and getattr(output, "weight", None) is not None:
        tables.append(output.weight)
    for weight in tables:
        if id(weight) not in seen:
            seen.add(id(weight))
            embedding += weight.numel()
    total = count_parameters(model)
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def _task_options(settings: "ReportSettings"):
    return DataOptions(max_length=settings.eval_length, text_field=settings.text_field,
                       eval_batch_size=settings.eval_batch_size, qa_metric=settings.qa_metric)


@dataclass
class _Prepared:
    spec: str
    name: str
    path: Path
    config: object
    kind: str
    tokenizer: object
    batches: list | None = None  # held-out batches (--lm-data), built before any weights load
    export: dict | None = None  # the manifest of an `alambic export` folder, measured in its own runtime
    search: dict | None = None  # the shape search of a student built for a budget (alambic-search.json)


@dataclass
class _ChatPlan:
    """What ``--chat-data`` evaluates, checked before any weights load: the records rendered with the reference's
    chat template, and the models left out (export folders) with the reason."""

    items: list
    tokenizer: object
    skipped: dict[str, str]


def _prepare(models: list[str], settings: ReportSettings, warn, log) -> tuple[list[_Prepared], _ChatPlan | None]:
    """Every check that needs no weights: model folders, configs, sequence lengths, data and tokenizers."""
    from transformers import AutoConfig, AutoTokenizer

    from alambic.export.runtime import export_folder, read_manifest, resolve_measured_path

    if not models:
        raise AlambicError("give at least one model (the first is the reference, usually the teacher)")
    settings.check(len(models))
    if settings.lm_data:
        from alambic.data.sources import describe_sources

        describe_sources(settings.lm_data)
    if settings.task:
        check_task(settings.task)
        if len(settings.data) != 1:
            raise AlambicError(f"--task {settings.task} takes one --data FILE (its evaluation set), "
                               f"got {len(settings.data)}")
        read_examples(settings.task, settings.data[0], _task_options(settings))  # format errors now
    names = settings.names or list(models)
    if len(set(names)) != len(names):
        raise AlambicError(f"two models share the name {next(n for n in names if names.count(n) > 1)!r}: "
                           "give distinct --names")
    prepared = []
    for spec, name in zip(models, names):
        path = resolve_measured_path(spec)
        manifest = read_manifest(path) if export_folder(spec) else None
        try:
            config = AutoConfig.from_pretrained(path)
        except (ValueError, KeyError, OSError) as err:
            raise AlambicError(f"{path}/config.json is not a model configuration this transformers can read "
                               f"({str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__})")
        kind = modeling.model_kind(config)
        if settings.task and head_task(config) != settings.task:
            raise AlambicError(f"{name} has no {settings.task} head: give a model fine-tuned for the task "
                               f"(`alambic finetune --task {settings.task} ...` or `alambic distill-task`)")
        limit = speed_mod.max_positions(config)
        longest = max(max(settings.seq_lens), settings.eval_length if settings.lm_data else 0)
        if limit is not None and longest > limit:
            raise AlambicError(f"{name} takes at most {limit} positions but {longest} tokens were asked: "
                               f"lower --seq-lens / --max-length to {limit} or less")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise AlambicError(f"{path} has no usable tokenizer ({str(err).strip().splitlines()[0]}); "
                               "save one next to the model")
        searched = searched_shape(path)
        prepared.append(_Prepared(str(spec), name, path, config, kind, tokenizer, export=manifest,
                                  search=json.loads(searched) if searched else None))
    fingerprints = {p.name: vocabulary_hash(p.tokenizer)[:16] for p in prepared}
    chat = _prepare_chat(prepared, settings, fingerprints, warn) if settings.chat_data else None
    if settings.lm_data:  # tokenise (cached) and check the data now: too little text fails before any timing
        built = {}
        for p in prepared:
            key = (fingerprints[p.name], p.kind)
            if key not in built:
                log(f"tokenising {' '.join(settings.lm_data)} for {p.name}")
                built[key] = _heldout(p, settings)
            p.batches = built[key]
    reference = prepared[0].name
    differ = [n for n, f in fingerprints.items() if f != fingerprints[reference]]
    if differ:
        line = (f"{', '.join(differ)} use{'s' if len(differ) == 1 else ''} another tokenizer than {reference}: "
                "perplexity, FLOPs and speed are per token of each model's own tokenizer, so quality and speed "
                "ratios compare different units; read them with care")
        warn(line)
    return prepared, chat


def _prepare_chat(prepared: list[_Prepared], settings: ReportSettings, fingerprints: dict, warn) -> _ChatPlan:
    """The checks of ``alambic eval-chat`` for ``--chat-data``: chat template, final gold answers, one vocabulary,
    the positions each prompt needs; the first model is the teacher and must be a PyTorch model. GGUF exports answer
    in llama.cpp (or, without it, read back by transformers); other exports are left out with a note."""
    from alambic.data.chat import read_chat
    from alambic.evaluation.chat import chat_items, check_positions

    ref = prepared[0]
    if ref.export:
        raise AlambicError(f"--chat-data: the first model, {ref.name}, is an `alambic export` folder "
                           f"({ref.export['format']}), but it is the teacher of the chat metrics and they need a "
                           "PyTorch model: put the PyTorch teacher first")
    records = read_chat(settings.chat_data, need_response=False)  # as eval-chat: chat_items names a missing answer
    items = chat_items(records, ref.tokenizer, settings.chat_max_examples, f"{ref.name}'s tokenizer")
    skipped = {}
    for p in prepared:
        if p.export and p.export["format"] != "gguf":
            skipped[p.name] = (f"chat metrics need a model that generates: {p.name} is an `alambic export` folder "
                               f"({p.export['format']}), so its chat columns are empty (report its PyTorch source "
                               "or a GGUF export for them)")
            warn(f"{p.name}: {skipped[p.name]}")
            continue
        if p.kind != "causal":
            raise AlambicError(f"--chat-data: {p.name} is a {p.kind} model, not a causal language model: chat "
                               "metrics need decoder (instruct) models")
        if fingerprints[p.name] != fingerprints[ref.name]:
            raise AlambicError(f"--chat-data: {p.name} uses another tokenizer than {ref.name}: every model answers "
                               f"the same prompt tokens and is scored with {ref.name}'s tokenizer; report it without "
                               "--chat-data")
        if modeling.vocab_size(p.config) != modeling.vocab_size(ref.config):
            raise AlambicError(f"--chat-data: {p.name} has {modeling.vocab_size(p.config)} logit columns but "
                               f"{ref.name} {modeling.vocab_size(ref.config)}: the forward KL needs one vocabulary; "
                               "resize its embeddings")
        try:
            check_positions(p.config, items, settings.chat_max_new_tokens, p.name)
        except AlambicError as err:
            raise AlambicError(str(err).replace("--max-new-tokens", "--chat-max-new-tokens")) from None
    return _ChatPlan(items, ref.tokenizer, skipped)


def _heldout(p: _Prepared, settings: ReportSettings) -> list[dict]:
    from alambic.config import DataConfig
    from alambic.data.pipeline import heldout_batches

    data = " ".join(settings.lm_data)
    data_cfg = DataConfig(train=list(settings.lm_data), text_field=settings.text_field,
                          max_length=settings.eval_length, eval_max_tokens=settings.max_tokens)
    try:
        batches = heldout_batches(settings.lm_data, p.tokenizer, p.kind, data_cfg, settings.eval_batch_size)
    except AlambicError as err:
        raise AlambicError(f"--lm-data {data} for {p.name}: {str(err).replace('max_length', '--max-length')}") \
            from None
    if not batches or not sum(len(b["lm_targets"]) for b in batches):
        raise AlambicError(f"--lm-data {data} gives no evaluable sequence of {settings.eval_length} tokens for "
                           f"{p.name}: add text or lower --max-length")
    return batches


def _lm_quality(model, architecture, p: _Prepared, settings: ReportSettings) -> dict:
    from alambic.evaluation.lm import evaluate_lm

    if not modeling.has_lm_head(architecture):
        return {"metric": None, "value": None, "source": "lm",
                "reason": f"{type(architecture).__name__} has no language-model head (a bare encoder): held-out "
                          "perplexity / masked-token accuracy is not measurable for it"}
    device = "cuda" if torch.cuda.is_available() and not p.export else "cpu"
    model.to(device)
    try:
        metrics = evaluate_lm(model, p.batches)
    finally:
        model.to("cpu")
    masked = p.kind == "masked"
    return {"metric": "masked_accuracy" if masked else "perplexity", "higher_is_better": masked,
            "value": metrics["masked_accuracy"] if masked else metrics["perplexity"], "source": "lm",
            "data": list(settings.lm_data), "max_length": settings.eval_length, "device": device,
            "dtype": getattr(model, "precision", None) or "float32", **metrics}


def _task_quality(p: _Prepared, settings: ReportSettings) -> dict:
    """The task's main metric (accuracy / entity F1 / SQuAD F1) with the others, as ``alambic eval-task`` gives."""
    row = evaluate_models(settings.task, [p.spec], settings.data[0], _task_options(settings))[0]
    metric = MAIN_METRIC[settings.task]
    scores = {k: v for k, v in row.items() if k not in ("model", "parameters", "examples")}
    return {"metric": metric, "value": scores[metric], "higher_is_better": True, "source": "task",
            "task": settings.task, "data": list(settings.data), "examples": row["examples"], "scores": scores,
            "max_length": settings.eval_length}


def _chat_quality(chat: dict) -> dict:
    """The report's main quality from the chat figures (when no --lm-data is given): the accuracy of the generated
    answers on records with options, else ROUGE-L against the gold answers."""
    metrics = chat["metrics"]
    if metrics is None:
        return {"metric": None, "value": None, "source": "chat", "reason": chat["reason"]}
    metric = "accuracy" if "accuracy" in metrics else "rouge_l"
    return {"metric": metric, "value": metrics[metric], "higher_is_better": True, "source": "chat",
            "data": list(chat["data"]), "examples": chat["examples"]}


def _run_chat(prepared: list[_Prepared], plan: _ChatPlan, settings: ReportSettings, log) -> dict[str, dict]:
    """Per model name, the chat figures of :func:`alambic.evaluation.chat.evaluate_chat` with the first model as the
    teacher (the teacher's greedy answers are generated once, and are its own answers too)."""
    from alambic.evaluation.chat import TeacherAnswers, evaluate_model, generate_answers, load_chat_model
    from alambic.teachers import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref, items = prepared[0], plan.items
    options = dict(max_new_tokens=settings.chat_max_new_tokens, batch_size=settings.eval_batch_size)
    common = {"data": list(settings.chat_data), "teacher": ref.name, "examples": len(items),
              "option_examples": sum(1 for item in items if item.options), "decoding": "greedy",
              "max_new_tokens": settings.chat_max_new_tokens, "max_examples": settings.chat_max_examples,
              "batch_size": settings.eval_batch_size, "device": device, "dtype": "float32"}
    log(f"chat: {len(items)} records of {' '.join(settings.chat_data)}, greedy answers of at most "
        f"{settings.chat_max_new_tokens} tokens; teacher {ref.name}")
    out: dict[str, dict] = {}
    teacher = load_model(ref.spec, kind="causal")[0].to(device)
    try:
        log(f"chat: {ref.name} answers (the teacher)")
        answers = generate_answers(teacher, plan.tokenizer, items, **options)
        taught = TeacherAnswers(teacher, answers)
        for p in prepared:
            if p.name in plan.skipped:
                out[p.name] = {**common, "metrics": None, "reason": plan.skipped[p.name]}
                log(f"chat: {p.name}: skipped ({plan.skipped[p.name].split(':')[0]})")
                continue
            model = teacher if p is ref else load_chat_model(p.spec, device)[0]
            runtime = {"runtime": f"{model.runtime} {model.precision}"} if p.export else {}
            metrics = evaluate_model(model, plan.tokenizer, items, teacher=taught,
                                     answers=answers if p is ref else None, **options)
            del model
            metrics.pop("examples", None)
            metrics.pop("option_examples", None)
            out[p.name] = {**common, **runtime, "metrics": metrics}
            log(f"chat: {p.name}: " + ", ".join(f"{label} {metrics[key]:.4g}" for key, label in CHAT_COLUMNS
                                                   if key in metrics))
    finally:
        del teacher
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


def _measure(p: _Prepared, index: int, total: int, settings: ReportSettings, log,
             chat: dict | None = None) -> tuple[dict, object]:
    """Everything but speed: size, FLOPs and quality. Returns the row and the loaded model, which stays in memory
    until every model is timed interleaved with the others (:func:`_time_models`)."""
    from alambic.evaluation.lm import weights_size_bytes

    tag = f"[{index}/{total}] {p.name}"
    start = time.perf_counter()
    log(f"{tag}: loading")
    if p.export:
        from alambic.export.runtime import exported_bytes, load_exported

        model = load_exported(p.path, p.export)
        architecture = _architecture(p, settings)  # FLOPs are the source architecture's
        params, disk = p.export["parameters"], exported_bytes(p.path, p.export)
    else:
        model = architecture = _load_torch(p, settings)
        params, disk = parameter_counts(model), weights_size_bytes(p.path)
    runtime = f"{getattr(model, 'runtime', 'torch')} {getattr(model, 'precision', '') or 'float32'}"
    head = flops_mod.head_type(architecture)
    log(f"{tag}: {params['total'] / 1e6:.4g}M parameters ({params['non_embedding'] / 1e6:.4g}M without "
        f"embeddings), {disk / 1e6:.4g} MB on disk, runs in {runtime}")
    flop_rows = []
    for length in settings.seq_lens:
        formula = flops_mod.flops_per_token(p.config, length, head)
        measured = flops_mod.measured_flops_per_token(architecture, length)
        flop_rows.append({"seq_len": length, "formula_per_token": formula.total, "measured_per_token": measured,
                          "relative_difference": (formula.total - measured) / measured if measured else None,
                          "breakdown": formula.to_dict()})
        log(f"{tag}: {measured / 1e6:.4g} MFLOPs/token at {length} tokens (formula {formula.total / 1e6:.4g})")

    # quality in float32: the GPU timing, after every model's quality, casts the weights to bf16
    if settings.task:
        log(f"{tag}: task {settings.task}")
        quality = _task_quality(p, settings)
    elif settings.lm_data:
        log(f"{tag}: held-out quality on {' '.join(settings.lm_data)}")
        quality = _lm_quality(model, architecture, p, settings)
    elif chat is not None:
        quality = _chat_quality(chat)
    else:
        quality = {"metric": None, "value": None, "source": None,
                   "reason": "no quality data given (--lm-data, --task or --chat-data)"}
    if quality.get("value") is not None:
        log(f"{tag}: {quality['metric']} {quality['value']:.4g}")
    elif quality.get("reason"):
        log(f"{tag}: quality not measured: {quality['reason']}")
    cfg = modeling._config(p.config)
    row = {
        "name": p.name, "spec": p.spec, "path": str(p.path), "kind": p.kind,
        "architecture": type(model).__name__, "layers": modeling.num_layers(cfg),
        "hidden_size": modeling.hidden_size(cfg), "vocab_size": modeling.vocab_size(cfg),
        "tokenizer": vocabulary_hash(p.tokenizer)[:16], "parameters": params,
        "disk_bytes": disk, "flops": flop_rows, "speed": [], "quality": quality,
        "ratios": None, "format": p.export["format"] if p.export else "pytorch", "runtime": runtime,
        "chat": chat, "budget": None,
    }
    del architecture
    log(f"{tag}: measured in {time.perf_counter() - start:.0f} s")
    return row, model


def _time_models(rows: list[dict], models: list, exported: list[bool], settings: ReportSettings,
                 devices: list[str], log) -> None:
    """Time every model interleaved with the others (:func:`speed_mod.time_interleaved`), on each device, length and
    batch, and fill each row's ``speed``; the first model is the reference of the paired speed-ups."""
    for device in devices:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        # an export runs where its runtime does: the CPU here
        here = [i for i, is_export in enumerate(exported) if device == "cpu" or not is_export]
        for i in here:
            if not exported[i]:
                models[i].to(device=device, dtype=dtype)
        for length in settings.seq_lens:
            for batch in sorted({1, settings.batch_size}):
                timed = speed_mod.time_interleaved(
                    {rows[i]["name"]: models[i] for i in here}, batch_size=batch, seq_len=length,
                    warmup=settings.warmup, min_rounds=settings.repeats,
                    max_rounds=settings.max_repeats if len(here) > 1 else settings.repeats,
                    tolerance=settings.tolerance)
                for i in here:
                    result = timed[rows[i]["name"]]
                    rows[i]["speed"].append(result)
                    paired = result.get("paired")
                    spread = (f", {paired['speedup']:.2f}x +-{paired['notch']:.2f} over {paired['reference']}"
                              if paired else "")
                    log(f"{rows[i]['name']}: {device} {result['dtype']} batch {batch} x {length} tokens: "
                        f"{result['ms_per_batch']:.1f} ms (IQR {1000 * result['p25_s']:.1f}-"
                        f"{1000 * result['p75_s']:.1f}, {result['repeats']} rounds), "
                        f"{result['tokens_per_s']:.0f} tokens/s{spread}")


def _load_torch(p: _Prepared, settings: ReportSettings):
    from alambic.teachers import load_model

    if settings.task:  # the fine-tuned model with its task head, as it will be deployed
        from alambic.tasks.models import load_task_model

        return load_task_model(p.spec, settings.task, need_head=True)[0].eval()
    return load_model(p.spec, kind=p.kind)[0]


def _architecture(p: _Prepared, settings: ReportSettings):
    """The exported model's architecture in PyTorch (fresh weights): what its FLOPs are counted on."""
    from alambic.modeling import head_auto_class

    return head_auto_class(p.export["head"]).from_config(p.config).eval()


def _ratios(row: dict, ref: dict) -> dict:
    ref_flops = {f["seq_len"]: f["measured_per_token"] for f in ref["flops"]}
    ref_speed = {(s["device"], s["batch_size"], s["seq_len"]): s for s in ref["speed"]}
    speed = []
    for s in row["speed"]:
        base = ref_speed.get((s["device"], s["batch_size"], s["seq_len"]))
        if base is None:
            continue
        mine = next(f["measured_per_token"] for f in row["flops"] if f["seq_len"] == s["seq_len"])
        paired = s.get("paired")  # timed in the same rounds as the reference: the median of per-round ratios
        speedup = paired["speedup"] if paired else base["median_s"] / s["median_s"]
        flop_ratio = ref_flops[s["seq_len"]] / mine
        speed.append({"device": s["device"], "batch_size": s["batch_size"], "seq_len": s["seq_len"],
                      "speedup": speedup, "notch": paired["notch"] if paired else None,
                      "rounds": paired["rounds"] if paired else None,
                      "flop_ratio": flop_ratio, "efficiency": speedup / flop_ratio})
    summary = {}
    for device in sorted({s["device"] for s in speed}):
        rows = [s for s in speed if s["device"] == device]
        latency = [s for s in rows if s["batch_size"] == 1]
        throughput = [s for s in rows if s["batch_size"] != 1] or latency
        summary[device] = {
            "latency_speedup_geomean": _geomean([s["speedup"] for s in latency]),
            "throughput_speedup_geomean": _geomean([s["speedup"] for s in throughput]),
            "flop_ratio_geomean": _geomean([s["flop_ratio"] for s in rows]),
            "efficiency_geomean": _geomean([s["efficiency"] for s in rows]),
        }
    q, rq = row["quality"], ref["quality"]
    retention = None
    if q.get("value") is not None and rq.get("value") is not None and q.get("metric") == rq.get("metric"):
        if q.get("higher_is_better"):
            retention = 100 * q["value"] / rq["value"] if rq["value"] else None
        else:
            retention = 100 * rq["value"] / q["value"] if q["value"] else None
    chat, ref_chat = (row.get("chat") or {}).get("metrics"), (ref.get("chat") or {}).get("metrics")
    chat_retention = None
    if chat is not None and ref_chat is not None:  # gold metrics, higher is better: model / reference
        chat_retention = {k: 100 * chat[k] / ref_chat[k] if ref_chat[k] else None
                          for k in CHAT_RETAINED if k in chat and k in ref_chat}
    return {
        "parameters": row["parameters"]["total"] / ref["parameters"]["total"],
        "non_embedding_parameters": (row["parameters"]["non_embedding"] / ref["parameters"]["non_embedding"]
                                     if ref["parameters"]["non_embedding"] else None),
        "disk": row["disk_bytes"] / ref["disk_bytes"] if ref["disk_bytes"] else None,
        "flops": [{"seq_len": f["seq_len"], "ratio": ref_flops[f["seq_len"]] / f["measured_per_token"]}
                  for f in row["flops"] if f["seq_len"] in ref_flops],
        "speed": speed,
        "summary": summary,
        "quality_retention_pct": retention,
        "chat_retention_pct": chat_retention,
    }


def _shape_label(shape: dict) -> str:
    return f"{shape['depth']}x{shape['hidden']} f{shape['ffn']}"


def _budget_kept(row: dict, search: dict, note, log) -> dict:
    """Whether a student whose shape was searched for a budget keeps it, measured here against the reference
    (its teacher): met when the measured speed-up is at least (1 - slack) x the budget (a latency: at most
    (1 + slack) x), slack = the larger of the search's promise tolerance (5%, the bound of one model timed against
    itself) and this measurement's own interval."""
    budget, tolerance = search["budget"], search.get("promise_tolerance", 0.05)
    where = (budget["device"], budget["batch_size"], budget["seq_len"])
    candidates = [{"key": c["key"], "label": _shape_label(c["shape"]), "status": c["status"],
                   "speedup": (c["timing"] or {}).get("speedup"), "divergence": c.get("score", c["divergence"])}
                  for c in search["candidates"] if c["timing"] is not None or c["divergence"] is not None]
    out = {"budget": budget, "chosen": search["chosen"], "tolerance": tolerance, "measured": None, "notch": None,
           "met": None, "missed_by": None, "candidates": candidates, "search_steps": search.get("search_steps", 0)}
    conditions = f"batch {budget['batch_size']} x {budget['seq_len']} tokens on {budget['device']}"
    if budget.get("params") is not None:
        measured, target, slack = row["parameters"]["total"], budget["params"], 0.0
        met, missed = measured <= target, measured / target - 1
        what = f"{measured / 1e6:.2f}M parameters for at most {target / 1e6:.4g}M"
    else:
        ratio = next((r for r in row["ratios"]["speed"] if (r["device"], r["batch_size"], r["seq_len"]) == where),
                     None)
        timed = next((s for s in row["speed"] if (s["device"], s["batch_size"], s["seq_len"]) == where), None)
        if ratio is None or timed is None:
            note(f"{row['name']}: its shape was searched for a budget at {conditions}, which this report did not "
                 f"time: add --seq-lens {budget['seq_len']} (batch 1 is always timed; --batch-size for another)")
            return out
        notch = ratio.get("notch") or 0.0
        if budget.get("speedup") is not None:
            measured, target = ratio["speedup"], budget["speedup"]
            slack = max(tolerance, notch / measured)
            met, missed = measured >= target * (1 - slack), 1 - measured / target
            what = f"{measured:.2f}x +-{notch:.2f} for {target:g}x"
        else:
            measured, target = timed["ms_per_batch"], budget["latency_ms"]
            slack = tolerance
            met, missed = measured <= target * (1 + slack), measured / target - 1
            what = f"{measured:.2f} ms for at most {target:g} ms"
        out["notch"] = notch
    out.update(measured=measured, met=met, slack=slack, missed_by=None if met else missed)
    if met:
        log(f"{row['name']}: budget kept: {what} at {conditions} (tolerance {100 * slack:.0f}%)")
    else:
        note(f"{row['name']} misses the budget its shape was searched for: {what} at {conditions}, "
             f"{100 * missed:.0f}% short, beyond the {100 * slack:.0f}% the machine's noise allows")
    return out


def _warn_stderr(line: str) -> None:
    print(f"alambic: warning: {line}", file=sys.stderr, flush=True)


def build_report(models: list[str], settings: ReportSettings | None = None, *,
                 log: Callable[[str], None] | None = _stderr, warn: Callable[[str], None] | None = _warn_stderr,
                 command: str | None = None) -> dict:
    """Measure every model (the first is the reference) and return the report as a JSON-ready dict.
    ``log`` receives progress lines, ``warn`` each caveat as it is found (all also land in ``report["warnings"]``)."""
    settings = settings or ReportSettings()
    log = log or (lambda line: None)
    notes = _Notes(warn)
    prepared, chat = _prepare(list(models), settings, notes, log)
    threads = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        return _build(prepared, chat, settings, notes, log, command)
    finally:
        torch.set_num_threads(threads)  # the caller's setting, as it was


class _Notes:
    """Caveats found while measuring: kept for the report and passed on to ``warn`` as they come."""

    def __init__(self, warn):
        self.lines: list[str] = []
        self.warn = warn

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        if self.warn:
            self.warn(line)


def _build(prepared: list[_Prepared], chat: _ChatPlan | None, settings: ReportSettings, note: _Notes, log,
           command) -> dict:
    devices = sorted(set(settings.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])))
    machine = speed_mod.machine_info()
    cores, load = machine["cpu_affinity"], machine["load_average"]
    if cores and load and load[0] > 0.5 * cores:
        line = (f"the machine was busy when the report started (load average {machine['load_average'][0]:.1f} on "
                f"{machine['cpu_affinity']} cores): timings are slower and noisier than on an idle machine")
        note(line)
    # chat first, in float32, with the teacher and one model in memory; then one model at a time for the rest
    chats = _run_chat(prepared, chat, settings, log) if chat is not None else {}
    measured = [_measure(p, i, len(prepared), settings, log, chats.get(p.name))
                for i, p in enumerate(prepared, 1)]
    rows, models = [row for row, _ in measured], [model for _, model in measured]
    del measured
    try:
        _time_models(rows, models, [p.export is not None for p in prepared], settings, devices, log)
    finally:
        del models
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    for row, p in zip(rows, prepared):
        row["ratios"] = _ratios(row, rows[0])
        if p.search is not None and row is not rows[0]:
            row["budget"] = _budget_kept(row, p.search, note, log)
        for f in row["flops"]:
            if f["relative_difference"] is not None and abs(f["relative_difference"]) > 0.02:
                note(f"{row['name']}: the FLOP formula differs from the measured count by "
                     f"{100 * f['relative_difference']:+.1f}% at {f['seq_len']} tokens (an architecture the formula "
                     "does not cover); ratios use the measured count")
                break
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "alambic.report",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "machine": machine,
        "settings": {**asdict(settings), "devices": devices, "eval_length": settings.eval_length},
        "reference": rows[0]["name"],
        "models": rows,
        "warnings": note.lines,
    }


# --- rendering ----------------------------------------------------------------------------------------------------

def _budget_text(budget: dict) -> str:
    where = f" at b={budget['batch_size']} x {budget['seq_len']} ({budget['device']})"
    if budget.get("speedup") is not None:
        return f"{budget['speedup']:g}x{where}"
    if budget.get("latency_ms") is not None:
        return f"<= {budget['latency_ms']:g} ms{where}"
    return f"<= {budget['params'] / 1e6:.4g}M parameters"


def _measured_text(kept: dict) -> str:
    value, budget = kept["measured"], kept["budget"]
    if value is None:
        return "-"
    if budget.get("speedup") is not None:
        return f"{value:.2f}x +-{kept['notch']:.2f}"
    if budget.get("latency_ms") is not None:
        return f"{value:.2f} ms"
    return f"{value / 1e6:.2f}M"


def _speedup_cell(ratio: dict | None) -> str:
    """2.03x +-0.04 (the paired interval), or 2.03x for a report written before interleaved timing."""
    if ratio is None:
        return "-"
    notch = ratio.get("notch")
    return f"{ratio['speedup']:.2f}x" + (f" +-{notch:.2f}" if notch is not None else "")


def _quality_cell(q: dict) -> str:
    if q.get("value") is None:
        return "n/a"
    if q["metric"] == "perplexity":
        return f"ppl {q['value']:.4g}"
    if q["metric"] == "masked_accuracy":
        return f"acc {q['value']:.3f} (ppl {q['perplexity']:.4g})"
    return f"{q['metric']} {q['value']:.4g}"


def _chat_metrics(m: dict) -> dict | None:
    return (m.get("chat") or {}).get("metrics")


def _chat_cell(metrics: dict | None, key: str) -> str:
    value = metrics.get(key) if metrics else None
    return format_value(value, ".4g" if key in ("teacher_nll", "forward_kl", "mean_tokens") else ".3f")


CHAT_DETAIL = (("accuracy", "accuracy"), ("option_accuracy", "option acc."), ("option_accuracy_norm",
               "option acc. (norm)"), ("rouge_l", "ROUGE-L"), ("rouge_l_teacher", "ROUGE-L vs teacher"),
               ("teacher_nll", "teacher NLL"), ("forward_kl", "forward KL"), ("mean_tokens", "mean tokens"),
               ("hit_max_new_tokens", "cut off"))


def _chat_section(models: list[dict]) -> list[str]:
    """The *Chat* table: every chat metric of every model, and how they were measured."""
    ref = models[0]["chat"]
    keys = [(k, label) for k, label in CHAT_DETAIL if k in (ref["metrics"] or {})]
    with_options = (f" ({ref['option_examples']} with options)" if ref["option_examples"] else " (none with options)")
    out = [f"{ref['examples']} chat records of {' '.join(ref['data'])}{with_options}, prompts rendered with "
           f"{ref['teacher']}'s chat template, answered greedily (at most {ref['max_new_tokens']} new tokens, "
           f"{ref['dtype']} on {ref['device']}), as `alambic eval-chat --teacher {ref['teacher']}` scores them. "
           "accuracy: the answer's words begin with the gold answer's; option acc.: the gold option is the most "
           "likely answer (lm-eval's acc; norm: per byte); ROUGE-L: F1 against the gold answer (vs teacher: "
           f"against {ref['teacher']}'s answer); teacher NLL: {ref['teacher']}'s per-token NLL of the model's "
           f"answers; forward KL: KL({ref['teacher']} || model) per token of {ref['teacher']}'s answers; cut off: "
           "share of answers stopped by the token limit."
           + "".join(f" {m['name']} answered in {m['chat']['runtime']}."
                     for m in models if (m.get("chat") or {}).get("runtime")), ""]
    rows = []
    for m in models:
        metrics = _chat_metrics(m)
        rows.append([m["name"]] + [_chat_cell(metrics, k) for k, _ in keys])
    return out + _table(["model"] + [label for _, label in keys], rows)


def _table(header: list[str], rows: list[list[str]], right_from: int = 1, right_to: int | None = None) -> list[str]:
    right_to = len(header) if right_to is None else right_to
    align = ["---:" if right_from <= i < right_to else "---" for i in range(len(header))]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"] + [
        "| " + " | ".join(r) + " |" for r in rows]


def render_markdown(report: dict) -> str:
    h = headline(report)
    dev, length, batch = h["device"], h["seq_len"], h["batch_size"]
    models, ref = report["models"], report["reference"]
    settings, machine = report["settings"], report["machine"]
    out = ["# Distillation report", "",
           f"Reference: **{ref}**. Created {report['created']} by alambic {machine['alambic']}.", ""]
    if report.get("command"):
        out += ["```", report["command"], "```", ""]
    out += [f"## Summary ({dev}, {length} tokens)", ""]
    ref_chat = _chat_metrics(models[0])
    chat_columns = [(k, label) for k, label in CHAT_COLUMNS if k in (ref_chat or {})]
    chat_retained = [(k, label) for k, label in CHAT_COLUMNS if k in CHAT_RETAINED and k in (ref_chat or {})]
    chat_only = ref_chat is not None and all(m["quality"].get("source") == "chat" for m in models)
    quality = [] if chat_only else ["quality"]  # the chat columns hold the chat quality
    rows = []
    for m in models:
        flop = next(f for f in m["flops"] if f["seq_len"] == length)
        lat, thr = speed_row(m, dev, 1, length), speed_row(m, dev, batch, length)
        rows.append([m["name"], m.get("runtime", "torch float32"), f"{m['layers']}",
                     format_number(m["parameters"]["total"] / 1e6),
                     format_number(m["parameters"]["non_embedding"] / 1e6), format_number(m["disk_bytes"] / 1e6),
                     format_number(flop["measured_per_token"] / 1e9), format_number(lat and lat["ms_per_batch"]),
                     format_number(thr and thr["tokens_per_s"])]
                    + ([] if chat_only else [_quality_cell(m["quality"])])
                    + [_chat_cell(_chat_metrics(m), k) for k, _ in chat_columns])
    out += _table(["model", "runtime", "layers", "params (M)", "non-emb. params (M)", "size on disk (MB)",
                   "GFLOPs/token", "latency b=1 (ms)", f"throughput b={batch} (tokens/s)", *quality,
                   *(label for _, label in chat_columns)], rows, right_from=2)
    rows = []
    for m in models if len(models) > 1 else []:
        r = m["ratios"]
        lat, thr = speedup_row(m, dev, 1, length), speedup_row(m, dev, batch, length)
        fv = format_value
        rows.append([m["name"], fv(100 * r["parameters"], ".1f", "%"), fv(r["disk"] and 100 * r["disk"], ".1f", "%"),
                     _speedup_cell(lat), _speedup_cell(thr),
                     fv(lat and lat["flop_ratio"], ".2f", "x"), fv(lat and lat["efficiency"], ".2f"),
                     fv(thr and thr["efficiency"], ".2f")]
                    + ([] if chat_only else [format_percent(r["quality_retention_pct"])])
                    + [format_percent((r.get("chat_retention_pct") or {}).get(k)) for k, _ in chat_retained])
    if rows:
        out += ["", f"Relative to {ref}:", ""]
        out += _table(["model", "parameters", "size on disk", "speed-up b=1", f"speed-up b={batch}",
                       "FLOP ratio (ideal speed-up)", "speed-up / FLOP ratio b=1", f"speed-up / FLOP ratio b={batch}",
                       *(["quality retained"] if not chat_only else []),
                       *(f"{label} retained" for _, label in chat_retained)], rows)

    out += ["", "## Speed", "",
            f"The models are timed interleaved: each round runs one forward of every model, after "
            f"{settings['warmup']} untimed warm-up round{'s' if settings['warmup'] != 1 else ''}; random token ids, "
            f"all attended. Rounds repeat (at least {settings['repeats']}, at most "
            f"{settings.get('max_repeats', settings['repeats'])}) until each speed-up is known within "
            f"+-{100 * settings.get('tolerance', 0):.0f}%. median = median forward time, IQR = its 25th-75th "
            "percentile; speed-up = median of the per-round ratios reference / model, +- the half-width of its "
            "~95% interval (1.57 IQR / sqrt(rounds), McGill et al. 1978).", ""]
    rows = []
    for m in models:
        for s in m["speed"]:
            rr = speedup_row(m, s["device"], s["batch_size"], s["seq_len"])
            threads = f" ({s['threads']} thread{'s' if s['threads'] != 1 else ''})" if s["threads"] else ""
            rows.append([m["name"], f"{s['device']} {s.get('runtime', 'torch')} {s['dtype']}{threads}",
                         str(s["batch_size"]), str(s["seq_len"]), f"{s['ms_per_batch']:.2f}",
                         f"{1000 * s['p25_s']:.2f}-{1000 * s['p75_s']:.2f}", f"{s['tokens_per_s']:.0f}",
                         _speedup_cell(rr), format_value(rr and rr["efficiency"], ".2f")])
    out += _table(["model", "device", "batch", "tokens", "median (ms)", "IQR (ms)", "tokens/s", "speed-up",
                   "speed-up / FLOP ratio"], rows, right_from=2)
    summaries = [(m["name"], d, s) for m in models for d, s in m["ratios"]["summary"].items()]
    if len(models) > 1:
        out += ["", "Geometric means over the sequence lengths:", ""]
        out += _table(["model", "device", "speed-up b=1", f"speed-up b={batch}", "FLOP ratio", "speed-up / FLOP ratio"],
                      right_from=2, rows=
                      [[n, d, format_value(s["latency_speedup_geomean"], ".2f", "x"),
                        format_value(s["throughput_speedup_geomean"], ".2f", "x"),
                        format_value(s["flop_ratio_geomean"], ".2f", "x"),
                        format_value(s["efficiency_geomean"], ".2f")] for n, d, s in summaries if n != ref])

    searched = [m for m in models if m.get("budget")]
    if searched:
        out += ["", "## Budget", "",
                "Students whose shape `alambic init-student --target-...` searched for a budget, measured here "
                "against the reference; kept within the larger of the search's tolerance and the measurement's "
                "interval.", ""]
        out += _table(["model", "budget", "measured", "tolerance", "kept"], [[
            m["name"], _budget_text(m["budget"]["budget"]), _measured_text(m["budget"]),
            format_value(m["budget"].get("slack") and 100 * m["budget"]["slack"], ".0f", "%"),
            {True: "yes", False: f"no ({100 * (m['budget']['missed_by'] or 0):.0f}% short)", None: "not timed"}[
                m["budget"]["met"]]] for m in searched], right_from=2, right_to=3)

    out += ["", "## FLOPs per token", "",
            "Forward pass, 2 FLOPs per multiply-accumulate, matrix products only (linear layers, attention, head); "
            "computed from the configuration and counted on the model with torch.utils.flop_counter.", ""]
    rows = [[m["name"], str(f["seq_len"]), format_number(f["formula_per_token"] / 1e6),
             format_number(f["measured_per_token"] / 1e6),
             format_value(100 * f["relative_difference"], "+.2f", "%") if f["relative_difference"] else "0"]
            for m in models for f in m["flops"]]
    out += _table(["model", "tokens", "formula (MFLOPs/token)", "measured (MFLOPs/token)", "difference"], rows)

    out += ["", "## Quality", ""]
    rows = []
    for m in models if not chat_only else []:
        q = m["quality"]
        if q.get("value") is None:
            rows.append([m["name"], "n/a", "-", "-", q.get("reason", "")])
            continue
        detail = (f"{q.get('tokens', '-')} tokens of {' '.join(q['data'])}, {q.get('max_length', '-')} per sequence"
                  if q["source"] == "lm" else
                  f"{q.get('examples', '-')} {q.get('task')} examples of {' '.join(q['data'])}: "
                  + ", ".join(f"{k} {v:.4g}" for k, v in q.get("scores", {}).items()))
        rows.append([m["name"], q["metric"], f"{q['value']:.4g}",
                     format_percent(m["ratios"]["quality_retention_pct"]), detail])
    if rows:
        out += _table(["model", "metric", "value", "retained", "measured on"], rows, right_from=2, right_to=4)
    if any(m["quality"].get("metric") == "perplexity" for m in models):
        out += ["", "Retention: reference / model for perplexity (lower is better), model / reference for "
                "accuracy-like metrics."]
    if ref_chat is not None:
        out += ([] if chat_only else ["", "### Chat", ""]) + _chat_section(models)

    gpu = machine.get("gpu")
    out += ["", "## Machine", "",
            f"- CPU: {machine['cpu']}, {machine['cpu_count']} cores ({machine['cpu_affinity']} usable), "
            f"torch threads {machine['torch_threads']}"
            + (f", load average {machine['load_average'][0]:.2f} at start" if machine.get("load_average") else ""),
            f"- GPU: {gpu} (bf16)" if gpu else "- GPU: none",
            f"- {machine['platform']}; Python {machine['python']}, torch {machine['torch']}, "
            f"transformers {machine['transformers']}"]
    if report["warnings"]:
        out += ["", "## Notes", ""] + [f"- {w}" for w in report["warnings"]]
    return "\n".join(out) + "\n"


# --- writing ------------------------------------------------------------------------------------------------------

def write_report(report: dict, out_dir, *, plots: bool = True) -> list[Path]:
    """``report.json``, ``report.md`` and (when matplotlib is installed) the plots in ``out_dir``, each written
    atomically; returns the paths written."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise AlambicError(f"--out {out_dir} is a file; give a folder for the report")
    text = render_markdown(report)  # render everything before the first write
    payload = json.dumps(report, indent=2, default=str) + "\n"
    written = []
    if plots:
        from alambic.evaluation.plots import MissingMatplotlib, plot_quality_vs_speed, plot_search, plot_speed

        try:
            written += [plot_quality_vs_speed(report, out_dir / "quality_vs_speed.png"),
                        plot_speed(report, out_dir / "speed.png")]
            written += [plot_search(m, out_dir / f"search-{re.sub(r'[^A-Za-z0-9._-]+', '-', m['name'])}.png")
                        for m in report["models"] if m.get("budget")]
        except MissingMatplotlib as err:  # the tables still matter without matplotlib
            line = f"plots skipped: {err}"
            report["warnings"].append(line)
            _warn_stderr(line)
            text, payload = render_markdown(report), json.dumps(report, indent=2, default=str) + "\n"

    atomic_write_text(out_dir / "report.json", payload)
    atomic_write_text(out_dir / "report.md", text)
    return [out_dir / "report.json", out_dir / "report.md"] + written


def check_out_dir(out_dir) -> None:
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise AlambicError(f"--out {out_dir} is a file; give a folder for the report")
