"""Inference speed of a forward pass, measured the way a paper should: warm-up, repeats, median and spread.

One measurement is ``warmup`` untimed forwards then ``repeats`` timed ones of the model on ``batch_size`` x
``seq_len`` random token ids (all attended; the cost of a dense forward does not depend on the ids) under
``torch.inference_mode``. On a GPU each timing is bracketed by ``torch.cuda.synchronize()``. The figures:

- ``median_s``: the median of the timed repeats (the headline: robust to a stray slow run);
- ``p25_s`` / ``p75_s`` (interquartile range, linear interpolation) and ``min_s`` / ``max_s``: the spread;
- ``tokens_per_s = batch_size * seq_len / median_s`` (throughput) and ``ms_per_batch = 1000 * median_s``.

Several models are timed *interleaved* (:func:`time_interleaved`): one forward of each per round, so that a slow
spell of a shared machine hits every model alike, and each speed-up is the median of per-round ratios with its
spread (:func:`paired_speedup`). Timed one after the other, one model against itself read 0.98x, 1.13x and 1.58x
in three runs on a busy 2-core VM.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time

import torch

from alambic import modeling

NOTCH_FACTOR = 1.57
"""Median +- 1.57 IQR / sqrt(n): the ~95% interval of a median (McGill, Tukey and Larsen 1978)."""
DEFAULT_TOLERANCE = 0.02
"""Paired timings repeat until each speed-up is known within +-2% (the notch over the median), or the round cap."""


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` with linear interpolation between order statistics (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarise(times: list[float], batch_size: int, seq_len: int) -> dict:
    """The figures of the module docstring from the timed repeats ``times`` (seconds)."""
    median = statistics.median(times)
    return {
        "times_s": list(times),
        "median_s": median,
        "p25_s": quantile(times, 0.25),
        "p75_s": quantile(times, 0.75),
        "min_s": min(times),
        "max_s": max(times),
        "ms_per_batch": 1000 * median,
        "tokens_per_s": batch_size * seq_len / median,
    }


def max_positions(config) -> int | None:
    config = modeling._config(config)
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    return None


def random_batch(model: torch.nn.Module, batch_size: int, seq_len: int, seed: int = 0) -> dict:
    """``batch_size`` x ``seq_len`` random token ids of ``model``'s vocabulary, all attended, on its device."""
    device = modeling.model_device(model)
    vocab = modeling.vocab_size(model.config)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(seed)).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def paired_speedup(reference_times: list[float], times: list[float]) -> dict:
    """The speed-up of a model over a reference timed in the same rounds: ``r_i = t_ref,i / t_i`` per round, and

    - ``speedup``: the median of the ``r_i`` (pairing cancels what drifts between rounds: load, clock, cache);
    - ``p25`` / ``p75``: their interquartile range;
    - ``notch``: ``NOTCH_FACTOR * IQR / sqrt(n)``, the half-width of the median's ~95% interval (McGill, Tukey and
      Larsen 1978, the notches of a box plot); ``relative_notch = notch / speedup``.
    """
    ratios = [r / t for r, t in zip(reference_times, times)]
    median = statistics.median(ratios)
    iqr = quantile(ratios, 0.75) - quantile(ratios, 0.25)
    notch = NOTCH_FACTOR * iqr / math.sqrt(len(ratios))
    return {"speedup": median, "p25": quantile(ratios, 0.25), "p75": quantile(ratios, 0.75), "notch": notch,
            "relative_notch": notch / median, "rounds": len(ratios)}


@torch.no_grad()
def time_interleaved(models: dict[str, torch.nn.Module], *, batch_size: int, seq_len: int, warmup: int = 2,
                     min_rounds: int = 5, max_rounds: int | None = None, tolerance: float = DEFAULT_TOLERANCE,
                     max_seconds: float | None = None, seed: int = 0) -> dict[str, dict]:
    """Time forwards of several models in rounds, each round one forward of every model (A, B, A, B, ...; the
    order alternates between rounds), so that whatever slows the machine for a while slows them all alike.

    After ``warmup`` untimed rounds, rounds repeat until every model's speed-up over the first model
    (:func:`paired_speedup`) is known within ``tolerance`` (``relative_notch <= tolerance``), and at least
    ``min_rounds`` and at most ``max_rounds`` (default ``min_rounds``, that is a fixed count, when only one model is
    timed; else 10 x ``min_rounds``) rounds or ``max_seconds`` have passed. Each model's row holds the figures of the
    module docstring; every model after the first also gets ``paired`` (its speed-up over the first)."""
    if min_rounds < 1 or warmup < 0:
        raise ValueError("min_rounds must be >= 1 and warmup >= 0")
    names = list(models)
    max_rounds = max(min_rounds, max_rounds or (min_rounds if len(names) == 1 else 10 * min_rounds))
    batches = {name: random_batch(model, batch_size, seq_len, seed) for name, model in models.items()}
    states = {name: model.training for name, model in models.items()}
    times: dict[str, list[float]] = {name: [] for name in names}
    started = time.perf_counter()
    try:
        for model in models.values():
            model.eval()
        with torch.inference_mode():
            for round_index in range(warmup + max_rounds):
                order = names if round_index % 2 == 0 else names[::-1]
                for name in order:
                    elapsed = _timed_forward(models[name], batches[name])
                    if round_index >= warmup:
                        times[name].append(elapsed)
                rounds = round_index + 1 - warmup
                if rounds < min_rounds:
                    continue
                if max_seconds is not None and time.perf_counter() - started > max_seconds:
                    break
                if all(paired_speedup(times[names[0]], times[n])["relative_notch"] <= tolerance for n in names[1:]):
                    break
    finally:
        for name, model in models.items():
            model.train(states[name])
    rows = {}
    for name, model in models.items():
        device = modeling.model_device(model)
        parameter = next(model.parameters(), None)
        precision = getattr(model, "precision", None) or str(parameter.dtype).removeprefix("torch.")
        rows[name] = {"device": device.type, "dtype": precision, "runtime": getattr(model, "runtime", "torch"),
                      "batch_size": batch_size, "seq_len": seq_len, "warmup": warmup, "repeats": len(times[name]),
                      "threads": torch.get_num_threads() if device.type == "cpu" else None,
                      **summarise(times[name], batch_size, seq_len)}
        if name != names[0]:
            rows[name]["paired"] = {"reference": names[0], **paired_speedup(times[names[0]], times[name])}
    return rows


def _timed_forward(model: torch.nn.Module, batch: dict) -> float:
    cuda = batch["input_ids"].device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(batch["input_ids"].device)
    start = time.perf_counter()
    model(**batch)
    if cuda:
        torch.cuda.synchronize(batch["input_ids"].device)
    return time.perf_counter() - start


def time_forward(model: torch.nn.Module, *, batch_size: int, seq_len: int, warmup: int = 2, repeats: int = 5,
                 seed: int = 0) -> dict:
    """Time ``repeats`` forwards of ``model`` (on the device and dtype it sits on) and summarise them (see the
    module doc)."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1 and warmup >= 0")
    return time_interleaved({"model": model}, batch_size=batch_size, seq_len=seq_len, warmup=warmup,
                            min_rounds=repeats, seed=seed)["model"]


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """What a reader needs to judge the timings: CPU, cores, threads, GPU, library versions."""
    import transformers

    from alambic import __version__

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "alambic": __version__,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "gpu": None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
    return info
