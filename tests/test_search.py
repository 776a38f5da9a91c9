"""Shape search (alambic.search) on tiny real models: the budget is respected with a stubbed timing table, shapes
that miss it are never chosen, the choice is reproducible from the cached timings, the card and the search file
list every candidate, the calibration divergence is the direct computation, and every bad input is one line with
nothing written."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

from alambic.cli import main
from alambic.errors import AlambicError
from alambic.search import SEARCH_FILE, Budget, search_shape
from alambic.search import search as search_mod
from alambic.search import timing as timing_mod
from alambic.search.shapes import Shape, enumerate_shapes, shape_config, teacher_shape
from alambic.students import init_student, selection
from tiny import bpe_tokenizer, sample_texts, tiny_bert, tiny_llama


def teacher_model():
    return tiny_llama(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2).eval()


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    (root / "text.txt").write_text("\n\n".join(sample_texts(12)))
    return selection.calibration_batches([str(root / "text.txt")], bpe_tokenizer(), "causal", max_tokens=512,
                                         max_length=64)


def stub_timings(teacher, budget, folder, speed_of=lambda c: c.flop_ratio * 0.9):
    """A timing table in the cache, as if every shape had been timed: speed-up = 0.9 x the FLOP ratio."""
    cache = timing_mod.timing_cache(teacher, budget, folder)
    config, head = teacher.config, search_mod.head_type(teacher)
    t_flops = search_mod.flops(config, budget.seq_len, head)
    for shape in enumerate_shapes(config):
        ratio = t_flops / search_mod.flops(shape_config(config, shape), budget.seq_len, head)
        speedup = speed_of(search_mod.Candidate(shape, 0, 0.0, ratio))
        cache.put(shape, {"latency_ms": 10.0 / speedup, "teacher_ms": 10.0, "speedup": speedup, "notch": 0.01,
                          "rounds": 5})
    return cache


@pytest.fixture
def no_timing(monkeypatch):
    """Every timing must come from the cache."""
    def refuse(*args, **kwargs):
        raise AssertionError("a shape was timed although its timing was cached")

    monkeypatch.setattr(timing_mod, "time_against_teacher", refuse)


def test_candidates_keep_head_size_whole_kv_groups_and_aligned_widths():
    shapes = enumerate_shapes(teacher_model().config, align=64)
    teacher = teacher_shape(teacher_model().config)
    assert teacher in shapes
    for s in shapes:
        assert s.hidden % 64 == 0 and s.ffn % 64 == 0 and s.hidden // s.heads == 64  # head size 64 kept
        assert s.heads % 2 == 0 and s.kv_heads == s.heads // 2  # key/value groups of 2, whole
        assert 1 <= s.depth <= 4 and s.ffn <= 512
    assert {s.hidden for s in shapes} == {128, 256}  # 64 and 192 would split a key/value group


def test_the_budget_is_met_and_shapes_that_miss_are_never_chosen(calibration, tmp_path, no_timing):
    teacher = teacher_model()
    budget = Budget(speedup=2.5)
    stub_timings(teacher, budget, tmp_path)
    search, built = search_shape(teacher, budget, calibration, timing_cache=tmp_path, progress=False)
    assert search.chosen.timing["speedup"] >= 2.5 and search.chosen.status == "chosen"
    for c in search.candidates:
        if c.timing is not None and c.timing["speedup"] < 2.5:
            assert c.status == "misses" and c.divergence is None
        if c.status in ("meets", "chosen"):
            assert c.timing["speedup"] >= 2.5
    ranked = [c for c in search.candidates if c.divergence is not None]
    assert min(ranked, key=lambda c: c.divergence) is search.chosen
    shape = search.chosen.shape
    config = built.model.config
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (shape.depth, shape.hidden,
                                                                                      shape.ffn)
    assert built.search is search and len(built.layers) == shape.depth


def test_the_choice_is_reproducible_from_the_cached_timings(calibration, tmp_path, no_timing):
    teacher = teacher_model()
    budget = Budget(speedup=2.0)
    stub_timings(teacher, budget, tmp_path)
    first, built_first = search_shape(teacher, budget, calibration, timing_cache=tmp_path, progress=False)
    second, built_second = search_shape(teacher, budget, calibration, timing_cache=tmp_path, progress=False)
    assert first.chosen.shape == second.chosen.shape and first.layers == second.layers
    assert [(c.shape, c.status, c.divergence) for c in first.candidates] == \
        [(c.shape, c.status, c.divergence) for c in second.candidates]
    for a, b in zip(built_first.model.state_dict().values(), built_second.model.state_dict().values()):
        assert torch.equal(a, b)


def test_a_latency_budget_uses_the_measured_latency(calibration, tmp_path, no_timing, monkeypatch):
    teacher = teacher_model()
    budget = Budget(latency_ms=4.0)
    stub_timings(teacher, budget, tmp_path)
    monkeypatch.setattr(timing_mod, "time_against_teacher", lambda *a, **k: {"teacher_ms": 10.0})  # the teacher
    search, _ = search_shape(teacher, budget, calibration, timing_cache=tmp_path, progress=False)
    assert search.chosen.timing["latency_ms"] <= 4.0
    assert all(c.timing["latency_ms"] > 4.0 for c in search.candidates if c.status == "misses")


def test_a_size_budget_counts_parameters_without_timing(calibration, tmp_path, no_timing):
    teacher = teacher_model()
    search, built = search_shape(teacher, Budget(params=400_000), calibration, timing_cache=tmp_path,
                                 progress=False)
    assert sum(p.numel() for p in built.model.parameters()) == search.chosen.params <= 400_000
    assert all(c.timing is None for c in search.candidates)
    assert not list(tmp_path.iterdir())  # nothing timed, nothing cached


def test_the_card_and_the_search_file_list_every_candidate(calibration, tmp_path, no_timing):
    teacher = teacher_model()
    budget = Budget(speedup=2.0)
    stub_timings(teacher, budget, tmp_path)
    search, built = search_shape(teacher, budget, calibration, timing_cache=tmp_path, progress=False)
    card = built.model_card("tiny")
    assert "## Shape search" in card and "Budget: 2x faster than the teacher at batch 1 x 128 tokens" in card
    for c in search.candidates:
        if c.timing is not None:
            assert f"| {c.shape.label()} |" in card
    assert "| chosen |" in card
    saved = json.loads(search.to_json())
    assert len(saved["candidates"]) == len(search.candidates) and saved["chosen"] == search.chosen.shape.key
    assert {c["status"] for c in saved["candidates"]} <= {"chosen", "meets", "misses", "hopeless", "dominated",
                                                         "out of time"}


def test_the_time_limit_stops_the_timing_and_says_so(calibration, tmp_path, no_timing):
    with pytest.raises(AlambicError) as err:
        search_shape(teacher_model(), Budget(speedup=1.5), calibration, timing_cache=tmp_path, max_seconds=1e-9,
                     progress=False)
    assert "ran out of time" in str(err.value) and "raise --budget-seconds" in str(err.value)


def test_a_budget_no_shape_meets_names_the_fastest(calibration, tmp_path, no_timing):
    teacher = teacher_model()
    budget = Budget(speedup=3.0)
    stub_timings(teacher, budget, tmp_path, speed_of=lambda c: min(2.0, c.flop_ratio))
    with pytest.raises(AlambicError) as err:
        search_shape(teacher, budget, calibration, timing_cache=tmp_path, progress=False)
    assert "no student shape meets 3x faster" in str(err.value) and "the fastest timed, " in str(err.value)
    assert "runs 2.00x" in str(err.value) and "\n" not in str(err.value)


def test_calibration_divergence_is_the_direct_kl(monkeypatch):
    teacher, student = tiny_llama().eval(), tiny_llama(num_hidden_layers=2).eval()
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    positions = mask.flatten().nonzero().squeeze(1)
    batch = {"input_ids": ids, "attention_mask": mask, "token_positions": positions}
    with torch.no_grad():
        p = F.log_softmax(teacher(input_ids=ids, attention_mask=mask).logits.flatten(0, 1)[positions], -1)
        q = F.log_softmax(student(input_ids=ids, attention_mask=mask).logits.flatten(0, 1)[positions], -1)
    direct = float((p.exp() * (p - q)).sum(-1).mean())
    assert search_mod.calibration_divergence(teacher, student, [batch]) == pytest.approx(direct, rel=1e-5)
    assert search_mod.calibration_divergence(teacher, teacher, [batch]) == pytest.approx(0, abs=1e-6)
    # a language model's many scores are kept in bfloat16: the KL moves by far less than what ranks shapes
    monkeypatch.setattr(search_mod, "FULL_PRECISION_ELEMENTS", 0)
    targets = search_mod.teacher_targets(teacher, [batch])
    assert targets.values[0].dtype == torch.bfloat16
    assert search_mod.calibration_divergence(teacher, student, [batch], targets) == pytest.approx(direct, abs=2e-3)


def test_parameter_counts_are_the_models_own():
    from alambic.search.shapes import parameter_count, parameter_counts

    teacher = teacher_model()
    shapes = enumerate_shapes(teacher.config)
    counted = parameter_counts(teacher, shapes)
    for shape in shapes[::4]:
        assert counted[shape] == parameter_count(teacher, shape_config(teacher.config, shape))


def test_calibration_divergence_of_a_classifier_is_over_its_classes():
    config = tiny_bert().config
    config.num_labels = 3
    teacher = transformers.BertForSequenceClassification(config).eval()
    ids = torch.randint(5, 100, (3, 10), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    student = transformers.BertForSequenceClassification(config).eval()
    with torch.no_grad():
        p = F.log_softmax(teacher(**batch).logits, -1)
        q = F.log_softmax(student(**batch).logits, -1)
    direct = float((p.exp() * (p - q)).sum(-1).mean())
    assert search_mod.calibration_divergence(teacher, student, [batch]) == pytest.approx(direct, rel=1e-5)


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("search-cli")
    teacher_model().save_pretrained(root / "teacher")
    bpe_tokenizer().save_pretrained(root / "teacher")
    (root / "text.txt").write_text("\n\n".join(sample_texts(12)))
    return root


def searched_student(teacher_folder, tmp_path) -> Path:
    """``init-student --target-speedup 2`` of the tiny teacher (timings stubbed): the student folder."""
    teacher = transformers.AutoModelForCausalLM.from_pretrained(teacher_folder / "teacher").eval()
    stub_timings(teacher, Budget(speedup=2.0), tmp_path / "cache")
    out = tmp_path / "student"
    assert main(["init-student", "--teacher", str(teacher_folder / "teacher"), "--out", str(out),
                 "--target-speedup", "2", "--calibration-data", str(teacher_folder / "text.txt"),
                 "--calibration-tokens", "512", "--max-length", "64", "--timing-cache", str(tmp_path / "cache"),
                 "--no-progress"]) == 0
    return out


def test_init_student_with_a_budget_writes_the_table_card_and_search_file_that_travel(teacher_folder, tmp_path,
                                                                                     capsys, no_timing):
    out = searched_student(teacher_folder, tmp_path)
    stdout = capsys.readouterr().out
    assert "| shape | params (M) |" in stdout and "| chosen |" in stdout and "shape search: " in stdout
    saved = json.loads((out / SEARCH_FILE).read_text())
    assert saved["budget"]["speedup"] == 2.0 and saved["chosen"]
    assert "## Shape search" in (out / "README.md").read_text()
    student = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert Shape(student.config.num_hidden_layers, student.config.hidden_size, student.config.intermediate_size,
                 student.config.num_attention_heads, student.config.num_key_value_heads).key == saved["chosen"]
    # the record travels with the student through distillation, also from a run folder given as the student
    first, second = tmp_path / "first", tmp_path / "second"
    for init, run in ((out, first), (first, second)):
        assert main(["distill", "--teacher", str(teacher_folder / "teacher"), "--student", str(init), "--data",
                     str(teacher_folder / "text.txt"), "--max-steps", "1", "--batch-size", "2", "--max-length",
                     "32", "--no-progress", "--out", str(run)]) == 0
        assert json.loads((run / "student" / SEARCH_FILE).read_text()) == saved
    assert f"{first} is a run folder: using its model {first / 'student'}" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--target-speedup", "2", "--hidden-size", "128"], "give the student's shape or a budget, not both: drop "
                                                        "--hidden-size"),
    (["--target-speedup", "2", "--layers", "0,1"], "give the student's shape or a budget, not both: drop --layers"),
    (["--target-speedup", "1"], "--target-speedup must be > 1, got 1"),
    (["--target-speedup", "0.5"], "--target-speedup must be > 1, got 0.5"),
    (["--target-latency", "0"], "--target-latency must be > 0, got 0"),
    (["--target-latency", "-3"], "--target-latency must be > 0, got -3"),
    (["--target-speedup", "2", "--target-params", "1e6"], "give one budget, not 2"),
    (["--budget-seconds", "10"], "--budget-seconds bounds a shape search"),
    (["--target-speedup", "2", "--budget-precision", "fp8"], "--budget-precision 'fp8': use float32 or bfloat16"),
    (["--target-speedup", "2"], "a shape search ranks the shapes that meet the budget on calibration text"),
])
def test_bad_budgets_are_one_line_and_write_nothing(teacher_folder, tmp_path, capsys, extra, message):
    out = tmp_path / "student"
    code = main(["init-student", "--teacher", str(teacher_folder / "teacher"), "--out", str(out), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err and "Traceback" not in err
    assert not out.exists()


def test_a_budget_no_shape_meets_is_one_line_and_writes_nothing(teacher_folder, tmp_path, capsys, no_timing):
    teacher = transformers.AutoModelForCausalLM.from_pretrained(teacher_folder / "teacher").eval()
    stub_timings(teacher, Budget(speedup=50.0), tmp_path / "cache", speed_of=lambda c: min(3.0, c.flop_ratio))
    out = tmp_path / "student"
    code = main(["init-student", "--teacher", str(teacher_folder / "teacher"), "--out", str(out),
                 "--target-speedup", "50", "--calibration-data", str(teacher_folder / "text.txt"),
                 "--calibration-tokens", "512", "--max-length", "64", "--timing-cache", str(tmp_path / "cache"),
                 "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "no student shape" in err and "\n" not in err
    assert not out.exists()


def test_the_report_checks_the_budget_and_plots_the_search(teacher_folder, tmp_path, capsys, no_timing):
    student = searched_student(teacher_folder, tmp_path)
    capsys.readouterr()
    out = tmp_path / "report"
    assert main(["report", str(teacher_folder / "teacher"), str(student), "--seq-lens", "128", "--batch-size", "1",
                 "--repeats", "3", "--max-repeats", "6", "--names", "teacher,student", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    kept = report["models"][1]["budget"]
    ratio = next(r for r in report["models"][1]["ratios"]["speed"] if r["seq_len"] == 128)
    assert kept["measured"] == ratio["speedup"] and kept["budget"]["speedup"] == 2.0
    slack = max(0.05, ratio["notch"] / ratio["speedup"])
    assert kept["slack"] == pytest.approx(slack) and kept["met"] == (ratio["speedup"] >= 2.0 * (1 - slack))
    assert report["models"][0]["budget"] is None
    assert "## Budget" in (out / "report.md").read_text()
    assert (out / "search-student.png").read_bytes().startswith(b"\x89PNG")
    # a report that does not time the budget's conditions says so instead of judging
    out64 = tmp_path / "report64"
    assert main(["report", str(teacher_folder / "teacher"), str(student), "--seq-lens", "64", "--batch-size", "1",
                 "--repeats", "3", "--max-repeats", "3", "--names", "teacher,student", "--out", str(out64),
                 "--no-plots"]) == 0
    assert "add --seq-lens 128" in capsys.readouterr().err
    assert json.loads((out64 / "report.json").read_text())["models"][1]["budget"]["met"] is None


def test_search_steps_rank_the_finalists_after_a_short_distillation(calibration, tmp_path, no_timing):
    teacher = teacher_model()
    budget = Budget(speedup=2.0)
    stub_timings(teacher, budget, tmp_path)
    search, built = search_shape(teacher, budget, calibration, timing_cache=tmp_path, search_steps=3,
                                 progress=False)
    ranked = [c for c in search.candidates if c.divergence is not None]
    assert len(ranked) >= 2 and all(c.trained_divergence is not None for c in ranked)
    assert min(ranked, key=lambda c: c.trained_divergence) is search.chosen
    assert any(c.trained_divergence < c.divergence for c in ranked)  # the short distillation moved them
    assert "KL after 3 steps" in search.table()[0]
    # the student comes back as sliced: the short distillation only ranked it
    shape = search.chosen.shape
    fresh = init_student(teacher, layers=search.layers, hidden_size=shape.hidden, intermediate_size=shape.ffn,
                         num_heads=shape.heads, calibration_data=calibration)
    for a, b in zip(built.model.state_dict().values(), fresh.model.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(AlambicError, match="--search-steps must be 0 or more"):
        search_shape(teacher, budget, calibration, timing_cache=tmp_path, search_steps=-1, progress=False)

