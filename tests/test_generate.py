"""`alambic generate`: the teacher's answers as chat data, reproducible, resumable to the byte, bad input refused
in one line with nothing written."""

import json
import shutil

import pytest

from alambic.cli import main
from alambic.data.chat import prompt_ids, read_chat, tokenize_chat
from alambic.sampling import sample
from alambic.tasks.cache import teacher_fingerprint
from alambic.teachers import load_teacher
from alambic.workflows.generate import DATA, MANIFEST, batch_generator, generate
from tiny import bpe_tokenizer, save_chat_teacher_and_data

SETTINGS = dict(max_new_tokens=6, num_return_sequences=2, batch_size=4, log=lambda *_: None)  # 2 prompts a batch


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    return save_chat_teacher_and_data(tmp_path_factory.mktemp("generate"))


def lines_of(folder):
    return (folder / DATA).read_text(encoding="utf-8").splitlines()


def test_every_prompt_answered_n_times_as_chat_data_with_its_manifest(chat, tmp_path):
    out = tmp_path / "out"
    manifest = generate(chat / "teacher", [chat / "chat.jsonl"], out, seed=3, **SETTINGS)
    prompts = read_chat([chat / "chat.jsonl"], need_response=False)
    written = read_chat([out / DATA], need_response=True)  # reads back as training data
    assert manifest["counts"]["empty"] == 0
    assert len(lines_of(out)) == len(written) == 2 * len(prompts) == 24
    for k, record in enumerate(written):
        assert record.prompt == prompts[k // 2].prompt  # prompts kept whole, in file order, answers together
        assert record.response.strip() == record.response and record.response
    tokenize_chat(written, load_teacher(chat / "teacher")[1], max_length=512)  # what distill --data does with it

    on_disk = json.loads((out / MANIFEST).read_text())
    assert on_disk == manifest
    assert manifest["teacher_fingerprint"] == teacher_fingerprint(chat / "teacher")
    assert manifest["sampling"] == {"max_new_tokens": 6, "temperature": 0.7, "top_p": 0.95,
                                    "num_return_sequences": 2, "seed": 3, "batch_size": 4}
    assert manifest["counts"] == {"prompts": 12, "done": 12, "responses": 24, "empty": 0,
                                  "truncated": manifest["counts"]["truncated"]}
    assert 0 < manifest["counts"]["truncated"] <= 24  # a random tiny model rarely ends within 6 tokens
    assert len(manifest["prompts_sha256"]) == 64 and manifest["complete"] and manifest["batches_done"] == 6
    assert manifest["data_bytes"] == (out / DATA).stat().st_size
    assert manifest["alambic"] and manifest["prompts"] == [str(chat / "chat.jsonl")]


def test_each_batch_is_the_teachers_sample_with_its_own_generator(chat, tmp_path):
    out = tmp_path / "out"
    generate(chat / "teacher", chat / "chat.jsonl", out, seed=4, **SETTINGS)
    model, tokenizer = load_teacher(chat / "teacher")
    prompts = read_chat([chat / "chat.jsonl"], need_response=False)
    written = read_chat([out / DATA], need_response=True)
    for index in (0, 3):  # batch i: prompts 2i and 2i + 1, each twice, drawn from the generator of (seed, i)
        rows = [prompt_ids(tokenizer, prompts[2 * index + k // 2].prompt) for k in range(4)]
        answers = sample(model, rows, max_new_tokens=6, temperature=0.7, top_p=0.95,
                         eos_token_ids=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         generator=batch_generator(4, index))
        expected = [tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers]
        assert [r.response for r in written[4 * index:4 * index + 4]] == expected
    assert written[0].response != written[1].response  # two samples of one prompt


def test_empty_answers_are_left_out_and_counted(chat, tmp_path):
    said = []
    out = tmp_path / "out"
    # greedy, this random teacher repeats the generation prompt's last token, a newline: nothing once stripped
    manifest = generate(chat / "teacher", chat / "chat.jsonl", out, temperature=0, **{**SETTINGS, "log": said.append})
    assert manifest["counts"]["empty"] == 24 and manifest["counts"]["responses"] == 0
    assert (out / DATA).read_bytes() == b"" and manifest["complete"]
    assert "every answer decoded to nothing" in said[-1]


def test_the_seed_fixes_the_file(chat, tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        generate(chat / "teacher", chat / "chat.jsonl", tmp_path / name, seed=seed, **SETTINGS)
    assert (tmp_path / "a" / DATA).read_bytes() == (tmp_path / "b" / DATA).read_bytes()
    assert (tmp_path / "a" / DATA).read_bytes() != (tmp_path / "c" / DATA).read_bytes()


def test_an_interrupted_run_resumes_to_the_same_bytes(chat, tmp_path):
    whole = tmp_path / "whole"
    generate(chat / "teacher", chat / "chat.jsonl", whole, **SETTINGS)
    cut = tmp_path / "cut"
    partial = generate(chat / "teacher", chat / "chat.jsonl", cut, stop_after_batches=2, **SETTINGS)
    assert not partial["complete"] and partial["counts"]["done"] == 4 and len(lines_of(cut)) == 8
    with (cut / DATA).open("a") as handle:  # killed after appending a batch, before its manifest was written
        handle.write('{"messages": [{"role": "user", "content": "half a li')
    assert main(["generate", "--teacher", str(chat / "teacher"), "--prompts", str(chat / "chat.jsonl"), "--out",
                 str(cut), "--max-new-tokens", "6", "--num-return-sequences", "2", "--batch-size", "4",
                 "--no-progress"]) == 0
    assert (cut / DATA).read_bytes() == (whole / DATA).read_bytes()
    assert json.loads((cut / MANIFEST).read_text())["counts"] == json.loads((whole / MANIFEST).read_text())["counts"]


def _cli(chat, out, *extra, prompts=None):
    return ["generate", "--teacher", str(chat / "teacher"), "--prompts", str(prompts or chat / "chat.jsonl"),
            "--out", str(out), "--max-new-tokens", "4", "--no-progress", *extra]


def test_a_finished_folder_of_the_same_job_is_complete_and_of_another_job_refused(chat, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_cli(chat, out)) == 0
    before = (out / DATA).read_bytes(), (out / MANIFEST).read_bytes()
    capsys.readouterr()
    assert main(_cli(chat, out)) == 0
    assert "already complete" in capsys.readouterr().out
    assert main(_cli(chat, out, "--seed", "5", "--temperature", "0")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("alambic: error: --out") and "--seed 0, now 5" in err and "--temperature 0.7, now 0.0" in err
    assert "\n" not in err
    assert ((out / DATA).read_bytes(), (out / MANIFEST).read_bytes()) == before


def _no_template_teacher(chat, tmp_path):
    shutil.copytree(chat / "teacher", tmp_path / "plain")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (tmp_path / "plain" / name).unlink(missing_ok=True)
    bpe_tokenizer().save_pretrained(tmp_path / "plain")
    return tmp_path / "plain"


def _prompt_file(tmp_path, text):
    (tmp_path / "prompts.jsonl").write_text(text)
    return ["--prompts", str(tmp_path / "prompts.jsonl")]


BAD = {
    "missing prompt file": (lambda chat, tmp: ["--prompts", str(tmp / "nowhere.jsonl")], "nowhere.jsonl"),
    "empty prompt file": (lambda chat, tmp: _prompt_file(tmp, ""), "holds no chat records"),
    "only an assistant turn": (lambda chat, tmp: _prompt_file(
        tmp, '{"messages": [{"role": "assistant", "content": "hello"}]}\n'), "only an assistant turn"),
    "no chat template": (lambda chat, tmp: ["--teacher", str(_no_template_teacher(chat, tmp))], "no chat template"),
    "negative temperature": (lambda chat, tmp: ["--temperature", "-0.5"], "--temperature must be >= 0"),
    "top-p of zero": (lambda chat, tmp: ["--top-p", "0"], "--top-p must be in (0, 1]"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, chat, tmp_path, capsys):
    make, expected = BAD[case]
    out = tmp_path / "out"
    argv = _cli(chat, out) + make(chat, tmp_path)  # argparse keeps the last --prompts / --teacher
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("alambic: error: ") and "\n" not in err and expected in err
    assert not out.exists()


def test_an_out_folder_of_something_else_is_refused(chat, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(_cli(chat, out)) == 2
    err = capsys.readouterr().err.strip()
    assert "is not an `alambic generate` folder" in err and "\n" not in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_cli_end_to_end_and_other_verbs_keep_their_temperature_range(chat, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_cli(chat, out, "--temperature", "1.2", "--top-p", "1", "--seed", "9")) == 0
    assert "wrote 12 answers" in capsys.readouterr().out
    assert len(read_chat([out / DATA], need_response=True)) == 12
    assert json.loads((out / MANIFEST).read_text())["sampling"] == {
        "max_new_tokens": 4, "temperature": 1.2, "top_p": 1.0, "num_return_sequences": 1, "seed": 9,
        "batch_size": 8}
    assert main(["cache-teacher", "--teacher", "t", "--data", "d", "--out", str(tmp_path / "c"),
                 "--temperature", "0"]) == 2
    assert capsys.readouterr().err.startswith("alambic: error: --temperature must be > 0")


def test_the_python_api_exposes_generate():
    import alambic

    assert alambic.generate is generate
