"""training.mixed_precision=auto on simulated machines: bf16 only where the hardware multiplies bf16 natively and a
quick check finds it faster; the choice is printed and recorded in the student's model card."""

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from alambic.cli import main
from alambic.engine import precision
from alambic.engine.precision import Hardware, choose_precision, cpu_bf16_instructions
from tiny import save_llama_teacher_and_text

CPU_WITH_AMX = Hardware(cuda=False, cuda_bf16=False, cpu_bf16="AMX-BF16")
CPU_WITHOUT = Hardware(cuda=False, cuda_bf16=False, cpu_bf16=None)


def never_called():
    raise AssertionError("the bf16 check must not run on this machine")


@pytest.mark.parametrize("requested", ["bf16", "fp16", "no"])
def test_explicit_precision_is_kept(requested):
    assert choose_precision(requested, CPU_WITHOUT, speedup=never_called).precision == requested


@pytest.mark.parametrize("hardware, speedup, expected", [
    (Hardware(cuda=True, cuda_bf16=True, cpu_bf16=None), never_called, "bf16"),
    (Hardware(cuda=True, cuda_bf16=False, cpu_bf16=None), never_called, "no"),
    (CPU_WITHOUT, never_called, "no"),  # emulated bf16 is slower than fp32: no check, fp32
    (CPU_WITH_AMX, lambda: 5.8, "bf16"),
    (CPU_WITH_AMX, lambda: 1.1, "no"),  # the instructions are there but bf16 was not faster here
])
def test_auto_precision_follows_the_hardware(hardware, speedup, expected):
    choice = choose_precision("auto", hardware, speedup=speedup)
    assert choice.precision == expected
    assert choice.reason.startswith("auto: ")


def test_the_reason_names_the_instructions_and_the_measured_speedup():
    assert choose_precision("auto", CPU_WITH_AMX, speedup=lambda: 5.8).describe() == (
        "bf16 with fp32 master weights (auto: CPU with AMX-BF16, bf16 matmuls 5.8x as fast as fp32 in a quick "
        "check)")
    assert choose_precision("auto", CPU_WITHOUT).describe() == (
        "fp32 (auto: this CPU has no native bf16 matrix instructions)")


def test_the_flag_simulates_a_cpu_with_or_without_bf16(monkeypatch):
    monkeypatch.setenv("ALAMBIC_CPU_BF16", "0")
    assert cpu_bf16_instructions() is None
    monkeypatch.setenv("ALAMBIC_CPU_BF16", "1")
    assert cpu_bf16_instructions().startswith("AMX-BF16")


def test_the_quick_check_measures_a_ratio_of_two_plausible_rates():
    # best of 10 tiny matmuls (~20 us each): one descheduled repeat on a busy machine cannot decide the rate
    fp32 = precision.matmul_flops(128, torch.float32, repeats=10)
    assert 1e7 < fp32 < 1e14  # between a 10 MFLOP/s and a 100 TFLOP/s CPU
    ratio = precision.bf16_matmul_speedup(size=128, repeats=10)
    assert 0.02 < ratio < 50  # emulated bf16 can be far slower, AMX far faster; not orders of magnitude more


def test_distill_on_a_simulated_amx_cpu_trains_in_bf16_and_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ALAMBIC_CPU_BF16", "1")
    monkeypatch.setattr(precision, "bf16_matmul_speedup", lambda: 4.0)
    teacher = save_llama_teacher_and_text(tmp_path) / "teacher"
    AcceleratorState._reset_state(reset_partial_state=True)  # the state of earlier tests fixes its precision
    try:
        code = main(["distill", "--teacher", str(teacher), "--data", str(tmp_path / "text.txt"), "--out",
                     str(tmp_path / "run"), "--max-steps", "2", "--layers", "every-other",
                     "--set", "data.max_length=32", "--no-progress"])
        out = capsys.readouterr().out
        assert code == 0, out
        assert AcceleratorState().mixed_precision == "no"  # the bf16 student needs no autocast
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    said = ("mixed precision: bf16 with fp32 master weights (auto: CPU with AMX-BF16 (ALAMBIC_CPU_BF16=1), bf16 "
            "matmuls 4.0x as fast as fp32")
    assert said in out
    card = (tmp_path / "run" / "student" / "README.md").read_text()
    assert "mixed precision bf16 with fp32 master weights (auto: CPU with AMX-BF16" in card
    weights = load_file(tmp_path / "run" / "student" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}
