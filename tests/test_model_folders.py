"""Every verb checks a model path the same way before use: a broken folder is one line naming the file and the
problem; a run folder resolves to its model (OUT/best, else OUT/student), printed."""

import json

import pytest

from alambic.cli import main
from alambic.errors import AlambicError
from alambic.teachers import resolve_model_path
from tiny import bpe_tokenizer, save_llama_teacher_and_text, tiny_llama


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    save_llama_teacher_and_text(root, "llama")
    return root


def broken_copy(good, tmp_path, damage):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(good / "llama", folder)
    weights = folder / "model.safetensors"
    if damage == "config not JSON":
        (folder / "config.json").write_text("{not json")
        return folder, f"{folder / 'config.json'} is not valid JSON"
    if damage == "no weights":
        weights.unlink()
        return folder, f"{folder} has a config.json but no weights (none of model.safetensors, pytorch_model.bin)"
    if damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        return folder, f"{weights} is truncated ("
    if damage == "garbage weights":
        weights.write_bytes(b"\xff" * 64)
        return folder, f"{weights} is truncated (its header is cut short)"
    if damage == "missing shard":
        weights.rename(folder / "model-00001-of-00002.safetensors")
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
        return folder, "lists model-00002-of-00002.safetensors, which is missing"
    raise AssertionError(damage)


DAMAGES = ["config not JSON", "no weights", "truncated weights", "garbage weights", "missing shard"]


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_broken_model_folder_is_named_in_one_line(good, tmp_path, damage):
    folder, expected = broken_copy(good, tmp_path, damage)
    with pytest.raises(AlambicError) as error:
        resolve_model_path(folder)
    assert expected in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("verb", ["distill --teacher", "init-student --teacher", "eval-lm", "report"])
@pytest.mark.parametrize("damage", ["truncated weights", "config not JSON"])
def test_every_verb_refuses_a_broken_model_in_one_line(verb, damage, good, tmp_path, capsys):
    folder, expected = broken_copy(good, tmp_path, damage)
    args = {"distill --teacher": ["distill", "--teacher", folder, "--data", good / "text.txt", "--out", tmp_path / "r"],
            "init-student --teacher": ["init-student", "--teacher", folder, "--out", tmp_path / "s"],
            "eval-lm": ["eval-lm", folder, "--data", good / "text.txt"],
            "report": ["report", good / "llama", folder, "--data", good / "text.txt", "--out", tmp_path / "rep"]}[verb]
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("alambic: error: ") and expected in err and "\n" not in err and "Traceback" not in err


def test_a_run_folder_resolves_to_its_model_in_every_verb(good, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["distill", "--teacher", str(good / "llama"), "--data", str(good / "text.txt"), "--out", str(run),
                 "--max-steps", "1", "--layers", "every-other", "--set", "data.max_length=32", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval-lm", str(run), "--data", str(good / "text.txt"), "--max-length", "32"]) == 0
    said = capsys.readouterr()
    assert f"{run} is a run folder: using its model {run / 'student'}" in said.err and "perplexity" in said.out
    assert main(["init-student", "--teacher", str(run), "--layers", "0", "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "config.json").is_file()
    assert resolve_model_path(run) == run / "student"
    tiny_llama().save_pretrained(run / "best")  # a best model (finetune, distill-task, distill with evaluation) wins
    bpe_tokenizer().save_pretrained(run / "best")
    assert resolve_model_path(run) == run / "best"
