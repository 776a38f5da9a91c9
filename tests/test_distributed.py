"""DDP through torch.distributed (gloo on CPU): two processes with batch B equal one process with 2 x B accumulated."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tiny import bpe_tokenizer, sample_texts, tiny_llama


@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None, reason="torchrun missing")
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "teacher")
    bpe_tokenizer().save_pretrained(tmp_path / "teacher")
    (tmp_path / "text").mkdir()
    for i, text in enumerate(sample_texts(10)):
        (tmp_path / "text" / f"{i}.txt").write_text(text)
    common = ["distill", "--teacher", str(tmp_path / "teacher"), "--data", str(tmp_path / "text"), "--max-steps", "3",
              "--batch-size", "2", "--no-progress", "--set", "training.log_every=1", "--set", "data.max_length=32",
              "--set", "training.save_every=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "alambic", *common, "--out", str(tmp_path / "ddp")],
                   check=True, env=env, capture_output=True)
    subprocess.run([sys.executable, "-m", "alambic", *common, "--grad-accum", "2", "--out", str(tmp_path / "one")],
                   check=True, env=env, capture_output=True)

    ddp = load_file(str(tmp_path / "ddp" / "student" / "model.safetensors"))
    one = load_file(str(tmp_path / "one" / "student" / "model.safetensors"))
    assert max((ddp[k] - one[k]).abs().max().item() for k in one) < 1e-6
    logs = {name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("ddp", "one")}
    assert [r["step"] for r in logs["ddp"]] == [1, 2, 3]  # only the main process writes
    for a, b in zip(logs["ddp"], logs["one"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()) == ["latest", "step-0000002", "step-0000003"]
