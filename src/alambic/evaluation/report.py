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
              "parameters", "disk_bytes", "flops", "speed", "quality", "ratios", "format", "runtime")


@dataclass
class ReportSettings:
    seq_lens: list[int] = field(default_factory=lambda: [64, 128])
    """Sequence lengths timed (and at which FLOPs per token are computed)."""
    batch_size: int = 8
    """Batch of the throughput measurement (latency is always batch 1)."""
    warmup: int = 2
    repeats: int = 5
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
    names: list[str] | None = None

    def check(self, n_models: int) -> None:
        if not self.seq_lens or any(length < 1 for length in self.seq_lens):
            raise AlambicError(f"--seq-lens must be positive token counts such as 64,128, got {self.seq_lens}")
        for name, low in (("batch_size", 1), ("repeats", 1), ("warmup", 0), ("max_tokens", 1), ("eval_batch_size", 1)):
            if getattr(self, name) < low:
                flag = "--" + name.replace("_", "-")
                raise AlambicError(f"{flag} must be at least {low}, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise AlambicError(f"--threads must be at least 1, got {self.threads}")
        if self.max_length is not None and self.max_length < 8:
            raise AlambicError(f"--max-length must be at least 8 tokens, got {self.max_length}")
        if self.task and self.lm_data:
            raise AlambicError("give either --task T --data F (task metric) or --lm-data F (held-out perplexity), "
                               "not both")
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


def _prepare(models: list[str], settings: ReportSettings, warn, log) -> list[_Prepared]:
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
        prepared.append(_Prepared(str(spec), name, path, config, kind, tokenizer, export=manifest))
    fingerprints = {p.name: vocabulary_hash(p.tokenizer)[:16] for p in prepared}
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
    return prepared


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


def _measure(p: _Prepared, index: int, total: int, settings: ReportSettings, devices: list[str], log) -> dict:
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

    # quality first, in float32: the GPU timing below leaves the weights in bf16
    if settings.task:
        log(f"{tag}: task {settings.task}")
        quality = _task_quality(p, settings)
    elif settings.lm_data:
        log(f"{tag}: held-out quality on {' '.join(settings.lm_data)}")
        quality = _lm_quality(model, architecture, p, settings)
    else:
        quality = {"metric": None, "value": None, "source": None,
                   "reason": "no quality data given (--lm-data or --task)"}
    if quality.get("value") is not None:
        log(f"{tag}: {quality['metric']} {quality['value']:.4g}")
    elif quality.get("reason"):
        log(f"{tag}: quality not measured: {quality['reason']}")
    speed_rows = []
    for device in devices if not p.export else ["cpu"]:  # an export runs where its runtime does: the CPU here
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        if not p.export:
            model.to(device=device, dtype=dtype)
        for length in settings.seq_lens:
            for batch in sorted({1, settings.batch_size}):
                row = speed_mod.time_forward(model, batch_size=batch, seq_len=length, warmup=settings.warmup,
                                             repeats=settings.repeats)
                speed_rows.append(row)
                log(f"{tag}: {device} {row['dtype']} batch {batch} x {length} tokens: {row['ms_per_batch']:.1f} ms "
                    f"(IQR {1000 * row['p25_s']:.1f}-{1000 * row['p75_s']:.1f}, {settings.repeats} runs), "
                    f"{row['tokens_per_s']:.0f} tokens/s")

    cfg = modeling._config(p.config)
    row = {
        "name": p.name, "spec": p.spec, "path": str(p.path), "kind": p.kind,
        "architecture": type(model).__name__, "layers": modeling.num_layers(cfg),
        "hidden_size": modeling.hidden_size(cfg), "vocab_size": modeling.vocab_size(cfg),
        "tokenizer": vocabulary_hash(p.tokenizer)[:16], "parameters": params,
        "disk_bytes": disk, "flops": flop_rows, "speed": speed_rows, "quality": quality,
        "ratios": None, "format": p.export["format"] if p.export else "pytorch", "runtime": runtime,
    }
    del model, architecture
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    log(f"{tag}: done in {time.perf_counter() - start:.0f} s")
    return row


def _load_torch(p: _Prepared, settings: ReportSettings):
    from alambic.teachers import load_model

    if settings.task:  # the fine-tuned model with its task head, as it will be deployed
        from alambic.tasks.models import load_task_model

        return load_task_model(p.spec, settings.task, need_head=True)[0].eval()
    return load_model(p.spec, kind=p.kind)[0]


def _architecture(p: _Prepared, settings: ReportSettings):
    """The exported model's architecture in PyTorch (fresh weights): what its FLOPs are counted on."""
    from alambic.export.runtime import auto_class

    return auto_class(p.export["head"]).from_config(p.config).eval()


def _ratios(row: dict, ref: dict) -> dict:
    ref_flops = {f["seq_len"]: f["measured_per_token"] for f in ref["flops"]}
    ref_speed = {(s["device"], s["batch_size"], s["seq_len"]): s for s in ref["speed"]}
    speed = []
    for s in row["speed"]:
        base = ref_speed.get((s["device"], s["batch_size"], s["seq_len"]))
        if base is None:
            continue
        mine = next(f["measured_per_token"] for f in row["flops"] if f["seq_len"] == s["seq_len"])
        speedup = base["median_s"] / s["median_s"]
        flop_ratio = ref_flops[s["seq_len"]] / mine
        speed.append({"device": s["device"], "batch_size": s["batch_size"], "seq_len": s["seq_len"],
                      "speedup": speedup, "flop_ratio": flop_ratio, "efficiency": speedup / flop_ratio})
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
    }


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
    prepared = _prepare(list(models), settings, notes, log)
    threads = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        return _build(prepared, settings, notes, log, command)
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


def _build(prepared: list[_Prepared], settings: ReportSettings, note: _Notes, log, command) -> dict:
    devices = sorted(set(settings.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])))
    machine = speed_mod.machine_info()
    cores, load = machine["cpu_affinity"], machine["load_average"]
    if cores and load and load[0] > 0.5 * cores:
        line = (f"the machine was busy when the report started (load average {machine['load_average'][0]:.1f} on "
                f"{machine['cpu_affinity']} cores): timings are slower and noisier than on an idle machine")
        note(line)
    rows = [_measure(p, i, len(prepared), settings, devices, log) for i, p in enumerate(prepared, 1)]
    for row in rows:
        row["ratios"] = _ratios(row, rows[0])
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

def _quality_cell(q: dict) -> str:
    if q.get("value") is None:
        return "n/a"
    if q["metric"] == "perplexity":
        return f"ppl {q['value']:.4g}"
    if q["metric"] == "masked_accuracy":
        return f"acc {q['value']:.3f} (ppl {q['perplexity']:.4g})"
    return f"{q['metric']} {q['value']:.4g}"


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
    rows = []
    for m in models:
        flop = next(f for f in m["flops"] if f["seq_len"] == length)
        lat, thr = speed_row(m, dev, 1, length), speed_row(m, dev, batch, length)
        rows.append([m["name"], m.get("runtime", "torch float32"), f"{m['layers']}",
                     format_number(m["parameters"]["total"] / 1e6),
                     format_number(m["parameters"]["non_embedding"] / 1e6), format_number(m["disk_bytes"] / 1e6),
                     format_number(flop["measured_per_token"] / 1e9), format_number(lat and lat["ms_per_batch"]),
                     format_number(thr and thr["tokens_per_s"]), _quality_cell(m["quality"])])
    out += _table(["model", "runtime", "layers", "params (M)", "non-emb. params (M)", "size on disk (MB)",
                   "GFLOPs/token", "latency b=1 (ms)", f"throughput b={batch} (tokens/s)", "quality"], rows,
                  right_from=2)
    rows = []
    for m in models if len(models) > 1 else []:
        r = m["ratios"]
        lat, thr = speedup_row(m, dev, 1, length), speedup_row(m, dev, batch, length)
        fv = format_value
        rows.append([m["name"], fv(100 * r["parameters"], ".1f", "%"), fv(r["disk"] and 100 * r["disk"], ".1f", "%"),
                     fv(lat and lat["speedup"], ".2f", "x"), fv(thr and thr["speedup"], ".2f", "x"),
                     fv(lat and lat["flop_ratio"], ".2f", "x"), fv(lat and lat["efficiency"], ".2f"),
                     fv(thr and thr["efficiency"], ".2f"), format_percent(r["quality_retention_pct"])])
    if rows:
        out += ["", f"Relative to {ref}:", ""]
        out += _table(["model", "parameters", "size on disk", "speed-up b=1", f"speed-up b={batch}",
                       "FLOP ratio (ideal speed-up)", "speed-up / FLOP ratio b=1", f"speed-up / FLOP ratio b={batch}",
                       "quality retained"], rows)

    out += ["", "## Speed", "",
            f"Median of {settings['repeats']} timed forwards after {settings['warmup']} untimed warm-up "
            f"forward{'s' if settings['warmup'] != 1 else ''}, random token ids, all attended; IQR = 25th-75th "
            "percentile of the repeats.", ""]
    rows = []
    for m in models:
        for s in m["speed"]:
            rr = speedup_row(m, s["device"], s["batch_size"], s["seq_len"])
            threads = f" ({s['threads']} thread{'s' if s['threads'] != 1 else ''})" if s["threads"] else ""
            rows.append([m["name"], f"{s['device']} {s.get('runtime', 'torch')} {s['dtype']}{threads}",
                         str(s["batch_size"]), str(s["seq_len"]), f"{s['ms_per_batch']:.2f}",
                         f"{1000 * s['p25_s']:.2f}-{1000 * s['p75_s']:.2f}", f"{s['tokens_per_s']:.0f}",
                         format_value(rr and rr["speedup"], ".2f", "x"), format_value(rr and rr["efficiency"], ".2f")])
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
    for m in models:
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
    out += _table(["model", "metric", "value", "retained", "measured on"], rows, right_from=2, right_to=4)
    if any(m["quality"].get("metric") == "perplexity" for m in models):
        out += ["", "Retention: reference / model for perplexity (lower is better), model / reference for "
                "accuracy-like metrics."]

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
        from alambic.evaluation.plots import MissingMatplotlib, plot_quality_vs_speed, plot_speed

        try:
            written += [plot_quality_vs_speed(report, out_dir / "quality_vs_speed.png"),
                        plot_speed(report, out_dir / "speed.png")]
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
