"""Model cards (README.md) for exported students: how the student was made, from the run's resolved
configuration, and, once ``alambic report --card DIR`` has measured it, the report's figures.

The report's figures sit between two HTML comments (:data:`REPORT_START`, :data:`REPORT_END`), so re-running the
report replaces them and leaves the rest of the card (and anything a user wrote) untouched.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from alambic.cache import atomic_write_text
from alambic.errors import AlambicError

REPORT_START = "<!-- alambic-report:start -->"
REPORT_END = "<!-- alambic-report:end -->"
RECIPE_NAMES = {
    "distilbert": "DistilBERT's triple loss (soft targets, hard LM loss, cosine on last hidden states)",
    "tinybert": "TinyBERT's intermediate-layer distillation (embedding, hidden-state and attention MSE)",
    "minilm": "MiniLMv2's self-attention relation distillation (Q-Q, K-K, V-V)",
}


def _loss_docs(recipe: str) -> dict:
    try:
        from alambic.config import config_help, loss_config_class

        return {name: doc for name, _, doc in config_help(loss_config_class(recipe))}
    except AlambicError:
        return {}


def _front_matter() -> list[str]:
    return ["---", "library_name: transformers", "tags:", "- distillation", "- alambic", "---", ""]


def _selection_body(selection_card: str | None) -> list[str]:
    """The '## Layer selection' part of a card written by layer selection (its title and front matter dropped)."""
    if not selection_card:
        return []
    marker = selection_card.find("## ")
    return [selection_card[marker:].rstrip(), ""] if marker >= 0 else []


def distillation_card(config: dict, *, teacher_parameters: int | None = None, student_parameters: int | None = None,
                      teacher_layers: int | None = None, student_layers: int | None = None,
                      metrics: dict | None = None, selection_card: str | None = None, title: str | None = None,
                      kind: str | None = None, precision: str | None = None) -> str:
    """A Hugging Face model card recording how a student was distilled: teacher, student construction, recipe,
    losses and their weights, data and training, from the run's resolved ``config`` (``DistillConfig.to_dict()`` or
    the run's ``config.yaml``); ``metrics``: the last logged figures (losses, ``eval/*``); ``kind``: causal or
    masked (names the Auto class in the usage snippet); ``precision``: the precision the run resolved
    ``training.mixed_precision`` to, and why (the configured value when not given)."""
    from alambic import __version__

    teacher = config.get("teacher", "?")
    recipe = config.get("recipe", "distilbert")
    student, data = config.get("student") or {}, config.get("data") or {}
    loss, training = config.get("loss") or {}, config.get("training") or {}
    depth = f"{student_layers}-layer " if student_layers else ""
    lines = _front_matter() + [f"# {title or f'A {depth}distilled student of {teacher}'}", "",
                               f"Distilled from `{teacher}` with alambic {__version__}, "
                               f"recipe `{recipe}`: {RECIPE_NAMES.get(recipe, recipe)}.", "",
                               "## How it was made", ""]
    from alambic.evaluation.report_format import format_number

    params = lambda n: f", {format_number(n / 1e6)}M parameters" if n else ""  # noqa: E731
    layers = lambda n: f"{n} layers" if n else ""  # noqa: E731
    lines.append(f"- teacher: `{teacher}` "
                 f"({layers(teacher_layers) or 'layers not recorded'}{params(teacher_parameters)})")
    if student.get("init"):
        built = f"an existing model, `{student['init']}`"
    else:
        built = f"the teacher's layers `{student.get('layers', 'every-other')}` copied"
        widths = [f"{k.replace('_', ' ')} {student[k]}" for k in ("hidden_size", "intermediate_size", "num_heads")
                  if student.get(k)]
        if widths:
            how = ("freshly initialised where shapes differ" if student.get("width_init") == "random" else
                   "sliced from the teacher by measured importance")
            built += f", narrowed to {', '.join(widths)} ({how})"
        else:
            built += " with the embeddings, final norm and LM head"
    lines.append(f"- student: {built} ({layers(student_layers) or 'layers not recorded'}{params(student_parameters)})")
    if config.get("teacher_logits"):
        lines.append(f"- teacher outputs: read from the cache `{config['teacher_logits']}` (`alambic cache-teacher`); "
                     "the teacher did not run while training")
    auto = {"causal": "AutoModelForCausalLM", "masked": "AutoModelForMaskedLM"}.get(kind, "AutoModel")
    docs = _loss_docs(recipe)
    weights = {k: v for k, v in loss.items() if k.startswith("alpha_")}
    if weights:
        lines += ["", "| loss term | weight | what it is |", "| --- | ---: | --- |"]
        for key, value in weights.items():
            lines.append(f"| {key[len('alpha_'):]} | {value:g} | {docs.get(key, '')} |")
        lines.append("")
    others = {k: v for k, v in loss.items() if not k.startswith("alpha_") and v is not None
              and not (kind == "causal" and k.startswith("mlm_"))}  # masking options do nothing for a decoder
    if others:
        lines.append("- other loss options: " + ", ".join(f"{k} = {v}" for k, v in others.items()))
    train = data.get("train") or []
    lines.append(f"- data: {', '.join(f'`{t}`' for t in train) or 'not recorded'}; sequences of up to "
                 f"{data.get('max_length', '?')} tokens")
    on_policy = config.get("on_policy") or {}
    if on_policy.get("lmbda"):
        lines.append(f"- on-policy (GKD): with probability {on_policy['lmbda']:g} a batch's answers were sampled from "
                     f"the student itself (up to {on_policy.get('max_new_tokens')} tokens, temperature "
                     f"{on_policy.get('temperature')}, top-p {on_policy.get('top_p')}) and scored by the teacher")
    steps, batch, accum = training.get("max_steps"), training.get("batch_size"), training.get("grad_accum", 1)
    if steps and batch:
        tokens = steps * batch * accum * int(data.get("max_length") or 0)
        lines.append(f"- training: {steps} steps of {batch} x {accum} sequences per process (up to {tokens:,} tokens "
                     f"per process); AdamW, lr {training.get('lr')}, {training.get('schedule', 'linear')} schedule, "
                     f"warm-up {training.get('warmup_ratio')}, gradient clip {training.get('grad_clip')}, "
                     f"seed {training.get('seed')}, mixed precision {precision or training.get('mixed_precision')}")
    if metrics:
        shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and (k.startswith(("loss", "eval/")))}
        if shown:
            step = metrics.get("step")
            lines.append(f"- last logged{f' (step {step})' if step is not None else ''}: "
                         + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))
    lines += [""] + _selection_body(selection_card)
    lines += ["## Use", "", "```python",
              f"from transformers import {auto}, AutoTokenizer",
              f'model = {auto}.from_pretrained("path/to/this/folder")',
              'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")  # the teacher\'s tokenizer',
              "```", "",
              "<details><summary>The run's resolved configuration (<code>alambic distill --config</code> it to "
              "reproduce)</summary>", "", "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip(), "```", "",
              "</details>", ""]
    return "\n".join(lines)


def last_logged(run_dir) -> dict:
    """The latest value of every figure in ``RUN_DIR/metrics.jsonl`` (eval/* appear on few lines), with its step."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    last: dict = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        last.update(record)  # eval/* appear on few lines: keep the latest of each
    return last


def card_from_run(run_dir, student_dir=None) -> str | None:
    """The card :func:`distillation_card` writes, rebuilt from a finished run folder (config.yaml, metrics.jsonl);
    None when ``run_dir`` holds no run configuration."""
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        return None
    if not isinstance(config, dict) or "teacher" not in config:
        return None
    student_layers = kind = None
    if student_dir is not None and (Path(student_dir) / "config.json").is_file():
        from transformers import AutoConfig

        from alambic import modeling

        try:
            student_config = AutoConfig.from_pretrained(student_dir)
            student_layers, kind = modeling.num_layers(student_config), modeling.model_kind(student_config)
        except (AlambicError, ValueError, OSError):
            pass
    return distillation_card(config, student_layers=student_layers, metrics=last_logged(run_dir), kind=kind)


def report_section(report: dict, index: int, report_path: str | None = None) -> str:
    """The figures of ``report`` for its model ``index``, next to the reference's, as a card section."""
    from alambic.evaluation.report_format import (format_number, format_percent, format_value, headline, speed_row,
                                                  speedup_row)

    m, ref = report["models"][index], report["models"][0]
    h = headline(report)
    dev, length, batch = h["device"], h["seq_len"], h["batch_size"]
    machine = report["machine"]
    is_ref = index == 0
    r = m["ratios"]

    def pair(mine, theirs, rel=None):
        return [theirs, mine + (f" ({rel})" if rel else "")] if not is_ref else [mine]

    flop = next(f for f in m["flops"] if f["seq_len"] == length)
    ref_flop = next(f for f in ref["flops"] if f["seq_len"] == length)
    rows = [
        ["parameters"] + pair(f"{format_number(m['parameters']['total'] / 1e6)}M",
                              f"{format_number(ref['parameters']['total'] / 1e6)}M", f"{100 * r['parameters']:.1f}%"),
        ["parameters without embeddings"] + pair(f"{format_number(m['parameters']['non_embedding'] / 1e6)}M",
                                                 f"{format_number(ref['parameters']['non_embedding'] / 1e6)}M"),
        ["size on disk"] + pair(f"{format_number(m['disk_bytes'] / 1e6)} MB",
                                f"{format_number(ref['disk_bytes'] / 1e6)} MB",
                                r["disk"] and f"{100 * r['disk']:.1f}%"),
        [f"GFLOPs per token ({length} tokens)"] + pair(format_number(flop["measured_per_token"] / 1e9),
                                                       format_number(ref_flop["measured_per_token"] / 1e9)),
    ]
    for b, label in ((1, "latency"), (batch, "throughput")):
        mine, theirs, rel = speed_row(m, dev, b, length), speed_row(ref, dev, b, length), speedup_row(m, dev, b, length)
        if mine is None:
            continue
        if b == 1:
            value = lambda s: f"{format_number(s['ms_per_batch'])} ms"  # noqa: E731
        else:
            value = lambda s: f"{s['tokens_per_s']:.0f} tokens/s"  # noqa: E731
        rows.append([f"{dev} {label}, batch {b} x {length} tokens"]
                    + pair(value(mine), value(theirs) if theirs else "-",
                           rel and f"{rel['speedup']:.2f}x faster, {rel['efficiency']:.2f} of the FLOP-ratio ideal"))
    q, rq = m["quality"], ref["quality"]
    if q.get("value") is not None:
        rows.append([q["metric"]] + pair(f"{q['value']:.4g}", format_value(rq.get("value"), ".4g"),
                                         r["quality_retention_pct"] is not None
                                         and f"{format_percent(r['quality_retention_pct'])} retained"))
    else:
        rows.append(["quality"] + pair("not measured", format_value(rq.get("value"), ".4g")))
    header = ["", f"reference: {ref['name']}", "this model"] if not is_ref else ["", "this model"]
    lines = [REPORT_START, "## Measured (alambic report)", "",
             f"Measured on {report['created'][:10]}: {machine['cpu']}, torch {machine['torch']} with "
             f"{machine['torch_threads']} CPU thread{'s' if machine['torch_threads'] != 1 else ''}"
             + (f", GPU {machine['gpu']}" if machine.get("gpu") else "") + ".", "",
             "| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    if q.get("source") == "lm" and q.get("value") is not None:
        lines += ["", f"Quality: {q['tokens']} held-out tokens of {', '.join(q['data'])}, "
                  f"{q['max_length']} per sequence."]
    if report.get("warnings"):
        lines += [""] + [f"- note: {w}" for w in report["warnings"]]
    if report.get("command"):
        lines += ["", "Measured with:", "", "```", report["command"], "```"]
    if report_path:
        lines += ["", f"Full report: `{report_path}`"]
    lines.append(REPORT_END)
    return "\n".join(lines) + "\n"


def add_report_to_card(student_dir, report: dict, index: int, report_path: str | None = None) -> Path:
    """Write (or replace) the report's section in ``student_dir/README.md``. A folder without a card gets one:
    rebuilt from the run (``config.yaml`` next to it) when there is one, otherwise a minimal title."""
    student_dir = Path(student_dir)
    path = student_dir / "README.md"
    section = report_section(report, index, report_path)
    if path.is_file():
        text = path.read_text(encoding="utf-8")
    else:
        text = card_from_run(student_dir.parent, student_dir) or "\n".join(
            _front_matter() + [f"# {report['models'][index]['name']}", "",
                               "No record of how this model was made was found (no README.md, and no run "
                               "config.yaml next to its folder).", ""])
    start, end = text.find(REPORT_START), text.find(REPORT_END)
    if start >= 0 and end > start:
        text = text[:start] + section + text[end + len(REPORT_END):].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    atomic_write_text(path, text)
    return Path(path)
