from pathlib import Path

import pytest
import yaml

from alambic.config import DistillConfig, config_help, load_config, loss_config_class, parse_override
from alambic.recipes import RECIPES
from alambic.errors import AlambicError

BASE = [{"teacher": "t", "out": "o", "data": {"train": ["x.txt"]}}]


def test_yaml_then_overrides_in_order(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"teacher": "smollm2-135m", "out": "runs/a", "data": {"train": ["a.txt"]},
                                    "loss": {"temperature": 3}, "training": {"betas": [0.9, 0.95]}}))
    cfg = load_config(path, [parse_override("loss.temperature=4"), parse_override("training.max_steps=7")])
    assert cfg.loss.temperature == 4.0 and isinstance(cfg.loss.temperature, float)
    assert cfg.training.max_steps == 7 and cfg.training.betas == (0.9, 0.95)
    assert cfg.data.train == ["a.txt"] and cfg.loss.alpha_kd == 5.0
    assert load_config(path, [parse_override("training.lr=5e-4")]).training.lr == 5e-4  # YAML 1.1 reads a string
    with pytest.raises(AlambicError, match="expects a number"):
        load_config(path, [parse_override("training.lr=fast")])


def test_words_stay_words_in_files_and_overrides(tmp_path):
    """YAML 1.1 reads no / off / yes as booleans; alambic's options take them as the words they are."""
    assert load_config(None, BASE + [parse_override("training.mixed_precision=no")]).training.mixed_precision == "no"
    path = tmp_path / "run.yaml"
    path.write_text("teacher: t\nout: o\ndata: {train: [x.txt]}\ntraining: {mixed_precision: no, compile: false}\n")
    cfg = load_config(path)
    assert cfg.training.mixed_precision == "no" and cfg.training.compile is False
    with pytest.raises(AlambicError, match="training.compile expects true or false, got 'yes'"):
        load_config(path, [parse_override("training.compile=yes")])


def test_override_parsing():
    assert parse_override("data.train=[a, b]") == {"data": {"train": ["a", "b"]}}
    assert parse_override("student.hidden_size=") == {"student": {"hidden_size": None}}
    with pytest.raises(AlambicError, match="KEY=VALUE"):
        parse_override("loss.temperature")


@pytest.mark.parametrize(
    "override, message",
    [
        ("loss.alpah_kd=1", "did you mean 'loss.alpha_kd'"),
        ("loss.temperature=0", "temperature must be > 0"),
        ("loss.kd_rows=all", "one of auto, tokens, masked"),
        ("training.max_steps=1.5", "expects an integer"),
        ("training.batch_size=0", "training.batch_size must be >= 1, got 0"),
        ("training.compile=maybe", "true or false"),
        ("recipe=tinybrt", "unknown recipe"),
        ("loss=3", "is a section"),
        ("data.split_documents=para", "file, line or blank-line"),
    ],
)
def test_invalid_options_are_named(override, message):
    with pytest.raises(AlambicError, match=message):
        load_config(None, BASE + [parse_override(override)])


def test_all_zero_weights_and_missing_essentials():
    zero = [parse_override(f"loss.{k}=0") for k in ("alpha_kd", "alpha_lm", "alpha_cos")]
    with pytest.raises(AlambicError, match="all loss weights are 0"):
        load_config(None, BASE + zero)
    with pytest.raises(AlambicError, match="no teacher"):
        load_config(None, [{"out": "o", "data": {"train": ["x"]}}])
    with pytest.raises(AlambicError, match="no training data"):
        load_config(None, [{"teacher": "t", "out": "o"}])


def test_config_file_errors(tmp_path):
    with pytest.raises(AlambicError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: [unclosed\n")
    with pytest.raises(AlambicError, match="not valid YAML"):
        load_config(bad)


def test_every_option_documented():
    rows = config_help(DistillConfig)
    for recipe in RECIPES:
        rows += config_help(loss_config_class(recipe), "loss.")
    names = {name for name, _, _ in rows}
    assert {"loss.alpha_kd", "training.grad_accum", "data.max_length", "student.layers"} <= names
    undocumented = [name for name, _, doc in rows if not doc and name not in {"training.lr", "training.betas",
                    "training.eps", "training.weight_decay", "training.seed"}]
    assert undocumented == []


def test_loss_section_follows_the_recipe():
    cfg = load_config(None, BASE + [{"recipe": "tinybert"}, parse_override("loss.layer_map=0:0,1:2")])
    assert cfg.loss.layer_map == "0:0,1:2" and cfg.loss.alpha_attention == 1.0
    with pytest.raises(AlambicError, match="unknown option 'loss.alpha_kd'"):
        load_config(None, BASE + [{"recipe": "minilm"}, parse_override("loss.alpha_kd=1")])
    with pytest.raises(AlambicError, match="attention_target must be scores or probs"):
        load_config(None, BASE + [{"recipe": "tinybert"}, parse_override("loss.attention_target=logits")])


CONFIGS = Path(__file__).parent.parent / "configs"
SHIPPED = sorted(CONFIGS.glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    overrides = [parse_override(o) for o in ("teacher=t", "out=o", "data.train=[x.txt]")]
    cfg = load_config(path, overrides)  # the command line supplies what a shipped config leaves out
    assert cfg.recipe in RECIPES


@pytest.mark.parametrize("name", ["multi-gpu.yaml", "multi-node.yaml"])
def test_shipped_accelerate_configs_load_as_ddp(name):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DistributedType

    from alambic.engine.loop import check_engine

    config = ClusterConfig.from_yaml_file(CONFIGS / "accelerate" / name)
    assert config.distributed_type == DistributedType.MULTI_GPU and config.mixed_precision == "bf16"
    assert config.num_processes == 8 * config.num_machines
    check_engine(config.distributed_type)


def _option_tables():
    from alambic.config import DataConfig, StudentConfig, TrainingConfig
    from alambic.recipes.task import TaskLossConfig
    from alambic.tasks.workflow import DataOptions

    tables = [("distill", "student.", StudentConfig), ("distill", "data.", DataConfig),
              ("distill", "training.", TrainingConfig)]
    tables += [(recipe, "loss.", loss_config_class(recipe)) for recipe in RECIPES]
    return tables + [("task-loss", "", TaskLossConfig), ("task-data", "", DataOptions)]


def _outside(allowed):
    """Values just outside a range: below its low end and above its high end."""
    values = []
    if allowed.low is not None:
        values.append(allowed.low if allowed.low_open else allowed.low - 1)
    if allowed.high is not None:
        values.append(allowed.high if allowed.high_open else allowed.high + 1)
    return values


CASES = [(where, prefix, cls, name, bad) for where, prefix, cls in _option_tables() for name, allowed in cls.RANGES.items()
         for bad in _outside(allowed)]


def test_every_numeric_option_has_a_range():
    from alambic.ranges import numeric_fields

    for _, prefix, cls, in _option_tables():
        assert set(numeric_fields(cls)) == set(cls.RANGES), cls.__name__


@pytest.mark.parametrize("where, prefix, cls, name, bad", CASES,
                         ids=[f"{c[0]}:{c[1]}{c[3]}={c[4]}" for c in CASES])
def test_each_numeric_option_outside_its_range_is_one_line_naming_option_and_range(where, prefix, cls, name, bad):
    from alambic.tasks.workflow import prepare_task_data

    allowed = cls.RANGES[name]
    value = (0.9, bad) if name == "betas" else bad
    expected = f"{prefix}{name} must be {allowed.describe()}, got "  # then the value as the option's type holds it
    with pytest.raises(AlambicError) as error:
        if where == "task-loss":
            cls(**{name: value}).validate()
        elif where == "task-data":
            prepare_task_data("classification", "unused.csv", None, None, cls(**{name: value}), seed=0)
        else:
            recipe = [] if where == "distill" else [{"recipe": where}]
            load_config(None, BASE + recipe + [parse_override(f"{prefix}{name}={list(value) if name == 'betas' else value}")])
    assert str(error.value).startswith(expected) and "\n" not in str(error.value)


def _verbs():
    import argparse

    from alambic.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


MINIMAL_ARGS = {  # what argparse requires of each verb; the flag check runs before any of it is read
    "init-student": ["--teacher", "t", "--out", "o"], "distill": [], "eval-lm": ["m", "--data", "d"],
    "report": ["m", "--out", "o"], "plot-run": ["r"], "plot-temperature": ["--model", "m", "--text", "x", "--out", "o"],
    "finetune": ["--task", "classification", "--train", "t", "--out", "o", "--model", "m"],
    "distill-task": ["--task", "classification", "--train", "t", "--out", "o", "--teacher", "t"],
    "eval-task": ["m", "--task", "classification", "--data", "d"],
    "augment": ["--task", "classification", "--data", "d", "--model", "m", "--out", "o"],
    "export": ["m", "--format", "onnx", "--out", "o"],
    "cache-teacher": ["--teacher", "t", "--data", "d", "--out", "o"],
    "generate": ["--teacher", "t", "--prompts", "p", "--out", "o"],
    "eval-chat": ["m", "--data", "d"],
}
FLAG_CASES = [(verb, action.option_strings[0], action.dest) for verb, parser in _verbs().items()
              for action in parser._actions if action.type in (int, float)]


def test_every_numeric_flag_of_every_verb_has_a_range():
    from alambic.cli import FLAG_RANGES

    assert set(MINIMAL_ARGS) == set(_verbs())
    assert {dest for _, _, dest in FLAG_CASES} <= set(FLAG_RANGES)


@pytest.mark.parametrize("verb, flag, dest", FLAG_CASES, ids=[f"{v} {f}" for v, f, _ in FLAG_CASES])
def test_each_numeric_flag_outside_its_range_is_one_line(verb, flag, dest, tmp_path, capsys):
    from alambic.cli import FLAG_RANGES, main

    allowed = FLAG_RANGES[dest]
    for bad in _outside(allowed):
        bad = int(bad) if float(bad).is_integer() else bad
        assert main([verb, *MINIMAL_ARGS[verb], flag, str(bad)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"alambic: error: {flag} must be {allowed.describe()}, got ") and "\n" not in err
