"""`alambic report` on tiny real models: every figure checked against a direct measurement, the JSON layout pinned,
files written atomically, and every bad input refused in one line. Timings are never asserted to be fast: only
that they exist, are positive, and are computed as documented."""

import csv
import importlib.util
import json
import math
import statistics

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from alambic.cli import main
from alambic.config import DataConfig
from alambic.data.pipeline import heldout_batches
from alambic.errors import AlambicError
from alambic.evaluation import report as report_mod
from alambic.evaluation.report import MODEL_KEYS, REPORT_KEYS, SCHEMA_VERSION, ReportSettings, build_report
from alambic.students import init_student, save_student
from tiny import bpe_tokenizer, sample_texts, tiny_bert, tiny_llama, wordpiece_tokenizer

PNG = b"\x89PNG\r\n\x1a\n"
HAS_TASKS = importlib.util.find_spec("alambic.tasks") is not None


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    teacher, tokenizer = tiny_llama(), bpe_tokenizer()
    teacher.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    save_student(init_student(teacher, layers="0,2").model, tokenizer, root / "student")
    bare = transformers.BertModel(tiny_bert().config)  # an encoder without an MLM head, like minilm-l6
    bare.save_pretrained(root / "bare")
    wordpiece_tokenizer().save_pretrained(root / "bare")
    other = tiny_llama(vocab_size=600)
    other.save_pretrained(root / "other")
    bpe_tokenizer(600).save_pretrained(root / "other")
    texts = sample_texts(12)
    (root / "heldout.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[6:]))
    (root / "short.txt").write_text("A few words only.")
    (root / "not-a-model").mkdir()
    (root / "not-a-model" / "weights.txt").write_text("nothing here")
    return root


SETTINGS = dict(seq_lens=[8, 16], batch_size=2, warmup=0, repeats=3, max_tokens=512, threads=1)


@pytest.fixture(scope="module")
def report(files):
    settings = ReportSettings(**SETTINGS, lm_data=[str(files / "heldout.jsonl")])
    return build_report([str(files / "teacher"), str(files / "student"), str(files / "bare")], settings,
                        log=None, warn=None)


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_layout_is_stable(report):
    assert tuple(report) == REPORT_KEYS
    assert report["schema_version"] == SCHEMA_VERSION == 1 and report["kind"] == "alambic.report"
    for index, row in enumerate(report["models"]):
        assert tuple(row) == MODEL_KEYS
        assert set(row["parameters"]) == {"total", "embedding", "non_embedding"}
        for f in row["flops"]:
            assert {"seq_len", "formula_per_token", "measured_per_token", "relative_difference", "breakdown"} == set(f)
        for s in row["speed"]:
            paired = {"paired"} if index else set()  # the speed-up over the reference, timed in the same rounds
            assert {"device", "dtype", "runtime", "batch_size", "seq_len", "warmup", "repeats", "threads", "times_s",
                    "median_s", "p25_s", "p75_s", "min_s", "max_s", "ms_per_batch", "tokens_per_s"} | paired == set(s)
        assert {"parameters", "non_embedding_parameters", "disk", "flops", "speed", "summary",
                "quality_retention_pct", "chat_retention_pct"} == set(row["ratios"])
        assert {"metric", "value", "source"} <= set(row["quality"])
        assert row["chat"] is None and row["ratios"]["chat_retention_pct"] is None  # no --chat-data
    assert {"cpu", "cpu_count", "torch_threads", "torch", "transformers", "gpu"} <= set(report["machine"])
    assert report["settings"]["devices"] == (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    assert json.loads(json.dumps(report)) == json.loads(json.dumps(report, default=str))


def test_size_figures_match_a_direct_count(report, files):
    for row, folder in zip(report["models"], ("teacher", "student", "bare")):
        auto = transformers.AutoModel if folder == "bare" else transformers.AutoModelForCausalLM
        model = auto.from_pretrained(files / folder)
        assert row["parameters"]["total"] == sum(p.numel() for p in model.parameters())
        assert row["disk_bytes"] == (files / folder / "model.safetensors").stat().st_size
        assert row["layers"] == model.config.num_hidden_layers
    teacher, student, bare = report["models"]
    # tied llama: the one 512 x 32 embedding; bert: word, position and token-type tables
    assert teacher["parameters"]["embedding"] == 512 * 32 == student["parameters"]["embedding"]
    assert bare["parameters"]["embedding"] == (30522 + 128 + 2) * 32
    assert student["ratios"]["parameters"] == student["parameters"]["total"] / teacher["parameters"]["total"]
    assert student["ratios"]["disk"] == student["disk_bytes"] / teacher["disk_bytes"]


def test_perplexity_matches_a_direct_computation(report, files):
    data_cfg = DataConfig(train=[str(files / "heldout.jsonl")], max_length=16, eval_max_tokens=512)
    for row, folder in zip(report["models"][:2], ("teacher", "student")):
        model = transformers.AutoModelForCausalLM.from_pretrained(files / folder).eval()
        batches = heldout_batches([str(files / "heldout.jsonl")], bpe_tokenizer(), "causal", data_cfg, 8)
        nll, count = 0.0, 0
        with torch.no_grad():
            for b in batches:  # the plain HF forward, not alambic's body/head split
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.flatten(0, 1)
                nll += F.cross_entropy(logits[b["lm_positions"]], b["lm_targets"], reduction="sum").item()
                count += len(b["lm_targets"])
        q = row["quality"]
        assert q["metric"] == "perplexity" and q["tokens"] == count and q["max_length"] == 16
        assert q["value"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    teacher, student = report["models"][:2]
    assert student["ratios"]["quality_retention_pct"] == pytest.approx(
        100 * teacher["quality"]["value"] / student["quality"]["value"])


def test_model_without_lm_head_has_no_quality_but_a_reason(report):
    bare = report["models"][2]
    assert bare["quality"]["value"] is None and "not measurable" in bare["quality"]["reason"]
    assert bare["ratios"]["quality_retention_pct"] is None
    assert "n/a" in report_mod.render_markdown(report)


def test_speed_figures_are_computed_as_documented(report):
    for row in report["models"]:
        assert {(s["batch_size"], s["seq_len"]) for s in row["speed"]} == {(1, 8), (2, 8), (1, 16), (2, 16)}
        for s in row["speed"]:
            times = s["times_s"]
            assert 3 <= len(times) <= 60 and len(times) == s["repeats"] and all(t > 0 for t in times)
            assert s["median_s"] == statistics.median(times)
            assert s["min_s"] <= s["p25_s"] <= s["median_s"] <= s["p75_s"] <= s["max_s"]
            assert s["tokens_per_s"] == pytest.approx(s["batch_size"] * s["seq_len"] / s["median_s"])
            assert s["ms_per_batch"] == pytest.approx(1000 * s["median_s"])
            assert s["threads"] == 1 and s["dtype"] == "float32"  # --threads 1, as asked


def test_quantile_interpolates_like_numpy():
    values = [0.3, 0.1, 0.7, 0.2, 0.5]
    for q in (0, 0.25, 0.5, 0.75, 1):
        assert report_mod.speed_mod.quantile(values, q) == pytest.approx(float(np.quantile(values, q)))


def test_ratios_are_computed_from_the_figures(report):
    teacher, student = report["models"][:2]
    for r in student["ratios"]["speed"]:
        key = (r["device"], r["batch_size"], r["seq_len"])
        mine = next(s for s in student["speed"] if (s["device"], s["batch_size"], s["seq_len"]) == key)
        ref = next(s for s in teacher["speed"] if (s["device"], s["batch_size"], s["seq_len"]) == key)
        def flops(row):
            return next(f["measured_per_token"] for f in row["flops"] if f["seq_len"] == r["seq_len"])

        # interleaved rounds: the median of the per-round ratios, with the median's ~95% interval
        ratios = [a / b for a, b in zip(ref["times_s"], mine["times_s"])]
        assert len(ref["times_s"]) == len(mine["times_s"]) == r["rounds"]
        assert r["speedup"] == pytest.approx(statistics.median(ratios))
        iqr = float(np.quantile(ratios, 0.75) - np.quantile(ratios, 0.25))
        assert r["notch"] == pytest.approx(1.57 * iqr / math.sqrt(len(ratios)))
        assert r["flop_ratio"] == pytest.approx(flops(teacher) / flops(student))
        assert r["efficiency"] == pytest.approx(r["speedup"] / r["flop_ratio"])
    summary = student["ratios"]["summary"]["cpu"]
    latency = [r["speedup"] for r in student["ratios"]["speed"] if r["batch_size"] == 1]
    assert summary["latency_speedup_geomean"] == pytest.approx(math.prod(latency) ** (1 / len(latency)))
    for f in student["flops"]:  # the formula and the counted forward agree on supported architectures
        assert f["relative_difference"] == 0
    assert 1 < student["ratios"]["flops"][0]["ratio"] < 2  # 2 of 4 layers, same head


def test_thread_setting_is_recorded_and_restored(files):
    before = torch.get_num_threads()
    asked = 1 if before != 1 else 2
    rep = build_report([str(files / "student")], ReportSettings(seq_lens=[8], batch_size=1, warmup=0, repeats=1,
                                                                threads=asked), log=None, warn=None)
    assert rep["machine"]["torch_threads"] == asked == rep["models"][0]["speed"][0]["threads"]
    assert torch.get_num_threads() == before


def test_different_tokenizers_are_reported(report):
    assert any("another tokenizer" in w and "bare" in w for w in report["warnings"])
    assert "another tokenizer" in report_mod.render_markdown(report)


def test_cli_writes_report_plots_and_card_atomically(files, tmp_path, capsys):
    out = tmp_path / "report"
    argv = ["report", files / "teacher", files / "student", files / "other", "--lm-data", files / "heldout.jsonl",
            "--seq-lens", "8", "--batch-size", "2", "--warmup", "0", "--repeats", "1", "--max-tokens", "256",
            "--threads", "1",
            "--names", "teacher,student,other", "--out", out, "--card", files / "student"]
    code, stdout, stderr = run(argv, capsys)
    assert code == 0, stderr
    assert "| student | torch float32 | 2 |" in stdout and "quality retained" in stdout
    assert "[1/3] teacher" in stderr and "tokens/s" in stderr  # progress while measuring
    assert "alambic: warning: other uses another tokenizer" in stderr
    assert sorted(p.name for p in out.iterdir()) == ["quality_vs_speed.png", "report.json", "report.md", "speed.png"]
    for png in ("quality_vs_speed.png", "speed.png"):
        data = (out / png).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
    from alambic.evaluation.plots import readable_mode

    for path in [*out.iterdir(), files / "student" / "README.md"]:  # not mkstemp's 0600: reports are shared
        assert path.stat().st_mode & 0o777 == readable_mode()
    md = (out / "report.md").read_text()
    for part in ("## Summary", "## Speed", "## FLOPs per token", "## Quality", "## Machine", "another tokenizer"):
        assert part in md
    saved = json.loads((out / "report.json").read_text())
    assert saved["schema_version"] == 1 and [m["name"] for m in saved["models"]] == ["teacher", "student", "other"]
    assert saved["command"].startswith("alambic report ")

    card = (files / "student" / "README.md").read_text()
    assert card.count("<!-- alambic-report:start -->") == 1 and "## Measured (alambic report)" in card
    assert "reference: teacher" in card and "retained" in card
    code, _, _ = run(argv, capsys)  # a second report replaces the section
    assert code == 0
    card = (files / "student" / "README.md").read_text()
    assert card.count("<!-- alambic-report:start -->") == 1 and card.count("<!-- alambic-report:end -->") == 1


def test_interrupted_report_writes_nothing(files, tmp_path, capsys, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report_mod.speed_mod, "time_interleaved", interrupt)
    out = tmp_path / "report"
    code, _, stderr = run(["report", files / "teacher", "--seq-lens", "8", "--out", out], capsys)
    assert code == 130 and "nothing was written" in stderr
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("extra, message", [
    (["{not_a_model}"], "is a folder but not a Hugging Face model (no config.json)"),
    (["--lm-data", "{short}", "--max-length", "64"], "fewer than one block of 64: add text or lower --max-length"),
    (["--task", "sst2", "--data", "{heldout}"], "unknown task 'sst2'" if HAS_TASKS else "not available yet"),
    (["--seq-lens", "512"], "takes at most 256 positions"),
    (["--seq-lens", "8,x"], "comma-separated list"),
    (["--names", "a,b,c"], "--names gives 3 names for 2 models"),
    (["--card", "{teacher}/.."], "is not one of the reported models"),
    (["--data", "{heldout}"], "--data is the data of a --task"),
    (["--repeats", "0"], "--repeats must be >= 1, got 0"),
    (["--devices", "gpu"], "unknown device 'gpu'"),
    pytest.param(["--devices", "cpu,cuda"], "no GPU is visible",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")),
])
def test_bad_input_is_one_line_and_exit_2(extra, message, files, tmp_path, capsys):
    subst = {"not_a_model": files / "not-a-model", "short": files / "short.txt", "heldout": files / "heldout.jsonl",
             "teacher": files / "teacher"}
    extra = [str(e).format(**subst) for e in extra]
    models = [files / "teacher", files / "student"]
    if extra and extra[0] == str(files / "not-a-model"):
        models, extra = [files / "teacher", extra[0]], []
    code, _, stderr = run(["report", *models, "--seq-lens", "8", "--repeats", "1", "--warmup", "0",
                           "--out", tmp_path / "r", *extra], capsys)
    assert code == 2, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("alambic: error:")]
    assert len(errors) == 1 and message in errors[0], stderr
    assert not (tmp_path / "r" / "report.json").exists()


def test_out_that_is_a_file_is_refused(files, tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    code, _, stderr = run(["report", files / "teacher", "--out", tmp_path / "taken"], capsys)
    assert code == 2 and "is a file" in stderr


def test_without_quality_data_the_plot_shows_size(files, tmp_path):
    from alambic.evaluation.report import write_report

    settings = ReportSettings(seq_lens=[8], batch_size=2, warmup=0, repeats=1, threads=1)
    rep = build_report([str(files / "teacher"), str(files / "student")], settings, log=None, warn=None)
    assert all(m["quality"]["value"] is None for m in rep["models"])
    written = write_report(rep, tmp_path)
    assert all(p.is_file() and p.stat().st_size > 0 for p in written)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_task_metric_through_the_task_package(files, tmp_path):
    labels = ["business", "sport"]
    for name, seed in (("task-teacher", 0), ("task-student", 1)):
        config = transformers.BertConfig(**{**tiny_bert().config.to_dict(), "num_hidden_layers": 4 - 2 * seed,
                                            "id2label": dict(enumerate(labels)),
                                            "label2id": {k: i for i, k in enumerate(labels)}})
        torch.manual_seed(seed)
        model = transformers.BertForSequenceClassification(config).eval()
        with torch.no_grad():  # the logit margin centred over these texts: predictions vary from text to text
            pooled = model.bert(**wordpiece_tokenizer()([t[:300] for t in sample_texts(8)], truncation=True,
                                                       max_length=16, padding=True, return_tensors="pt")).pooler_output
            margin = pooled @ (model.classifier.weight[0] - model.classifier.weight[1])
            model.classifier.bias.copy_(torch.stack([-margin.median(), torch.zeros(())]))
        model.save_pretrained(tmp_path / name)
        wordpiece_tokenizer().save_pretrained(tmp_path / name)
    texts = sample_texts(8)
    with (tmp_path / "eval.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for i, text in enumerate(texts):
            writer.writerow([text[:300], labels[i % 2]])
    settings = ReportSettings(seq_lens=[16], batch_size=2, warmup=0, repeats=1, threads=1, task="classification",
                              data=[str(tmp_path / "eval.csv")])
    rep = build_report([str(tmp_path / "task-teacher"), str(tmp_path / "task-student")], settings, log=None, warn=None)
    gold = [labels[i % 2] for i in range(len(texts))]
    for row, name in zip(rep["models"], ("task-teacher", "task-student")):
        # the score computed directly: the model's argmax on each truncated text, accuracy and macro-F1 by hand
        model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / name).eval()
        with torch.no_grad():
            encoded = wordpiece_tokenizer()([t[:300] for t in texts], truncation=True, max_length=16,
                                            padding=True, return_tensors="pt")
            predicted = [labels[i] for i in model(**encoded).logits.argmax(-1).tolist()]
        accuracy = sum(p == g for p, g in zip(predicted, gold)) / len(gold)
        assert len(set(predicted)) == 2  # a score that an example misaligned in the report would change
        f1s = []
        for label in labels:
            tp = sum(p == g == label for p, g in zip(predicted, gold))
            fp = sum(p == label != g for p, g in zip(predicted, gold))
            fn = sum(g == label != p for p, g in zip(predicted, gold))
            f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
        q = row["quality"]
        assert q["metric"] == "accuracy" and q["higher_is_better"] and q["value"] == pytest.approx(accuracy)
        assert q["examples"] == 8 and q["scores"]["macro_f1"] == pytest.approx(sum(f1s) / len(f1s))
        assert row["architecture"] == "BertForSequenceClassification"
        for f in row["flops"]:  # the classifier (2 x 32) is outside the formula, within the 2% check
            assert abs(f["relative_difference"]) < 0.02
    teacher, student = rep["models"]
    if teacher["quality"]["value"]:
        assert student["ratios"]["quality_retention_pct"] == pytest.approx(
            100 * student["quality"]["value"] / teacher["quality"]["value"])
    with pytest.raises(AlambicError, match="has no classification head"):
        build_report([str(files / "teacher")], settings, log=None, warn=None)
    with pytest.raises(AlambicError, match="unknown task 'sst2'"):
        build_report([str(tmp_path / "task-teacher")], ReportSettings(seq_lens=[16], task="sst2",
                                                                      data=[str(tmp_path / "eval.csv")]))
