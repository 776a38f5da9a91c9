"""argparse with alambic's errors: every command-line mistake is one line that says how to fix it.

- No prefix abbreviations (``--max-step`` is not silently ``--max-steps``): a flag is spelt in full or refused.
- An unknown flag is named with the closest flag *of the verb it was given to* ("did you mean --max-steps?").
- A missing required flag is named with an example value.
- ``--set KEY VALUE`` (a space where ``=`` belongs) is pointed at ``--set KEY=VALUE``.
- An invalid choice (a verb, ``--task``) gets the closest valid one.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys

EXAMPLE_VALUES = {
    "teacher": "smollm2-135m", "model": "minilm-l6", "data": "bbc-news:train", "train": "bbc-news:train",
    "out": "runs/NAME", "prompts": "prompts.jsonl", "text": "bbc-news:heldout", "models": "smollm2-135m",
}
"""What a required flag's example shows, by destination (a choice flag shows its first choice)."""
NUMBER = re.compile(r"-\d[\d.e+-]*")
"""A negative number is a value, not a flag."""


def closest(name: str, choices) -> str | None:
    found = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return found[0] if found else None


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one ``alambic VERB: error: ...`` line (exit 2) that names the fix."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {self.explain(message)}\n")

    def explain(self, message: str) -> str:
        """argparse's message, rewritten to name the fix."""
        help_hint = f"`{self.prog} --help` lists every flag"
        required = re.match(r"the following arguments are required: (.*)", message)
        if required:
            names = [name.strip() for name in required.group(1).split(",")]
            examples = " ".join(self._example(name) for name in names)
            verb = "is" if len(names) == 1 else "are"
            return f"{', '.join(names)} {verb} required, e.g. {self.prog} {examples} ({help_hint})"
        choice = re.match(r"argument (\S+): invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            flag, given, options = choice.groups()
            options = [o.strip().strip("'") for o in options.split(",")]
            near = closest(given, options)
            hint = f"did you mean {near}? " if near else ""
            what = "command" if flag == "COMMAND" else flag
            return f"unknown {what} {given!r}: {hint}choose from {', '.join(options)}"
        return f"{message} ({help_hint})"

    def _example(self, name: str) -> str:
        for action in self._actions:
            if name in action.option_strings or name in (action.metavar, action.dest):
                value = (str(next(iter(action.choices))) if action.choices else
                         (action.metavar or action.dest).upper() if action.metavar == "FILE" else
                         EXAMPLE_VALUES.get(action.dest, (action.metavar or action.dest).upper()))
                return f"{action.option_strings[0]} {value}" if action.option_strings else value
        return name

    def unknown_arguments(self, argv: list[str], extras: list[str] = ()) -> str | None:
        """One line for the first argument of ``argv`` (this verb's words) that it does not take, or None. Checked
        before parsing, so a mistyped flag is named even when a required one is missing too."""
        options = {option for action in self._actions for option in action.option_strings}
        for position, word in enumerate(argv):
            if word == "--":
                break
            if word == "--set" and "--set" in options and position + 2 < len(argv) \
                    and "=" not in argv[position + 1] and not argv[position + 2].startswith("-"):
                key, value = argv[position + 1], argv[position + 2]
                return f"--set takes KEY=VALUE as one word: --set {key}={value}"
            flag = word.split("=", 1)[0]
            if word.startswith("-") and not NUMBER.fullmatch(word) and flag not in options:
                near = closest(flag, options)
                hint = f"did you mean {near}? " if near else ""
                return f"unknown flag {flag}: {hint}`{self.prog} --help` lists every flag"
        if extras:
            return f"unexpected argument {extras[0]!r}: `{self.prog} --help` lists what it takes"
        return None


def parse_command_line(parser: Parser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv`` (default: sys.argv[1:]); a mistake exits 2 with one line from the verb it concerns."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # the verb is the first word that is not a flag: the top level's own flags take no value
    at = next((i for i, word in enumerate(argv) if not word.startswith("-")), len(argv))
    verb = verb_parser(parser, argv[at] if at < len(argv) else None)
    if verb is not None and "-h" not in argv and "--help" not in argv:
        problem = verb.unknown_arguments(argv[at + 1:])
        if problem:
            verb.exit(2, f"{verb.prog}: error: {problem}\n")
    args, extras = parser.parse_known_args(argv)
    if extras:
        verb = verb or parser
        verb.exit(2, f"{verb.prog}: error: {verb.unknown_arguments(extras, extras)}\n")
    return args


def verb_parser(parser: argparse.ArgumentParser, command: str | None) -> Parser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command]
    return None
