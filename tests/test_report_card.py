"""Model cards: an exported student says how it was made; `alambic report --card` adds the measured figures."""

import json

import yaml

from alambic.cli import main
from alambic.config import load_config
from alambic.evaluation.model_card import (REPORT_END, REPORT_START, add_report_to_card, card_from_run,
                                           distillation_card)
from tiny import bpe_tokenizer, sample_texts, tiny_llama


def test_card_records_teacher_recipe_losses_data_and_steps():
    cfg = load_config(None, [{"teacher": "smollm2-135m", "out": "runs/x", "data": {"train": ["bbc-news:train"]},
                              "student": {"layers": "every-other"}, "training": {"max_steps": 150, "batch_size": 4}}])
    card = distillation_card(cfg.to_dict(), teacher_parameters=134_515_008, student_parameters=81_413_568,
                             teacher_layers=30, student_layers=15, metrics={"step": 150, "loss/kd": 2.4},
                             kind="causal")
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "# A 15-layer distilled student of smollm2-135m" in card
    assert "- teacher: `smollm2-135m` (30 layers, 134.5M parameters)" in card
    assert "the teacher's layers `every-other` copied" in card and "(15 layers, 81.4M parameters)" in card
    for row in ("| kd | 5 | Weight of the soft-target divergence", "| lm | 2 |", "| cos | 1 |"):
        assert row in card
    assert "temperature = 2.0" in card and "`bbc-news:train`" in card
    assert "150 steps of 4 x 1 sequences per process (up to 76,800 tokens per process)" in card
    assert "last logged (step 150): loss/kd 2.4" in card and "AutoModelForCausalLM" in card
    config_block = card.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(config_block) == yaml.safe_load(yaml.safe_dump(cfg.to_dict()))  # reproducible


def test_card_keeps_a_layer_selection_section():
    cfg = load_config(None, [{"teacher": "t", "out": "o", "data": {"train": ["d"]}}]).to_dict()
    selection = ("---\nlibrary_name: transformers\n---\n\n# A 2-layer student of t\n\nintro\n\n"
                 "## Layer selection\n\n- kept: 0, 3\n")
    card = distillation_card(cfg, selection_card=selection)
    assert "## Layer selection\n\n- kept: 0, 3" in card and card.count("library_name") == 1


def test_distill_exports_a_card_and_report_adds_figures(tmp_path, capsys):
    tiny_llama().save_pretrained(tmp_path / "teacher")
    bpe_tokenizer().save_pretrained(tmp_path / "teacher")
    texts = sample_texts(10)
    (tmp_path / "train.txt").write_text("\n\n".join(texts[:8]))
    (tmp_path / "heldout.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[8:]))
    run = tmp_path / "run"
    code = main(["distill", "--teacher", str(tmp_path / "teacher"), "--data", str(tmp_path / "train.txt"),
                 "--out", str(run), "--max-steps", "2", "--set", "data.max_length=32", "--set", "training.log_every=1",
                 "--no-progress"])
    assert code == 0
    card = (run / "student" / "README.md").read_text()
    assert "## How it was made" in card and f"`{tmp_path / 'teacher'}`" in card and "(2 layers" in card
    assert "| kd | 5 |" in card and "2 steps of 8 x 1 sequences" in card
    assert REPORT_START not in card
    capsys.readouterr()

    code = main(["report", str(tmp_path / "teacher"), str(run / "student"),
                 "--lm-data", str(tmp_path / "heldout.jsonl"),
                 "--seq-lens", "16", "--batch-size", "2", "--warmup", "0", "--repeats", "1", "--threads", "1",
                 "--out", str(tmp_path / "report"), "--card", str(run / "student"), "--no-plots"])
    assert code == 0, capsys.readouterr().err
    with_report = (run / "student" / "README.md").read_text()
    assert with_report.startswith(card.rstrip("\n"))  # the card is kept, the figures appended
    section = with_report[with_report.index(REPORT_START):]
    assert section.rstrip().endswith(REPORT_END)
    assert "| parameters |" in section and "% retained" in section and "faster" in section
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["report.json", "report.md"]


def test_folder_without_card_gets_one_from_its_run_or_a_minimal_one(tmp_path):
    report = {"created": "2026-01-01T00:00:00", "command": None, "warnings": [], "reference": "t",
              "settings": {"devices": ["cpu"], "seq_lens": [8], "batch_size": 2},
              "machine": {"cpu": "cpu", "torch": "2", "torch_threads": 1, "gpu": None},
              "models": [{"name": "t", "parameters": {"total": 10, "non_embedding": 5}, "disk_bytes": 40,
                          "flops": [{"seq_len": 8, "measured_per_token": 20.0}], "speed": [],
                          "quality": {"value": None}, "ratios": {"parameters": 1.0, "disk": 1.0, "speed": [],
                                                                  "quality_retention_pct": None}}]}
    bare = tmp_path / "model"
    bare.mkdir()
    text = add_report_to_card(bare, report, 0).read_text()
    assert "No record of how this model was made" in text and REPORT_START in text

    run = tmp_path / "run"
    (run / "student").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(
        load_config(None, [{"teacher": "smollm2-135m", "out": "o", "data": {"train": ["bbc-news:train"]}}]).to_dict()))
    (run / "metrics.jsonl").write_text('{"step": 5, "loss/kd": 3.0}\n{"step": 10, "loss/kd": 2.0}\n')
    assert "last logged (step 10): loss/kd 2" in card_from_run(run)
    text = add_report_to_card(run / "student", report, 0).read_text()
    assert "## How it was made" in text and text.count(REPORT_START) == 1
