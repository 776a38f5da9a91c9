"""The figures: training curves of a run, softened teacher distributions, written as non-empty PNGs."""

import json

import pytest
import torch
import transformers
import yaml

from alambic.cli import main
from alambic.errors import AlambicError
from alambic.evaluation.plots import plot_run, plot_temperature, read_metrics, softened_distribution
from tiny import bpe_tokenizer, tiny_bert, tiny_llama, wordpiece_tokenizer

PNG = b"\x89PNG\r\n\x1a\n"


def is_png(path) -> bool:
    data = path.read_bytes()
    return data.startswith(PNG) and len(data) > 5000


@pytest.fixture
def run_dir(tmp_path):
    lines = [{"step": s, "loss/kd": 10 / s, "loss/lm": 8 / s, "loss/cos": 0.7 / s, "lr": 5e-4 * (1 - s / 40),
              "tokens_per_s": 100 + s, "grad_norm": 3.0} for s in range(5, 45, 5)]
    for record in lines:
        record["loss"] = 5 * record["loss/kd"] + 2 * record["loss/lm"] + record["loss/cos"]
    lines[3]["eval/perplexity"] = 40.0
    lines[-1]["eval/perplexity"] = 31.0
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 45, "loss/k'  # killed mid-write
    (tmp_path / "metrics.jsonl").write_text(text)
    loss = {"alpha_kd": 5.0, "alpha_lm": 2.0, "alpha_cos": 1.0}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"loss": loss}))
    return tmp_path


def test_plot_run_writes_curves_and_skips_a_cut_last_line(run_dir):
    records, notes = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(5, 45, 5))
    assert len(notes) == 1 and "cut short" in notes[0]
    path, _ = plot_run(run_dir)
    assert path == run_dir / "training_curves.png" and is_png(path)


def test_plot_run_cli(run_dir, tmp_path, capsys):
    assert main(["plot-run", str(run_dir), "--out", str(tmp_path / "c.png")]) == 0
    out, err = capsys.readouterr()
    assert is_png(tmp_path / "c.png") and "cut short" in err and "written" in out


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    ("", "no logged step yet"),
    ('{"step": 1}\nnot json\n{"step": 2}\n', "line 2"),
    ('{"loss": 1}\n', "has no 'step'"),
])
def test_plot_run_bad_logs(content, message, tmp_path, capsys):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(AlambicError, match=message):
        read_metrics(tmp_path)
    assert main(["plot-run", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("alambic: error:")


def test_softened_distribution_of_a_decoder_is_softmax_over_t():
    model, tokenizer = tiny_llama(), bpe_tokenizer()
    text = "The bank raised interest rates"
    table = softened_distribution(model, tokenizer, text, [1, 2, 6], top_k=5, renormalise=False)
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    logits = model(input_ids=ids).logits[0, -1].detach()
    assert table["token_ids"] == logits.topk(5).indices.tolist()
    for t in (1, 2, 6):
        expected = torch.softmax(logits / t, -1)[logits.topk(5).indices]
        assert table["probabilities"][t] == pytest.approx(expected.tolist(), rel=1e-5)
        assert table["top_k_mass"][t] == pytest.approx(float(expected.sum()), rel=1e-5)
    top1 = [table["probabilities"][t][0] for t in (1, 2, 6)]
    assert top1 == sorted(top1, reverse=True)  # higher T, flatter
    renorm = softened_distribution(model, tokenizer, text, [1, 3], top_k=5, renormalise=True)
    for t in (1, 3):
        assert sum(renorm["probabilities"][t]) == pytest.approx(1.0)
        assert renorm["probabilities"][t] == pytest.approx(
            torch.softmax(logits[logits.topk(5).indices] / t, -1).tolist(), rel=1e-5)


def test_softened_distribution_of_an_encoder_masks_the_last_word():
    model, tokenizer = tiny_bert(), wordpiece_tokenizer()
    table = softened_distribution(model, tokenizer, "The bank raised interest rates.", [1, 2], top_k=4)
    assert table["context"] == "The bank raised interest [MASK]." and table["target"] == "masked word"
    enc = tokenizer(table["context"], return_tensors="pt")
    position = int((enc["input_ids"][0] == tokenizer.mask_token_id).nonzero()[0])
    logits = model(**enc).logits[0, position].detach()
    assert table["token_ids"] == logits.topk(4).indices.tolist()


def test_softened_distribution_refuses_what_it_cannot_show():
    bare = transformers.BertModel(tiny_bert().config).eval()
    with pytest.raises(AlambicError, match="no language-model head"):
        softened_distribution(bare, wordpiece_tokenizer(), "some text", [1, 2])
    with pytest.raises(AlambicError, match="positive"):
        softened_distribution(tiny_llama(), bpe_tokenizer(), "some text", [1, 0])
    with pytest.raises(AlambicError, match="no word to mask"):
        softened_distribution(tiny_bert(), wordpiece_tokenizer(), "?!", [1])


def test_plot_temperature_cli(tmp_path, capsys):
    tiny_llama().save_pretrained(tmp_path / "llama")
    bpe_tokenizer().save_pretrained(tmp_path / "llama")
    out = tmp_path / "t.png"
    code = main(["plot-temperature", "--model", str(tmp_path / "llama"), "--text", "The bank raised rates",
                 "--temperatures", "1,2,3,6", "--top-k", "5", "--out", str(out)])
    stdout, _ = capsys.readouterr()
    assert code == 0 and is_png(out) and "T=6" in stdout and "top-k mass" in stdout
    bad = ((["--temperatures", "1,x"], "comma-separated"), (["--out", str(tmp_path / "t.jpg")], ".png"))
    for extra, message in bad:
        argv = ["plot-temperature", "--model", str(tmp_path / "llama"), "--text", "a b", "--out", str(out), *extra]
        assert main(argv) == 2
        assert message in capsys.readouterr().err


def test_plot_temperature_writes_png(tmp_path):
    table = softened_distribution(tiny_llama(), bpe_tokenizer(), "The bank", [1, 2], top_k=3)
    assert is_png(plot_temperature(table, tmp_path / "sub" / "t.png"))
    assert not [p for p in (tmp_path / "sub").iterdir() if p.name.startswith(".tmp")]
