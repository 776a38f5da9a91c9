"""The task workflow end to end through the CLI, on tiny real models and the small standard-format files in
tests/data: finetune -> init-student (head copied) -> distill-task (pred, trm+pred, joint) -> eval-task."""

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from alambic.cli import main
from alambic.engine.checkpoint import latest_checkpoint
from alambic.students import init_student
from tiny import tiny_bert, wordpiece_tokenizer

DATA = Path(__file__).parent / "data"
FAST = ["--max-steps", "3", "--eval-every", "2", "--batch-size", "4", "--max-length", "96", "--doc-stride", "16",
        "--no-progress"]
FILES = {"classification": "sentiment_ko.jsonl", "ner": "ner.conll", "qa": "squad.json"}


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """A tiny pre-trained-style encoder folder (BertForMaskedLM, no task head) with MiniLM's tokenizer."""
    path = tmp_path_factory.mktemp("encoder")
    tiny_bert(num_hidden_layers=4).save_pretrained(path)
    wordpiece_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def teachers(encoder, tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    for task, name in FILES.items():
        assert main(["finetune", "--task", task, "--model", str(encoder), "--train", str(DATA / name),
                     "--out", str(root / task), *FAST]) == 0
    return root


@pytest.mark.parametrize("task", list(FILES))
def test_finetune_keeps_best_model_with_labels(teachers, task):
    best = teachers / task / "best"
    assert (teachers / task / "student" / "config.json").is_file()  # and the last step's model, as distill exports it
    config = transformers.AutoConfig.from_pretrained(best)
    summary = json.loads((teachers / task / "task.json").read_text())
    assert config.architectures[0].endswith({"classification": "ForSequenceClassification",
                                             "ner": "ForTokenClassification", "qa": "ForQuestionAnswering"}[task])
    if task == "classification":
        assert [config.id2label[i] for i in range(2)] == ["긍정", "부정"] == summary["labels"]
    if task == "ner":
        assert config.id2label[0] == "O" and len(config.id2label) == 7


@pytest.mark.parametrize("task,stages", [("classification", "pred"), ("ner", "trm,pred"), ("qa", "joint"),
                                         ("qa", "trm,pred")])
def test_distill_task_stages_end_to_end(teachers, tmp_path, task, stages, capsys):
    out = tmp_path / "run"
    argv = ["distill-task", "--task", task, "--teacher", str(teachers / task), "--student-layers", "0,2",
            "--train", str(DATA / FILES[task]), "--out", str(out), "--stages", stages, "--alpha-ce", "0.5", *FAST]
    assert main(argv) == 0
    assert (out / "best" / "config.json").is_file()
    # the same layout as distill: OUT/student is the last step's model, loadable with its tokenizer
    last_run = out / "stage-2-pred" if stages == "trm,pred" else out
    last = load_file(str(out / "student" / "model.safetensors"))
    final = load_file(str(latest_checkpoint(last_run) / "student" / "model.safetensors"))
    assert (out / "student" / "tokenizer_config.json").is_file()
    assert all(torch.equal(last[k], final[k]) for k in final)
    if stages == "trm,pred":
        assert (out / "stage-1-trm" / "stage-done").is_file() and (out / "stage-2-pred" / "best").is_dir()
        # the first stage keeps only the student the second started from: its checkpoints are copies
        assert sorted(p.name for p in (out / "stage-1-trm").iterdir()) == ["metrics.jsonl", "stage-done", "student"]
    summary = json.loads((out / "task.json").read_text())
    assert summary["stages"] == stages.split(",") and summary["student_parameters"] < summary["teacher_parameters"]
    capsys.readouterr()
    assert main(["eval-task", str(teachers / task), str(out), "--task", task, "--data", str(DATA / FILES[task]),
                 "--max-length", "96", "--doc-stride", "16", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    expected = {"classification": "accuracy", "ner": "f1", "qa": "exact_match"}[task]
    assert len(rows) == 2 and all(expected in row for row in rows)


def test_init_student_from_a_task_teacher_copies_the_head(teachers, tmp_path):
    out = tmp_path / "student"
    assert main(["init-student", "--teacher", str(teachers / "ner" / "best"), "--out", str(out),
                 "--layers", "0,1,2,3"]) == 0
    student = transformers.AutoModelForTokenClassification.from_pretrained(out).eval()
    teacher = transformers.AutoModelForTokenClassification.from_pretrained(teachers / "ner" / "best").eval()
    assert type(student).__name__ == "BertForTokenClassification"
    assert student.config.id2label == teacher.config.id2label
    assert torch.equal(student.classifier.weight, teacher.classifier.weight)
    ids = wordpiece_tokenizer()(["Mary visited Paris ."], return_tensors="pt")["input_ids"]
    with torch.no_grad():  # all layers kept and token type 0: the same function as the teacher
        assert torch.allclose(student(input_ids=ids).logits, teacher(input_ids=ids).logits, atol=1e-5)
    built = init_student(teachers / "ner" / "best", layers="0,2")
    assert type(built.model).__name__ == "BertForTokenClassification"


def test_distill_task_pairs_a_built_students_layers_with_their_sources(teachers, tmp_path, capsys):
    student, out = tmp_path / "student", tmp_path / "run"
    assert main(["init-student", "--teacher", str(teachers / "ner" / "best"), "--out", str(student),
                 "--layers", "0,2"]) == 0
    capsys.readouterr()
    assert main(["distill-task", "--task", "ner", "--teacher", str(teachers / "ner"), "--student", str(student),
                 "--train", str(DATA / "ner.conll"), "--out", str(out), "--stages", "trm,pred", "--layer-map",
                 "copied", *FAST]) == 0
    captured = capsys.readouterr()
    assert "layer map copied: 0:0,1:1,2:3" in captured.out + captured.err  # uniform: 0:0,1:2,2:4
    for folder in ("best", "student"):  # the best and the last student both say where their layers came from
        assert json.loads((out / folder / "alambic-layers.json").read_text()) == {"teacher_layers": 4,
                                                                                  "layers": [0, 2]}


def test_distill_task_with_a_student_folder_and_resume(teachers, encoder, tmp_path):
    out = tmp_path / "run"
    argv = ["distill-task", "--task", "ner", "--teacher", str(teachers / "ner"), "--student", str(encoder),
            "--train", str(DATA / "ner.conll"), "--out", str(out), "--stages", "trm,pred", *FAST]
    assert main(argv) == 0  # a model without a task head: fresh head, label set taken from the teacher
    config = transformers.AutoConfig.from_pretrained(out / "best")
    assert config.id2label == transformers.AutoConfig.from_pretrained(teachers / "ner" / "best").id2label
    assert main(argv) == 2  # refuses to overwrite a run
    assert main(argv + ["--resume"]) == 0  # both stages already finished: nothing to redo


def one_line_error(argv, capsys) -> str:
    """Run the CLI, expect exit 2 with a single 'alambic: error:' line, and return it."""
    assert main(argv) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("alambic: error: ") and "\n" not in message
    return message


def test_bad_input_errors_are_one_line(teachers, tmp_path, capsys):
    def error(argv):
        return one_line_error(argv, capsys)

    base = ["--out", str(tmp_path / "x"), *FAST]
    assert "fine-tuned for ner, not qa" in error(
        ["distill-task", "--task", "qa", "--teacher", str(teachers / "ner"), "--student-layers", "0",
         "--train", str(DATA / "squad.json"), *base])
    assert "never occurs in the labels of teacher" in error(
        ["distill-task", "--task", "classification", "--teacher", str(teachers / "classification"),
         "--student-layers", "0", "--train", str(DATA / "topics.csv"), *base])
    assert "label 'politics' never occurs in the training data" in error(
        ["finetune", "--task", "classification", "--model", str(teachers / "classification"),
         "--train", str(DATA / "topics.csv"), "--validation", str(DATA / "topics_bad_validation.csv"), *base])
    assert "ner_bad.conll:5:" in error(
        ["finetune", "--task", "ner", "--model", str(teachers / "ner"), "--train", str(DATA / "ner_bad.conll"), *base])
    assert "is not at answer_start" in error(
        ["finetune", "--task", "qa", "--model", str(teachers / "qa"), "--train", str(DATA / "squad_bad_start.json"),
         *base])
    assert "fine-tuned for ner, not classification" in error(
        ["eval-task", str(teachers / "ner"), "--task", "classification", "--data", str(DATA / "topics.csv")])
    assert "--stages 'pred,trm' is not one of" in error(
        ["distill-task", "--task", "ner", "--teacher", str(teachers / "ner"), "--student-layers", "0",
         "--train", str(DATA / "ner.conll"), "--stages", "pred,trm", *base])


def test_eval_task_scores_qa_the_korquad_way_on_request(teachers, capsys):
    from alambic.tasks import encode, read_task_data
    from alambic.tasks.evaluate import predict
    from alambic.tasks.metrics import korquad_exact_match, korquad_f1
    from alambic.tasks.models import load_task_model

    capsys.readouterr()
    assert main(["eval-task", str(teachers / "qa"), "--task", "qa", "--data", str(DATA / "squad.json"),
                 "--max-length", "96", "--doc-stride", "16", "--qa-metric", "korquad", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    model, tokenizer, _ = load_task_model(teachers / "qa", "qa", need_head=True)
    examples = read_task_data("qa", DATA / "squad.json")
    predictions = predict(model, "qa", examples, encode("qa", examples, tokenizer, [], max_length=96, doc_stride=16),
                          tokenizer, [])
    f1 = sum(max(korquad_f1(p, g) for g in e.answers) for p, e in zip(predictions, examples)) / len(examples)
    em = sum(max(korquad_exact_match(p, g) for g in e.answers) for p, e in zip(predictions, examples)) / len(examples)
    assert row["f1"] == pytest.approx(100 * f1) and row["exact_match"] == pytest.approx(100 * em)


def _transfer_files(tmp_path):
    """Unlabelled copies of the test data: records without labels, CoNLL tokens without tags, questions without
    answers, and a plain text file."""
    from alambic.tasks.data import read_conll, read_squad

    records = [json.loads(line) for line in (DATA / FILES["classification"]).read_text().splitlines() if line.strip()]
    (tmp_path / "texts.jsonl").write_text("".join(json.dumps({"text": r["text"]}, ensure_ascii=False) + "\n"
                                                  for r in records), encoding="utf-8")
    (tmp_path / "texts.txt").write_text("".join(r["text"].replace("\n", " ") + "\n" for r in records),
                                        encoding="utf-8")
    (tmp_path / "tokens.conll").write_text("\n\n".join("\n".join(e.words) for e in read_conll(DATA / "ner.conll"))
                                           + "\n", encoding="utf-8")
    squad = json.loads((DATA / "squad.json").read_text())
    for article in squad["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                qa.pop("answers")
    (tmp_path / "questions.json").write_text(json.dumps(squad), encoding="utf-8")
    assert all(not e.labelled for e in read_squad(tmp_path / "questions.json"))
    return {"classification": tmp_path / "texts.jsonl", "ner": tmp_path / "tokens.conll",
            "qa": tmp_path / "questions.json"}


@pytest.mark.parametrize("task", list(FILES))
def test_distill_task_learns_from_an_unlabelled_transfer_set(teachers, tmp_path, task, capsys):
    transfer = _transfer_files(tmp_path)[task]
    out = tmp_path / "run"
    assert main(["distill-task", "--task", task, "--teacher", str(teachers / task), "--student-layers", "0,2",
                 "--train", str(DATA / FILES[task]), "--unlabelled", str(transfer), "--out", str(out),
                 "--alpha-ce", "1", *FAST[:-1], "--max-steps", "12"]) == 0
    summary = json.loads((out / "task.json").read_text())
    counts = summary["training_examples"]
    assert counts["unlabelled"] > 0 and counts["labelled"] > 0
    assert "unlabelled (soft targets only)" in capsys.readouterr().out
    assert summary["teacher_cache"]["hits"] > 0  # later epochs read the unlabelled rows' logits from the cache


def test_transfer_set_as_plain_text_and_augmentation_output(teachers, tmp_path):
    _transfer_files(tmp_path)
    out = tmp_path / "run"
    assert main(["distill-task", "--task", "classification", "--teacher", str(teachers / "classification"),
                 "--student-layers", "0", "--hidden-size", "16", "--train", str(DATA / FILES["classification"]),
                 "--unlabelled", str(tmp_path / "texts.txt"), str(DATA / FILES["classification"]),
                 "--out", str(out), *FAST]) == 0  # a labelled file given as transfer set is used without its labels
    assert "## Width pruning" in (out / "best" / "README.md").read_text()  # sliced on the training text
    counts = json.loads((out / "task.json").read_text())["training_examples"]
    total = len([line for line in (DATA / FILES["classification"]).read_text().splitlines() if line.strip()])
    assert counts["unlabelled"] == 2 * total  # every line of the text file, and the labelled file once more
    assert counts["labelled"] < total  # the rest is held out for validation


def test_unlabelled_input_errors_are_one_line(teachers, tmp_path, capsys):
    files = _transfer_files(tmp_path)

    def error(argv):
        return one_line_error(argv, capsys)

    base = ["--out", str(tmp_path / "x"), *FAST]
    assert "so no example is labelled" in error(
        ["finetune", "--task", "classification", "--model", str(teachers / "classification"),
         "--train", str(files["classification"]), *base])
    assert "has no labelled example (" in error(
        ["finetune", "--task", "ner", "--model", str(teachers / "ner"), "--train", str(files["ner"]), *base])
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"text": "good", "label": "긍정"}\n{"text": "no label here"}\n', encoding="utf-8")
    assert "example 2 has no label (1 of 2 examples lack one)" in error(
        ["finetune", "--task", "classification", "--model", str(teachers / "classification"),
         "--train", str(mixed), *base])
    amharic = tmp_path / "amharic.txt"
    amharic.write_text("ሰላም ለዓለም ሰላም\n" * 20, encoding="utf-8")
    assert "of its tokens are unknown ([UNK]) to the teacher's tokenizer" in error(
        ["distill-task", "--task", "classification", "--teacher", str(teachers / "classification"),
         "--student-layers", "0", "--train", str(DATA / FILES["classification"]), "--unlabelled", str(amharic),
         *base])
    assert "alpha_kd is 0" in error(
        ["distill-task", "--task", "classification", "--teacher", str(teachers / "classification"),
         "--student-layers", "0", "--train", str(DATA / FILES["classification"]),
         "--unlabelled", str(files["classification"]), "--alpha-kd", "0", "--alpha-ce", "1", *base])
    assert "not divisible by 3 attention heads" in error(
        ["distill-task", "--task", "classification", "--teacher", str(teachers / "classification"),
         "--student-layers", "0", "--hidden-size", "16", "--num-heads", "3",
         "--train", str(DATA / FILES["classification"]), *base])


def test_pred_loss_flag_reaches_the_objective(teachers, tmp_path):
    """--pred-loss mse is what the run trains with (task.json records the loss options; the objective itself is
    checked against logit_mse in test_task_losses), and it trains a different student than the KL (the best by validation may be the copied student itself, so
    the last step's weights are compared)."""
    weights = {}
    for loss in ("kl", "mse"):
        out = tmp_path / loss
        assert main(["distill-task", "--task", "classification", "--teacher", str(teachers / "classification"),
                     "--student-layers", "0", "--train", str(DATA / FILES["classification"]), "--out", str(out),
                     "--pred-loss", loss, "--alpha-ce", "0", *FAST]) == 0
        assert json.loads((out / "task.json").read_text())["loss"]["prediction_loss"] == loss
        weights[loss] = load_file(str(latest_checkpoint(out) / "student" / "model.safetensors"))  # the last step
    assert any(not torch.equal(weights["kl"][k], weights["mse"][k]) for k in weights["kl"])
