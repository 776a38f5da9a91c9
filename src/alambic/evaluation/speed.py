"""Inference speed of a forward pass, measured the way a paper should: warm-up, repeats, median and spread.

One measurement is ``warmup`` untimed forwards then ``repeats`` timed ones of the model on ``batch_size`` x
``seq_len`` random token ids (all attended; the cost of a dense forward does not depend on the ids) under
``torch.inference_mode``. On a GPU each timing is bracketed by ``torch.cuda.synchronize()``. The figures:

- ``median_s``: the median of the timed repeats (the headline: robust to a stray slow run);
- ``p25_s`` / ``p75_s`` (interquartile range, linear interpolation) and ``min_s`` / ``max_s``: the spread;
- ``tokens_per_s = batch_size * seq_len / median_s`` (throughput) and ``ms_per_batch = 1000 * median_s``.
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch

from alambic import modeling


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


@torch.no_grad()
def time_forward(model: torch.nn.Module, *, batch_size: int, seq_len: int, warmup: int = 2, repeats: int = 5,
                 seed: int = 0) -> dict:
    """Time forwards of ``model`` (on the device and dtype it sits on) and summarise them (see the module doc)."""
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be >= 1 and warmup >= 0")
    device = modeling.model_device(model)
    parameter = next(model.parameters(), None)
    precision = getattr(model, "precision", None) or str(parameter.dtype).removeprefix("torch.")
    vocab = modeling.vocab_size(model.config)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=generator).to(device)
    mask = torch.ones_like(ids)
    cuda = device.type == "cuda"
    was_training = model.training
    model.eval()
    times = []
    try:
        with torch.inference_mode():
            for i in range(warmup + repeats):
                if cuda:
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                model(input_ids=ids, attention_mask=mask)
                if cuda:
                    torch.cuda.synchronize(device)
                if i >= warmup:
                    times.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    return {"device": device.type, "dtype": precision, "runtime": getattr(model, "runtime", "torch"),
            "batch_size": batch_size,
            "seq_len": seq_len, "warmup": warmup, "repeats": repeats,
            "threads": torch.get_num_threads() if device.type == "cpu" else None,
            **summarise(times, batch_size, seq_len)}


def _cpu_name() -> str:
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
        "cpu": _cpu_name(),
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
