"""``training.compile``: the compiled student and teacher train to the same weights as eager ones (no dropout, so the
two runs draw nothing at random), and the exported student is a plain model. Slowest test of the suite (inductor
compiles C++ kernels): one tiny model, equal-length batches so it compiles once."""

import json
import shutil

import pytest
from safetensors.torch import load_file

from alambic.cli import main
from tiny import sample_texts, tiny_bert, wordpiece_tokenizer


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="inductor needs a C++ compiler")
def test_compiled_run_matches_the_eager_run(tmp_path, capsys):
    tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).save_pretrained(tmp_path / "bert")
    wordpiece_tokenizer().save_pretrained(tmp_path / "bert")
    (tmp_path / "text").mkdir()
    for i, text in enumerate(sample_texts(10)):
        (tmp_path / "text" / f"{i}.txt").write_text(text)
    runs = {}
    for compiled in ("false", "true"):
        out = tmp_path / f"compile-{compiled}"
        code = main(["distill", "--teacher", str(tmp_path / "bert"), "--data", str(tmp_path / "text"), "--out", str(out),
                     "--max-steps", "2", "--batch-size", "2", "--no-progress", "--set", "data.max_length=32",
                     "--set", "training.log_every=1", "--set", f"training.compile={compiled}"])
        assert code == 0, capsys.readouterr()
        runs[compiled] = ([json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()],
                          load_file(str(out / "student" / "model.safetensors")))
    (eager_losses, eager), (compiled_losses, compiled) = runs["false"], runs["true"]
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    assert eager.keys() == compiled.keys()  # no compile wrapper names in the export
    assert max((eager[k] - compiled[k]).abs().max().item() for k in eager) < 1e-4
