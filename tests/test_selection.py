"""Layer selection by measured importance (students/selection.py) on tiny real models and real text."""

import json

import pytest
import transformers
from tiny import bpe_tokenizer, sample_texts, tiny_bert, tiny_gpt2, tiny_llama, tiny_qwen2, wordpiece_tokenizer

from alambic import modeling
from alambic.cli import main
from alambic.config import load_config, parse_override
from alambic.errors import AlambicError
from alambic.evaluation.lm import evaluate_lm
from alambic.students import init_student, save_student, select_layers
from alambic.students.selection import calibration_batches


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibration")
    for i, article in enumerate(sample_texts(8)):
        (root / f"{i}.txt").write_text(article)
    (root / "short.txt").write_text("Only a few words here.")
    return root


def _make_identity(model, index):
    """Zero the layer's residual-branch outputs: the residual stream passes through unchanged (pre-LN models) or
    through one more LayerNorm of already normalised states (post-LN BERT, identity up to eps)."""
    layer = modeling.transformer_layers(model)[index]
    for name, module in layer.named_modules():
        if name in ("self_attn.o_proj", "mlp.down_proj", "attn.c_proj", "mlp.c_proj", "attention.output.dense",
                    "output.dense"):
            module.weight.data.zero_()
            if getattr(module, "bias", None) is not None:
                module.bias.data.zero_()


def _teacher(family, harmless=(1, 4)):
    build = {"llama": tiny_llama, "gpt2": tiny_gpt2, "qwen2": tiny_qwen2, "bert": tiny_bert,
             "bare-bert": lambda: transformers.BertModel(tiny_bert().config).eval()}[family]
    layers = {"gpt2": {"n_layer": 6}}.get(family, {"num_hidden_layers": 6})
    model = build(**layers) if family != "bare-bert" else transformers.BertModel(tiny_bert(**layers).config).eval()
    for i in harmless:
        _make_identity(model, i)
    tokenizer = wordpiece_tokenizer() if model.config.vocab_size == 30522 else bpe_tokenizer()
    return model, tokenizer


def _batches(model, tokenizer, text, seed=0, tokens=512):
    return calibration_batches(str(text), tokenizer, modeling.model_kind(model), max_tokens=tokens, max_length=32,
                               seed=seed)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2", "bert", "bare-bert"])
def test_greedy_drops_the_layers_made_harmless(family, text):
    teacher, tokenizer = _teacher(family)
    batches = _batches(teacher, tokenizer, text)
    # hidden distance to the teacher's own output: removing a harmless layer costs (about) nothing, any other costs
    criterion = "auto" if family == "bare-bert" else "hidden"
    chosen = select_layers(teacher, depth=4, calibration=batches, criterion=criterion)
    assert chosen.layers == [0, 2, 3, 5]
    assert [c.removed for c in chosen.chosen] in ([1, 4], [4, 1]) and chosen.loss < 1e-4
    assert chosen.criterion.startswith("hidden-state distance") and not chosen.fell_back
    assert not any("cache switched off" in note for note in chosen.notes)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_candidate_losses_equal_the_built_students(family, text):
    """The swapped (and cached) teacher computes exactly what the student made of those layers computes."""
    teacher, tokenizer = _teacher(family, harmless=())
    batches = _batches(teacher, tokenizer, text)
    chosen = select_layers(teacher, depth=4, calibration=batches)
    candidates = chosen.steps[0] + [chosen.chosen[-1]]
    for candidate in candidates:
        student = init_student(teacher, layers=list(candidate.layers)).model
        assert evaluate_lm(student, batches)["loss"] == pytest.approx(candidate.loss, rel=1e-5)
    assert modeling.num_layers(teacher.config) == 6 and len(modeling.transformer_layers(teacher)) == 6


@pytest.mark.parametrize("family", ["llama", "gpt2", "bare-bert"])
def test_influence_ranks_harmless_layers_last(family, text):
    teacher, tokenizer = _teacher(family)
    chosen = select_layers(teacher, "influence", depth=4, calibration=_batches(teacher, tokenizer, text))
    assert chosen.layers == [0, 2, 3, 5]
    scores = chosen.influence
    assert max(scores[1], scores[4]) < min(scores[i] for i in (0, 2, 3, 5))
    assert chosen.candidates_evaluated == 1


def test_budget_of_zero_falls_back_to_influence_and_says_so(text):
    teacher, tokenizer = _teacher("llama", harmless=(2,))
    lines = []
    chosen = select_layers(teacher, depth=3, calibration=_batches(teacher, tokenizer, text), budget=0, log=lines.append)
    influence = select_layers(teacher, "influence", depth=3, calibration=_batches(teacher, tokenizer, text))
    assert chosen.fell_back and chosen.layers == influence.layers and 2 not in chosen.layers
    assert chosen.candidates_evaluated == 0
    assert any("budget of 0 s ran out after 0 of 3 greedy removals" in line for line in lines)
    assert "influence ranking" in chosen.notes[0] and "influence ranking" in chosen.card("t")


def test_budget_stops_the_search_and_the_ranking_finishes_it(text):
    teacher, tokenizer = _teacher("llama", harmless=())
    calibration = _batches(teacher, tokenizer, text)
    full = select_layers(teacher, depth=3, calibration=calibration)
    assert not full.fell_back and full.candidates_evaluated == 6 + 5 + 4
    cut = select_layers(teacher, depth=3, calibration=calibration, budget=0.0)  # spent before the first removal
    assert cut.fell_back and cut.candidates_evaluated < full.candidates_evaluated
    assert len(cut.layers) == 3 and "budget of 0 s ran out" in cut.summary()


def test_selection_is_deterministic_for_a_seed(text):
    teacher, tokenizer = _teacher("bert", harmless=())
    runs = [select_layers(teacher, depth=3, calibration=str(text), tokenizer=tokenizer, calibration_tokens=512,
                          max_length=32, seed=3) for _ in range(2)]
    assert runs[0].layers == runs[1].layers
    assert [[c.loss for c in step] for step in runs[0].steps] == [[c.loss for c in step] for step in runs[1].steps]


def test_init_student_auto_records_the_choice_in_a_model_card(text, tmp_path):
    teacher, tokenizer = _teacher("llama")
    built = init_student(teacher, layers="auto:greedy", depth=4, calibration_data=str(text), tokenizer=tokenizer,
                         calibration_tokens=512)
    assert built.layers == built.selection.layers and modeling.num_layers(built.model.config) == 4
    out = save_student(built.model, tokenizer, tmp_path / "s", card=built.model_card("tiny-llama"))
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n---\n")
    assert "tiny-llama" in card and "greedy" in card and f"kept layers: {', '.join(map(str, built.layers))}" in card
    assert "calibration loss" in card
    assert transformers.AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4
    assert init_student(teacher, layers="every-other").model_card() is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(depth=0), "target depth 0 is out of range: the teacher has 6 layers, give a depth from 1 to 6"),
        (dict(depth=7), "target depth 7 is out of range"),
        (dict(calibration=None), "needs calibration data: give --calibration-data PATH"),
        (dict(budget=-1), "budget must be >= 0"),
        (dict(method="greed"), "unknown layer selection method 'greed' \\(did you mean 'greedy'\\?\\)"),
    ],
)
def test_bad_selection_inputs(kwargs, message, text):
    teacher, tokenizer = _teacher("llama", harmless=())
    args = dict(depth=3, calibration=str(text), tokenizer=tokenizer, calibration_tokens=512) | kwargs
    with pytest.raises(AlambicError, match=message):
        select_layers(teacher, args.pop("method", "greedy"), **args)


def test_too_little_calibration_text_says_how_much_is_needed(text):
    teacher, tokenizer = _teacher("bert", harmless=())
    with pytest.raises(AlambicError, match="too short: measuring the teacher needs at least 256 tokens"):
        calibration_batches(str(text / "short.txt"), tokenizer, "masked", max_length=32)
    few = text.parent / "few.txt"
    few.write_text(" ".join(sample_texts(1)[0].split()[:60]))  # one chunk of ~70 tokens
    with pytest.raises(AlambicError, match="gives only \\d+ tokens: measuring the teacher needs at least 256; give more"):
        calibration_batches(str(few), tokenizer, "masked", max_length=128)
    llama, bpe = _teacher("llama", harmless=())
    with pytest.raises(AlambicError, match="too short: measuring the teacher needs at least 256 tokens"):
        calibration_batches(str(text / "short.txt"), bpe, "causal", max_length=32)


def test_auto_spec_is_refused_where_layers_must_be_fixed():
    from alambic.students import parse_layer_spec

    with pytest.raises(AlambicError, match="chosen by measuring on calibration data"):
        parse_layer_spec("auto", 12)
    with pytest.raises(AlambicError, match="apply to layers='auto"):
        init_student(tiny_llama(), layers="every-other", depth=2)


# --- command line and configuration --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    teacher, tokenizer = _teacher("llama")
    teacher.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_init_student_auto(llama_dir, text, tmp_path, capsys):
    code, out, _ = _run(["init-student", "--teacher", llama_dir, "--out", tmp_path / "s", "--layers", "auto",
                         "--calibration-data", text, "--depth", 4, "--calibration-tokens", 512], capsys)
    assert code == 0, out
    kept = transformers.AutoConfig.from_pretrained(tmp_path / "s").num_hidden_layers
    chosen = next(line for line in out.splitlines() if line.startswith("chosen layers: ")).split(" (")[0][15:]
    assert kept == 4 and "without layer   1: loss" in out and f"layers kept: {chosen}" in out
    card = (tmp_path / "s" / "README.md").read_text()
    assert "library_name: transformers" in card and str(text) in card and f"kept layers: {chosen}" in card
    # a plain Hugging Face folder: no toolkit weights or code, only the JSON record of the layers it was copied from
    extra = [p.name for p in (tmp_path / "s").iterdir() if "alambic" in p.name or p.suffix in (".pt", ".bin", ".py")]
    assert extra == ["alambic-layers.json"]
    assert json.loads((tmp_path / "s" / "alambic-layers.json").read_text())["layers"] == [int(i) for i in chosen.split(", ")]


def test_cli_budget_fallback_is_printed(llama_dir, text, tmp_path, capsys):
    code, out, _ = _run(["init-student", "--teacher", llama_dir, "--out", tmp_path / "s", "--layers", "auto:greedy",
                         "--calibration-data", text, "--budget", 0, "--calibration-tokens", 512], capsys)
    assert code == 0 and "budget of 0 s ran out" in out and "influence ranking" in out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--layers", "auto"], "--layers auto needs calibration text: add --calibration-data PATH"),
        (["--layers", "auto", "--calibration-data", "CAL", "--depth", 0], "--depth must be >= 1, got 0"),
        (["--layers", "auto", "--calibration-data", "CAL", "--depth", 9], "the teacher has 6 layers"),
        (["--layers", "auto:best", "--calibration-data", "CAL"], "unknown layer selection method 'best'"),
        (["--layers", "auto", "--calibration-data", "SHORT"], "measuring the teacher needs at least 256 tokens"),
        (["--layers", "auto", "--calibration-data", "nope.txt"], "nope.txt"),
        (["--depth", 3], "--depth only applies to --layers auto"),
    ],
)
def test_cli_bad_input_is_one_line(extra, message, llama_dir, text, tmp_path, capsys):
    extra = [text if a == "CAL" else text / "short.txt" if a == "SHORT" else a for a in extra]
    code, out, err = _run(["init-student", "--teacher", llama_dir, "--out", tmp_path / "s", *extra], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "s").exists()


BASE = {"teacher": "t", "out": "o", "data": {"train": ["x.txt"]}}


@pytest.mark.parametrize(
    "override, message",
    [
        ("student.layers=auto:fast", "unknown selection method 'fast'"),
        ("student.depth=3", "student.depth only applies to student.layers=auto"),
        ("student.calibration_data=a.txt", "student.calibration_data only applies"),
        ("student.depth=0", "student.depth"),
    ],
)
def test_config_validation(override, message):
    with pytest.raises(AlambicError, match=message):  # (layers=default is checked once the teacher's kind is known)
        load_config(None, [BASE, parse_override("student.layers=every-other"), parse_override(override)])
    cfg = load_config(None, [BASE, parse_override("student.layers=auto:influence"),
                             parse_override("student.calibration_data=bbc-news:train"), parse_override("student.depth=4")])
    assert cfg.student.calibration_data == ["bbc-news:train"] and cfg.student.depth == 4


def test_distill_with_auto_layers(llama_dir, text, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = _run(["distill", "--teacher", llama_dir, "--data", text, "--out", out, "--max-steps", 2,
                              "--layers", "auto:influence", "--set", f"student.calibration_data={text}",
                              "--set", "student.depth=4", "--set", "student.calibration_tokens=512",
                              "--set", "data.max_length=32", "--no-progress"], capsys)
    assert code == 0, err
    assert "layers kept: 0, 2, 3, 5" in stdout
    assert "kept layers: 0, 2, 3, 5" in (out / "student" / "README.md").read_text()
    code, _, err = _run(["distill", "--teacher", llama_dir, "--data", text, "--out", tmp_path / "r2", "--layers", "auto",
                         "--set", f"student.calibration_data={text}", "--set", "student.depth=7"], capsys)
    assert code == 2 and "target depth 7 is out of range" in err


def test_measured_students_calibrate_on_the_training_data_by_default():
    from alambic.config import load_config, parse_override
    from alambic.workflows.distill import calibration_specs

    cfg = load_config(None, [BASE, parse_override("student.layers=auto:influence")])
    assert calibration_specs(cfg) == ["x.txt"]
    narrow = load_config(None, [BASE, parse_override("student.hidden_size=16"),
                                parse_override("student.calibration_data=c.txt")])
    assert calibration_specs(narrow) == ["c.txt"]


def test_default_layers_measure_decoders_when_text_is_at_hand():
    from alambic.students.selection import default_layers

    assert default_layers("causal", calibration_at_hand=True) == "auto:influence"
    assert default_layers("causal", calibration_at_hand=False) == "every-other"
    assert default_layers("masked", calibration_at_hand=True) == "every-other"
