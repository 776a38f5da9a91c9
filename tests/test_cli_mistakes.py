"""Every command-line mistake is one line that names the fix, on every verb (issue 23)."""

import argparse

import pytest

from alambic.cli import build_parser, main
from alambic.cli.parser import verb_parser

PARSER = build_parser()
VERBS = sorted(next(a for a in PARSER._actions if isinstance(a, argparse._SubParsersAction)).choices)


def long_flags(verb: str) -> list[str]:
    parser = verb_parser(PARSER, verb)
    return [option for action in parser._actions for option in action.option_strings
            if option.startswith("--") and option != "--help"]


def required(verb: str) -> list[str]:
    parser = verb_parser(PARSER, verb)
    return [action.option_strings[0] if action.option_strings else action.metavar or action.dest
            for action in parser._actions if action.required or (not action.option_strings and action.nargs == "+")]


def error_line(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err  # one line, no usage block, no traceback
    return lines[0]


def swap_letters(flag: str) -> str:
    """--max-steps -> --max-stpes: two neighbouring letters of the last word swapped."""
    i = len(flag) - 3
    return flag[:i] + flag[i + 1] + flag[i] + flag[i + 2:]


@pytest.mark.parametrize("verb", VERBS)
def test_a_mistyped_flag_is_named_with_the_verbs_closest_flag(verb, capsys):
    for flag in long_flags(verb):
        typo = swap_letters(flag)
        if typo in long_flags(verb):
            continue
        line = error_line(capsys, [verb, typo, "3"])
        assert line.startswith(f"alambic {verb}: error: unknown flag {typo}: did you mean --"), line
        assert f"`alambic {verb} --help` lists every flag" in line


@pytest.mark.parametrize("verb", VERBS)
def test_prefix_abbreviations_are_refused_not_guessed(verb, capsys):
    flags = long_flags(verb)
    for flag in flags:
        prefix = flag[:-1]
        if len(prefix) < 4 or prefix in flags:
            continue
        line = error_line(capsys, [verb, prefix, "3"])
        assert f"unknown flag {prefix}: did you mean" in line, line


@pytest.mark.parametrize("verb", [v for v in VERBS if required(v)])
def test_missing_required_flags_are_named_with_an_example(verb, capsys):
    line = error_line(capsys, [verb])
    names = required(verb)
    assert line.startswith(f"alambic {verb}: error: {', '.join(names)} "), line
    example = line.split(", e.g. ", 1)[1]
    assert example.startswith(f"alambic {verb} ")
    for name in names:
        assert name in example or not name.startswith("--")  # a positional shows an example value in its place


def test_the_examples_of_the_issue(capsys):
    assert error_line(capsys, ["distill", "--max-stpes", "3"]) == (
        "alambic distill: error: unknown flag --max-stpes: did you mean --max-steps? "
        "`alambic distill --help` lists every flag")
    assert "did you mean --max-steps?" in error_line(capsys, ["distill", "--max-step", "3"])
    assert error_line(capsys, ["finetune", "--model", "m", "--train", "t", "--out", "o"]) == (
        "alambic finetune: error: --task is required, e.g. alambic finetune --task classification "
        "(`alambic finetune --help` lists every flag)")
    assert error_line(capsys, ["distill", "--set", "loss.temperature", "4"]) == (
        "alambic distill: error: --set takes KEY=VALUE as one word: --set loss.temperature=4")
    assert error_line(capsys, ["distil"]).startswith("alambic: error: unknown command 'distil': did you mean distill?")
    assert "did you mean classification?" in error_line(capsys, ["finetune", "--task", "clasification"])
    assert error_line(capsys, []).startswith("alambic: error: COMMAND is required, e.g. alambic init-student")
    assert error_line(capsys, ["--debug"]).startswith("alambic: error: COMMAND is required")


@pytest.mark.parametrize("key, suggestion", [
    ("max_steps", "'training.max_steps'"),
    ("loss.temprature", "'loss.temperature'"),
    ("training.temperature", "'loss.temperature' or 'on_policy.temperature'"),
    ("data.max_lenght", "'data.max_length'"),
    ("lmbda", "'on_policy.lmbda'"),
])
def test_set_suggests_options_from_every_section(key, suggestion, capsys):
    assert main(["distill", "--teacher", "t", "--set", f"{key}=3", "--print-config"]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"alambic: error: unknown option {key!r} (did you mean {suggestion}?)"), line


def test_on_off_environment_switches_parse_every_spelling_and_refuse_the_rest(monkeypatch):
    from alambic.engine.precision import cpu_bf16_instructions
    from alambic.environment import env_switch
    from alambic.errors import AlambicError

    for word, value in [("1", True), ("TRUE", True), ("on", True), ("Yes", True), ("0", False), ("False", False),
                        ("off", False), ("NO", False), ("", None)]:
        monkeypatch.setenv("ALAMBIC_CPU_BF16", word)
        assert env_switch("ALAMBIC_CPU_BF16") is value
        assert (cpu_bf16_instructions() is not None) == bool(value) or value is None
    monkeypatch.setenv("ALAMBIC_CPU_BF16", "maybe")
    with pytest.raises(AlambicError, match="ALAMBIC_CPU_BF16='maybe' is not an on/off value"):
        env_switch("ALAMBIC_CPU_BF16")


def test_a_bad_debug_switch_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv("ALAMBIC_DEBUG", "verbose")
    assert main(["distill", "--teacher", "t", "--print-config"]) == 2
    assert capsys.readouterr().err.strip() == ("alambic: error: ALAMBIC_DEBUG='verbose' is not an on/off value: set it "
                                               "to one of 1, true, yes, on, 0, false, no, off, or unset it")
