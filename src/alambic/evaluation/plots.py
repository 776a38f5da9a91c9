"""The figures of a distillation: quality vs speed-up of a report, training curves of a run, and the teacher's
softened output distribution at several temperatures (Hinton et al.'s soft targets, seed 003's figure).

matplotlib is optional (``pip install 'alambic[plots]'``); it is imported only when a figure is drawn, through its
object-oriented API (no pyplot state, no display needed). Every PNG is written to a temporary file and renamed.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import warnings
from pathlib import Path

import torch

from alambic import modeling
from alambic.errors import AlambicError


class MissingMatplotlib(AlambicError):
    pass


def readable_mode() -> int:
    """0o666 less the process umask: the mode an ordinary ``open(path, "w")`` would give."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingMatplotlib("plots need matplotlib: pip install 'alambic[plots]' (or pip install matplotlib)") \
            from None
    return Figure(figsize=(width, height), layout="constrained")


def save_png(fig, path) -> Path:
    """``fig`` as a PNG at ``path``, through a temporary sibling and a rename."""
    path = Path(path)
    if path.exists() and path.is_dir():
        raise AlambicError(f"{path} is a folder; give a file name ending in .png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, readable_mode())  # mkstemp makes 0600; a figure is meant to be shared
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Glyph .* missing")  # e.g. Hangul tokens without a CJK font
            fig.savefig(tmp, format="png", dpi=120)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --- report figures -----------------------------------------------------------------------------------------------

def plot_quality_vs_speed(report: dict, path) -> Path:
    """Quality retained (%) against measured speed-up (CPU, batch 1, longest length), marker area proportional to
    the parameter count; a hollow marker at the FLOP ratio shows the ideal speed-up. Without quality figures the
    y axis is the parameter share instead."""
    from alambic.evaluation.report_format import format_number, headline, speedup_row

    h = headline(report)
    models = report["models"]
    have_quality = [m for m in models if m["ratios"]["quality_retention_pct"] is not None]
    fig = _figure(7, 5)
    ax = fig.add_subplot()
    biggest = max(m["parameters"]["total"] for m in models)
    left_out, xs = [], []
    for i, m in enumerate(models):
        r = m["ratios"]
        speed = speedup_row(m, h["device"], 1, h["seq_len"])
        if speed is None:
            left_out.append(m["name"])
            continue
        y = r["quality_retention_pct"] if have_quality else 100 * r["parameters"]
        if y is None:
            left_out.append(m["name"])
            continue
        xs += [speed["speedup"], speed["flop_ratio"]]
        area = 1200 * m["parameters"]["total"] / biggest
        color = f"C{i % 10}"
        ax.scatter([speed["speedup"]], [y], s=area, color=color, alpha=0.6, edgecolors="black", linewidths=0.8,
                   label=f"{m['name']} ({format_number(m['parameters']['total'] / 1e6)}M params)", zorder=3)
        if i:
            ax.scatter([speed["flop_ratio"]], [y], s=area, facecolors="none", edgecolors=color, linestyles="--",
                       linewidths=1.2, zorder=2)
            ax.plot([speed["speedup"], speed["flop_ratio"]], [y, y], color=color, linestyle=":", linewidth=1)
        ax.annotate(m["name"], (speed["speedup"], y), textcoords="offset points", xytext=(8, 8), fontsize=9)
    ax.axhline(100, color="grey", linewidth=0.8, linestyle="--")
    ax.axvline(1, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel(f"measured speed-up vs {report['reference']} ({h['device']}, batch 1, {h['seq_len']} tokens)")
    if have_quality:
        metric = next(m["quality"]["metric"] for m in have_quality)
        ax.set_ylabel(f"quality retained (%, {metric})")
        title = "Quality vs speed-up (marker area ~ parameters; hollow: FLOP-ratio ideal)"
    else:
        ax.set_ylabel("parameters (% of the reference)")
        title = "Size vs speed-up (quality not measured; hollow: FLOP-ratio ideal)"
    if left_out:
        title += f"\nnot drawn (no quality or speed figure): {', '.join(left_out)}"
    ax.set_title(title, fontsize=10)
    ax.set_xlim(min(0.8, min(xs) * 0.9), max(1.2, max(xs) * 1.15))  # room for the names
    ax.margins(y=0.15)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best", markerscale=0.5)
    return save_png(fig, path)


def plot_search(model: dict, path) -> Path:
    """The shape search of a searched student (``model["budget"]`` of a report): every candidate ranked, speed-up
    (timed by the search, interleaved with the teacher) against calibration divergence after slicing; the budget as
    a vertical line, the choice as a star, and the student's speed-up measured by the report as a hollow star.
    Candidates timed but not ranked (they miss the budget, or a larger shape of their depth was ranked) sit on the
    bottom axis."""
    kept = model["budget"]
    budget, candidates = kept["budget"], kept["candidates"]
    fig = _figure(7, 5)
    ax = fig.add_subplot()
    ranked = [c for c in candidates if c["divergence"] is not None and c["speedup"] is not None]
    others = [c for c in candidates if c["divergence"] is None and c["speedup"] is not None]
    if ranked:
        ax.scatter([c["speedup"] for c in ranked], [c["divergence"] for c in ranked], color="C0", zorder=3,
                   label="meets the budget, ranked")
        for c in ranked:
            ax.annotate(c["label"], (c["speedup"], c["divergence"]), textcoords="offset points", xytext=(6, 4),
                        fontsize=7)
    if others:
        ax.scatter([c["speedup"] for c in others], [0] * len(others), marker="|", s=200, color="grey", zorder=2,
                   label="timed, not ranked", transform=ax.get_xaxis_transform())
    chosen = next((c for c in candidates if c["status"] == "chosen"), None)
    if chosen is not None and chosen["speedup"] is not None:
        ax.scatter([chosen["speedup"]], [chosen["divergence"]], marker="*", s=300, color="C3", zorder=4,
                   label="chosen (search timing)")
        if budget.get("speedup") is not None and kept.get("measured") is not None:
            ax.scatter([kept["measured"]], [chosen["divergence"]], marker="*", s=300, facecolors="none",
                       edgecolors="C3", zorder=4, label="chosen, measured by this report")
    if budget.get("speedup") is not None:
        ax.axvline(budget["speedup"], color="C3", linestyle="--", linewidth=1,
                   label=f"budget {budget['speedup']:g}x")
    speeds = [c["speedup"] for c in candidates if c["speedup"] is not None] + [budget.get("speedup") or 1.0]
    ax.set_xlim(min(speeds) * 0.95, max(speeds) * 1.05)
    ax.set_xlabel(f"speed-up vs the teacher (batch {budget['batch_size']}, {budget['seq_len']} tokens, "
                  f"{budget['device']} {budget['precision']})")
    steps = kept.get("search_steps")
    ax.set_ylabel("calibration KL from the teacher, "
                  + (f"after {steps} steps" if steps else "as sliced"))
    ax.set_title(f"Shape search of {model['name']}: {len(candidates)} candidates timed or ranked", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return save_png(fig, path)


def plot_speed(report: dict, path) -> Path:
    """Throughput (tokens/s, median with IQR bars) against sequence length, one panel per device and batch."""
    panels = sorted({(s["device"], s["batch_size"]) for m in report["models"] for s in m["speed"]})
    fig = _figure(5 * len(panels), 4)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (device, batch) in zip(axes, panels):
        for i, m in enumerate(report["models"]):
            rows = sorted((s for s in m["speed"] if (s["device"], s["batch_size"]) == (device, batch)),
                          key=lambda s: s["seq_len"])
            if not rows:
                continue
            x = [s["seq_len"] for s in rows]
            y = [s["tokens_per_s"] for s in rows]
            low = [t - s["batch_size"] * s["seq_len"] / s["p75_s"] for s, t in zip(rows, y)]
            high = [s["batch_size"] * s["seq_len"] / s["p25_s"] - t for s, t in zip(rows, y)]
            ax.errorbar(x, y, yerr=[low, high], marker="o", capsize=3, color=f"C{i % 10}", label=m["name"])
        dtype = next((s["dtype"] for m in report["models"] for s in m["speed"] if s["device"] == device), "")
        ax.set_title(f"{device} {dtype}, batch {batch}", fontsize=10)
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel("tokens / s")
        ax.set_xscale("log", base=2)
        lengths = sorted({s["seq_len"] for m in report["models"] for s in m["speed"]})
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return save_png(fig, path)


# --- training curves ----------------------------------------------------------------------------------------------

def read_metrics(run_dir) -> tuple[list[dict], list[str]]:
    """The records of ``RUN_DIR/metrics.jsonl`` in step order, and notes (e.g. a truncated last line skipped)."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl" if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise AlambicError(f"{path} not found: give a run folder written by `alambic distill --out DIR`")
    lines = path.read_text(encoding="utf-8").splitlines()
    records, notes = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # a run killed mid-write: the last line may be cut
                notes.append(f"line {number} of {path} is cut short and was skipped")
                continue
            raise AlambicError(f"line {number} of {path} is not JSON; fix or remove it") from None
        if not isinstance(record, dict) or "step" not in record:
            raise AlambicError(f"line {number} of {path} has no 'step'; is it an alambic metrics log?")
        records.append(record)
    if not records:
        raise AlambicError(f"{path} has no logged step yet: wait for the run's first log line (training.log_every)")
    records.sort(key=lambda r: r["step"])
    return records, notes


def _run_weights(run_dir: Path) -> dict:
    """``{"kd": 5.0, ...}`` from the run's config.yaml loss.alpha_* options, when there is one."""
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    try:
        loss = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("loss") or {}
    except yaml.YAMLError:
        return {}
    return {k[len("alpha_"):]: v for k, v in loss.items() if k.startswith("alpha_") and isinstance(v, (int, float))}


def plot_run(run_dir, path=None) -> tuple[Path, list[str]]:
    """Training curves of a run: one panel per loss term (with its weight), the total, learning rate, throughput,
    gradient norm and any held-out metric. Returns the PNG path and notes."""
    run_dir = Path(run_dir)
    records, notes = read_metrics(run_dir)
    folder = run_dir if run_dir.is_dir() else run_dir.parent
    weights = _run_weights(folder)
    keys = []
    for record in records:
        keys += [k for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and k not in keys]
    rank = {"loss": 0, "loss/": 1, "eval/": 3}
    keys.sort(key=lambda k: (rank.get(k, rank.get(k.split("/", 1)[0] + "/", 2)), k))
    weighted = [k for k in keys if k.startswith("loss/") and k.split("/", 1)[1] in weights]
    panels = keys[:1] + (["weighted terms"] if weighted else []) + keys[1:]
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = _figure(4.2 * cols, 3 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, key in zip(axes, panels):
        if key == "weighted terms":  # which term drives the total: weight x term, stacked up to the loss
            for i, term in enumerate(weighted):
                w = weights[term.split("/", 1)[1]]
                points = [(r["step"], w * r[term]) for r in records if isinstance(r.get(term), (int, float))]
                ax.plot(*zip(*points), color=f"C{i + 1}", label=f"{w:g} x {term}")
            if "loss" in keys:
                ax.plot(*zip(*[(r["step"], r["loss"]) for r in records if "loss" in r]), color="black",
                        linestyle=":", label="loss")
            ax.set_title("weighted terms", fontsize=10)
            ax.set_xlabel("step")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
            continue
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        x, y = zip(*points)
        ax.plot(x, y, marker="o" if len(points) < 20 else None, markersize=3,
                color="C3" if key.startswith("eval/") else "C0")
        title = key
        term = key.split("/", 1)[1] if key.startswith("loss/") else None
        if term in weights:
            title += f"  (weight {weights[term]:g})"
        elif key == "loss" and weights:
            title += "  (weighted sum)"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if key.startswith(("loss", "eval/perplexity")) and min(y) > 0 and max(y) / min(y) > 20:
            ax.set_yscale("log")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"{folder.resolve().name}: {records[-1]['step']} steps", fontsize=11)
    out = Path(path) if path else folder / "training_curves.png"
    return save_png(fig, out), notes


# --- temperature --------------------------------------------------------------------------------------------------

def _token_label(tokenizer, token_id: int) -> str:
    text = tokenizer.decode([token_id])
    text = text.replace("\n", "\\n").replace("\t", "\\t")
    if not text.strip():
        return repr(text)
    return text.replace(" ", "\u2423") if text != text.strip() else text


@torch.no_grad()
def softened_distribution(model, tokenizer, text: str, temperatures: list[float], top_k: int = 10,
                          renormalise: bool = False) -> dict:
    """The teacher's distribution over the next token (decoders) or over the masked last word (encoders),
    ``softmax(z / T)`` over the whole vocabulary for each ``T``, at the ``top_k`` tokens most likely at T = 1.
    ``renormalise``: softmax over those ``top_k`` logits only (seed 003's figure) instead of the vocabulary.
    ``top_k_mass[T]``: the share of the whole-vocabulary probability those tokens hold at ``T``."""
    if not text or not text.strip():
        raise AlambicError("--text is empty: give the context whose next (or last, masked) word to look at")
    if not temperatures or any(t <= 0 for t in temperatures):
        raise AlambicError(f"temperatures must be positive numbers such as 1,2,3,6, got {temperatures}")
    if top_k < 1:
        raise AlambicError(f"--top-k must be at least 1, got {top_k}")
    if not modeling.has_lm_head(model):
        raise AlambicError(f"{type(model).__name__} has no language-model head, so it has no output distribution "
                           "to soften: give a causal LM or a masked LM with its MLM head")
    kind = modeling.model_kind(model)
    shown = text
    if kind == "masked":
        if tokenizer.mask_token is None:
            raise AlambicError(f"{type(tokenizer).__name__} has no mask token; a masked LM's tokenizer needs one")
        words = list(re.finditer(r"\w+", text))
        if not words:
            raise AlambicError("--text has no word to mask: give a sentence, its last word is masked")
        last = words[-1]
        shown = text[: last.start()] + tokenizer.mask_token + text[last.end():]
        encoded = tokenizer(shown, return_tensors="pt")
        positions = (encoded["input_ids"][0] == tokenizer.mask_token_id).nonzero().flatten()
        position = int(positions[-1])
    else:
        encoded = tokenizer(text, return_tensors="pt")
        position = encoded["input_ids"].shape[1] - 1
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        hidden = modeling.lm_body(model)(input_ids=encoded["input_ids"].to(device),
                                         attention_mask=encoded["attention_mask"].to(device)).last_hidden_state
        logits = modeling.lm_head(model)(hidden[0, position:position + 1])[0].float().cpu()
    finally:
        model.train(was_training)
    k = min(top_k, logits.numel())
    top = logits.topk(k).indices
    probabilities, mass = {}, {}
    for t in temperatures:
        full = torch.softmax(logits / t, dim=-1)[top]
        mass[t] = float(full.sum())
        probabilities[t] = (torch.softmax(logits[top] / t, dim=-1) if renormalise else full).tolist()
    return {"kind": kind, "context": shown, "token_ids": top.tolist(),
            "tokens": [_token_label(tokenizer, int(i)) for i in top], "logits": logits[top].tolist(),
            "temperatures": list(temperatures), "probabilities": probabilities, "top_k_mass": mass,
            "renormalised": renormalise,
            "target": "masked word" if kind == "masked" else "next token"}


def plot_temperature(table: dict, path, title: str | None = None) -> Path:
    """Bars of the top-k probabilities, one panel per temperature. Renormalised bars share the y axis (the
    flattening shows); whole-vocabulary ones get an axis each (at high T they are tiny), and every panel says how
    much of the whole-vocabulary probability its tokens hold."""
    temps = table["temperatures"]
    fig = _figure(max(3.2 * len(temps), 6), 4.2)
    axes = fig.subplots(1, len(temps), sharey=table["renormalised"], squeeze=False)[0]
    x = list(range(len(table["tokens"])))
    for i, (ax, t) in enumerate(zip(axes, temps)):
        ax.bar(x, table["probabilities"][t], color=f"C{i % 10}")
        ax.set_xticks(x, table["tokens"], rotation=60, ha="right", fontsize=8)
        ax.set_title(f"T = {t:g}  (top {len(x)}: {100 * table['top_k_mass'][t]:.3g}% of the mass)", fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    over = f"softmax over the top {len(x)}" if table["renormalised"] else "softmax over the whole vocabulary"
    axes[0].set_ylabel(f"probability ({over})")
    context = table["context"] if len(table["context"]) <= 80 else "..." + table["context"][-77:]
    fig.suptitle(title or f"{table['target']} after: {context!r}", fontsize=10)
    return save_png(fig, path)
