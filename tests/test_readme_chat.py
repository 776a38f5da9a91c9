"""The README's chat-distillation block runs as written on the real packaged SmolLM2 (docs/chat.md holds the same
block): every command, in order, with only its step, prompt and example counts made small."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from alambic.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"--max-steps": "1", "--max-prompts": "2", "--max-examples": "4"}


def _block(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    start = text.index("```bash", text.index("# the BBC instruct task of benchmarks/chat_distillation.py") - 20)
    return text[start + len("```bash\n"):text.index("```", start + 7)]


def _commands(block: str) -> list[list[str]]:
    lines = [line.split("#", 1)[0].rstrip() for line in block.replace("\\\n", " ").splitlines()]
    return [shlex.split(line) for line in lines if line.strip()]


def test_readme_and_docs_show_the_same_chat_block():
    assert _block(ROOT / "README.md") == _block(ROOT / "docs" / "chat.md")


@pytest.mark.real_model
@pytest.mark.slow
def test_the_readme_chat_block_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALAMBIC_CACHE", str(tmp_path / "cache"))  # its own GGUF conversion: other tests see theirs
    commands = _commands(_block(ROOT / "README.md"))
    assert [c[1] for c in commands] == ["benchmarks/chat_distillation.py", "finetune", "generate", "distill",
                                        "eval-chat"]
    for command in commands:
        command = [SMALL.get(before, word) for before, word in zip([""] + command, command)]
        if command[0] == "python":
            subprocess.run([sys.executable, str(ROOT / command[1]), *command[2:]], check=True, timeout=300)
            continue
        assert command[0] == "alambic"
        assert main(command[1:]) == 0, " ".join(command)
    out = capsys.readouterr().out
    assert "chat data: 3439 conversations, loss on assistant tokens only" in out
    for folder in ("teacher/best", "student/student"):
        assert (tmp_path / "runs" / "chat" / folder / "config.json").is_file()
    assert len((tmp_path / "runs" / "chat" / "teacher-answers" / "data.jsonl").read_text().splitlines()) == 2
    assert re.search(r"^student\s", out, re.M)
