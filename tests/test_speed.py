"""Interleaved timing (alambic.evaluation.speed): the paired speed-up is computed as documented, the rounds stop
where the docstring says, and one model timed against itself reads 1.00x within 5% on this machine."""

import math
import statistics

import numpy as np
import pytest
import torch

from alambic.evaluation import speed
from alambic.evaluation.report import ReportSettings, build_report
from tiny import bpe_tokenizer, tiny_llama

SAME_MODEL_BOUND = 0.05
"""One model against itself must read 1.00x +- 5%: timed one after the other it read 0.98x, 1.13x and 1.58x."""


def test_paired_speedup_is_the_median_of_per_round_ratios_with_its_notch():
    reference, model = [4.0, 4.4, 3.9, 8.0, 4.1, 4.2], [2.0, 2.1, 2.0, 4.1, 1.9, 2.2]
    result = speed.paired_speedup(reference, model)
    ratios = [a / b for a, b in zip(reference, model)]
    assert result["speedup"] == pytest.approx(statistics.median(ratios))
    iqr = float(np.quantile(ratios, 0.75) - np.quantile(ratios, 0.25))
    assert result["notch"] == pytest.approx(1.57 * iqr / math.sqrt(6))
    assert result["relative_notch"] == pytest.approx(result["notch"] / result["speedup"])
    assert result["rounds"] == 6
    # a slow spell that hits both models in one round (8.0 / 4.1) does not move the paired figure
    assert result["speedup"] == pytest.approx(statistics.median(ratios)) and 1.9 < result["speedup"] < 2.1


def test_rounds_stop_at_the_tolerance_or_the_cap():
    model = tiny_llama().eval()
    fixed = speed.time_interleaved({"a": model}, batch_size=1, seq_len=8, warmup=0, min_rounds=4)
    assert fixed["a"]["repeats"] == 4 and "paired" not in fixed["a"]  # one model: a fixed count
    capped = speed.time_interleaved({"a": model, "b": model}, batch_size=1, seq_len=8, warmup=1, min_rounds=3,
                                    max_rounds=7, tolerance=1e-9)  # a tolerance nothing meets: the cap stops it
    assert capped["a"]["repeats"] == capped["b"]["repeats"] == 7
    assert capped["b"]["paired"]["rounds"] == 7 and capped["b"]["paired"]["reference"] == "a"
    loose = speed.time_interleaved({"a": model, "b": model}, batch_size=1, seq_len=8, warmup=0, min_rounds=3,
                                   max_rounds=50, tolerance=10.0)  # met at once: stops at the minimum
    assert loose["b"]["repeats"] == 3


def test_time_forward_keeps_its_fixed_count():
    row = speed.time_forward(tiny_llama(), batch_size=2, seq_len=8, warmup=1, repeats=3)
    assert row["repeats"] == 3 and len(row["times_s"]) == 3 and row["tokens_per_s"] > 0


def test_one_model_against_itself_reads_one_within_five_percent(tmp_path):
    """The report's promise: speed-ups are trusted to +-5% on the test machine (a forward of a few ms, 2 cores)."""
    model = tiny_llama(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=4)
    model.save_pretrained(tmp_path / "model")
    bpe_tokenizer().save_pretrained(tmp_path / "model")
    threads = min(2, torch.get_num_threads())
    settings = ReportSettings(seq_lens=[128], batch_size=1, warmup=3, repeats=10, threads=threads,
                              names=["a", "b"])
    report = build_report([str(tmp_path / "model")] * 2, settings, log=None, warn=None)
    ratio = report["models"][1]["ratios"]["speed"][0]
    assert abs(ratio["speedup"] - 1) <= SAME_MODEL_BOUND, ratio
    assert ratio["notch"] is not None and ratio["rounds"] >= 10
