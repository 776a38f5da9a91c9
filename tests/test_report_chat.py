"""`alambic report --chat-data`: the chat figures of `alambic eval-chat` as quality columns of the report, checked
against `evaluate_chat` on the same tiny models, the retained ratios recomputed, a GGUF export answering as its source
(in llama.cpp when installed), other export folders left out with a note, and every bad chat input refused in one line
before any weights load."""

import copy
import json

import pytest

from alambic.cli import main
from alambic.data.chat import read_chat
from alambic.evaluation.chat import chat_items, evaluate_chat, generate_answers
from alambic.evaluation.report import CHAT_RETAINED, ReportSettings, build_report, render_markdown
from alambic.students import init_student, save_student
from tiny import bpe_tokenizer, chat_tokenizer, sample_texts, tiny_llama

NEW_TOKENS, BATCH = 6, 3  # a batch of 3 mixes records of different lengths in padded batches
PROMPTS = ["Which topic: shares rose on Monday.", "Which topic: a late goal won the cup.",
           "Which topic: a new phone was launched.", "Which topic: the minister resigned.", "Say hello."]
SETTINGS = dict(seq_lens=[8], batch_size=2, warmup=0, repeats=1, threads=1, eval_batch_size=BATCH)


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny chat teacher (wide initialisation: its greedy answers are words, not blank lines), a 2-layer student
    copied from it, and records whose gold answers are the teacher's own answers to the first three prompts and the
    student's to the fourth: both get non-zero, different accuracies."""
    root = tmp_path_factory.mktemp("report-chat")
    tok = chat_tokenizer()
    teacher = tiny_llama(0, vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         initializer_range=0.3).eval()
    teacher.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    student = init_student(teacher, layers="0,2").model.eval()
    save_student(student, tok, root / "student")
    items = chat_items(read_chat([write_jsonl(root / "prompts.jsonl", [
        {"prompt": p, "completion": "x"} for p in PROMPTS])], need_response=False), tok)
    theirs = generate_answers(teacher, tok, items, max_new_tokens=NEW_TOKENS, batch_size=BATCH).texts
    ours = generate_answers(student, tok, items, max_new_tokens=NEW_TOKENS, batch_size=BATCH).texts
    assert theirs[3].split() != ours[3].split()  # the student answers otherwise: the figures differ
    records = []
    for i, prompt in enumerate(PROMPTS[:4]):
        gold = (theirs if i < 3 else ours)[i].strip()
        records.append({"prompt": prompt, "completion": gold, "options": [gold, "business", "sport"]})
    records.append({"messages": [{"role": "user", "content": PROMPTS[4]},
                                 {"role": "assistant", "content": "hello there"}]})  # no options: ROUGE-L only
    write_jsonl(root / "chat.jsonl", records)
    (root / "heldout.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in sample_texts(4)))
    return root


@pytest.fixture(scope="module")
def report(files):
    settings = ReportSettings(**SETTINGS, chat_data=[str(files / "chat.jsonl")], chat_max_new_tokens=NEW_TOKENS,
                              names=["teacher", "student"])
    return build_report([str(files / "teacher"), str(files / "student")], settings, log=None, warn=None)


def direct(files, models, **kwargs) -> list[dict]:
    """``evaluate_chat`` on the same records, the teacher the report's first model."""
    return evaluate_chat([str(files / m) for m in models], read_chat([str(files / "chat.jsonl")], need_response=True),
                         teacher=str(files / "teacher"), names=models, max_new_tokens=NEW_TOKENS, batch_size=BATCH,
                         **kwargs)


def metrics_of(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("model", "parameters", "examples", "option_examples")}


def test_chat_columns_equal_evaluate_chat(report, files):
    rows = direct(files, ["teacher", "student"])
    for mine, theirs in zip(report["models"], rows):
        chat = mine["chat"]
        # the same computation; only float summation order differs (thread count, batch composition)
        assert chat["metrics"] == pytest.approx(metrics_of(theirs), rel=1e-6, abs=1e-9)
        assert set(chat["metrics"]) == {"accuracy", "option_accuracy", "option_accuracy_norm", "rouge_l",
                                        "rouge_l_teacher", "teacher_nll", "forward_kl", "mean_tokens",
                                        "hit_max_new_tokens"}
        assert chat["examples"] == theirs["examples"] == 5 and chat["option_examples"] == 4
        assert chat["teacher"] == "teacher" and chat["max_new_tokens"] == NEW_TOKENS and chat["decoding"] == "greedy"
    teacher, student = (m["chat"]["metrics"] for m in report["models"])
    assert teacher["accuracy"] == 0.75 and student["accuracy"] == 0.25  # gold = the teacher's answer 3 times of 4
    assert teacher["forward_kl"] == pytest.approx(0, abs=1e-6) and student["forward_kl"] > 0.01
    assert teacher["rouge_l_teacher"] == 1.0 and student["rouge_l_teacher"] < 1.0
    assert report["settings"]["chat_data"] == [str(files / "chat.jsonl")]


def test_retained_ratios_and_main_quality(report):
    teacher, student = report["models"]
    ref, mine = teacher["chat"]["metrics"], student["chat"]["metrics"]
    retained = student["ratios"]["chat_retention_pct"]
    assert set(retained) == set(CHAT_RETAINED) == {"accuracy", "option_accuracy", "rouge_l"}
    for key in CHAT_RETAINED:
        assert retained[key] == (pytest.approx(100 * mine[key] / ref[key]) if ref[key] else None)
        assert teacher["ratios"]["chat_retention_pct"][key] == (pytest.approx(100) if ref[key] else None)
    assert retained["accuracy"] == pytest.approx(100 / 3)
    # without --lm-data the chat accuracy is the report's quality (plot, card, "quality retained")
    for row in report["models"]:
        q = row["quality"]
        assert q["source"] == "chat" and q["metric"] == "accuracy" and q["higher_is_better"]
        assert q["value"] == row["chat"]["metrics"]["accuracy"]
    assert student["ratios"]["quality_retention_pct"] == pytest.approx(retained["accuracy"])


def test_markdown_shows_the_main_chat_metrics(report):
    md = render_markdown(report)
    summary = md.split("## Summary", 1)[1].split("\n\n")[1].splitlines()
    assert summary[0].endswith("| accuracy | option acc. | ROUGE-L | teacher NLL | forward KL |")
    assert "| quality |" not in summary[0]  # the chat columns are the quality
    m = report["models"][1]["chat"]["metrics"]
    assert summary[3].endswith(f"| {m['accuracy']:.3f} | {m['option_accuracy']:.3f} | {m['rouge_l']:.3f} | "
                               f"{m['teacher_nll']:.4g} | {m['forward_kl']:.4g} |")
    relative = md.split("Relative to teacher:", 1)[1]
    assert "| accuracy retained | option acc. retained | ROUGE-L retained |" in relative
    assert "| 33.3% |" in relative and "quality retained" not in relative
    quality = md.split("## Quality", 1)[1].split("## Machine", 1)[0]
    assert "5 chat records of" in quality and "(4 with options)" in quality and "ROUGE-L vs teacher" in quality


def test_cli_with_lm_data_an_export_and_max_examples(report, files, tmp_path, capsys):
    from alambic.workflows.export import export

    export(files / "student", "torch-int8", tmp_path / "int8", log=lambda line: None)
    out = tmp_path / "report"
    code = main(["report", str(files / "teacher"), str(files / "student"), str(tmp_path / "int8"),
                 "--names", "teacher,student,int8", "--lm-data", str(files / "heldout.jsonl"), "--max-tokens", "64",
                 "--chat-data", str(files / "chat.jsonl"), "--chat-max-new-tokens", str(NEW_TOKENS),
                 "--chat-max-examples", "4", "--eval-batch-size", str(BATCH), "--seq-lens", "8", "--batch-size", "2",
                 "--warmup", "0", "--repeats", "1", "--threads", "1", "--no-plots", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "alambic: warning: int8: chat metrics need a model that generates" in captured.err
    saved = json.loads((out / "report.json").read_text())
    assert "--chat-data" in saved["command"] and "--chat-max-examples 4" in saved["command"]
    teacher, student, int8 = saved["models"]
    rows = direct(files, ["teacher", "student"], max_examples=4)  # the first 4 records: all with options
    for mine, theirs in zip((teacher, student), rows):
        assert mine["chat"]["metrics"] == pytest.approx(metrics_of(theirs), rel=1e-6, abs=1e-9)
        assert mine["chat"]["examples"] == 4 == mine["chat"]["option_examples"]
        assert mine["quality"]["metric"] == "perplexity"  # --lm-data stays the main quality
    assert student["ratios"]["chat_retention_pct"]["accuracy"] == pytest.approx(100 / 3)
    assert int8["chat"]["metrics"] is None and "need a model that generates" in int8["chat"]["reason"]
    assert int8["ratios"]["chat_retention_pct"] is None and int8["quality"]["metric"] == "perplexity"
    md = (out / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| model | runtime"))
    assert header.endswith("| quality | accuracy | option acc. | ROUGE-L | teacher NLL | forward KL |")
    assert next(line for line in md.splitlines() if line.startswith("| int8 |")).endswith("| - | - | - | - | - |")
    assert "### Chat" in md and "quality retained" in md and "accuracy retained" in md


def test_a_gguf_export_answers_in_its_runtime_as_its_source(report, files, tmp_path):
    """The composition a user ships: a chat student exported to GGUF (float32) and reported in the runtime it runs in
    (llama.cpp when llama-cpp-python is installed, else transformers' GGUF reader) gets its source's chat figures."""
    from alambic.workflows.export import export

    export(files / "student", "gguf", tmp_path / "gguf", gguf_type="f32", log=lambda line: None)
    settings = ReportSettings(**SETTINGS, chat_data=[str(files / "chat.jsonl")], chat_max_new_tokens=NEW_TOKENS,
                              names=["teacher", "gguf"])
    saved = build_report([str(files / "teacher"), str(tmp_path / "gguf")], settings, log=None, warn=None)
    source, exported = report["models"][1]["chat"], saved["models"][1]["chat"]
    assert exported["runtime"].split()[0] in ("llama.cpp", "transformers") and "runtime" not in source
    ours, theirs = exported["metrics"], source["metrics"]
    assert set(ours) == set(theirs)
    for key in ("accuracy", "option_accuracy", "option_accuracy_norm", "rouge_l", "rouge_l_teacher", "mean_tokens",
                "hit_max_new_tokens"):  # the same greedy answers and the same option ranking
        assert ours[key] == theirs[key], key
    for key in ("teacher_nll", "forward_kl"):  # float32 in another runtime: round-off only
        assert ours[key] == pytest.approx(theirs[key], rel=1e-3, abs=1e-4), key
    assert f"gguf answered in {exported['runtime']}" in render_markdown(saved)


def _no_template(root):
    tiny_llama(0, vocab_size=len(chat_tokenizer())).save_pretrained(root / "plain")
    tok = copy.deepcopy(chat_tokenizer())
    tok.chat_template = None
    tok.save_pretrained(root / "plain")
    return root / "plain"


def _bpe(root):
    tiny_llama(0).save_pretrained(root / "bpe")
    bpe_tokenizer().save_pretrained(root / "bpe")
    return root / "bpe"


def _export(files, root):
    from alambic.workflows.export import export

    export(files / "student", "torch-int8", root / "int8", log=lambda line: None)
    return root / "int8"


BAD = {
    "export first": (lambda f, t: [_export(f, t), f / "teacher", "--chat-data", f / "chat.jsonl"],
                     "put the PyTorch teacher first"),
    "task and chat": (lambda f, t: [f / "teacher", "--task", "classification", "--data", f / "chat.jsonl",
                                    "--chat-data", f / "chat.jsonl"], "not both"),
    "another tokenizer": (lambda f, t: [f / "teacher", _bpe(t), "--chat-data", f / "chat.jsonl"],
                          "--chat-data: bpe uses another tokenizer than teacher"),
    "no chat template": (lambda f, t: [_no_template(t), "--chat-data", f / "chat.jsonl"], "no chat template"),
    "no final answer": (lambda f, t: [f / "teacher", "--chat-data", write_jsonl(t / "q.jsonl", [{"prompt": "Hi?"}])],
                        "does not end with an assistant answer"),
    "prompt too long": (lambda f, t: [f / "teacher", f / "student", "--chat-data", write_jsonl(
        t / "long.jsonl", [{"prompt": "word " * 300, "completion": "yes"}])], "lower --chat-max-new-tokens"),
    "max new tokens": (lambda f, t: [f / "teacher", "--chat-data", f / "chat.jsonl", "--chat-max-new-tokens", "0"],
                       "--chat-max-new-tokens must be >= 1, got 0"),
    "max examples": (lambda f, t: [f / "teacher", "--chat-data", f / "chat.jsonl", "--chat-max-examples", "0"],
                     "--chat-max-examples must be >= 1, got 0"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_chat_input_is_one_line_and_exit_2(case, files, tmp_path, capsys):
    args, message = BAD[case]
    argv = [str(a) for a in args(files, tmp_path)]
    names = [a.rsplit("/", 1)[-1] for a in argv[:next(i for i, a in enumerate(argv) if a.startswith("--"))]]
    code = main(["report", *argv, "--names", ",".join(names), "--seq-lens", "8", "--repeats", "1", "--warmup", "0",
                 "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("alambic: error:")]
    assert len(errors) == 1 and message in errors[0], err
    assert not (tmp_path / "r" / "report.json").exists()
