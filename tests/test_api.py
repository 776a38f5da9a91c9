"""The top-level Python API: the README's notebook example runs as written (real SmolLM2, two steps), and the
verbs are the same functions the CLI calls."""

import re
from pathlib import Path

import alambic

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_api_names_the_workflow_functions():
    from alambic.workflows.distill import distill
    from alambic.workflows.distill_task import distill_task
    from alambic.workflows.finetune import finetune

    assert (alambic.distill, alambic.finetune, alambic.distill_task) == (distill, finetune, distill_task)
    assert all(callable(getattr(alambic, name)) for name in alambic.__all__ if name != "__version__")


def test_the_readme_notebook_example_runs(tmp_path, monkeypatch, capsys):
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### From Python"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALAMBIC_CACHE", str(tmp_path / "cache"))  # its own GGUF conversion: other tests see theirs
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    result = namespace["result"]
    assert (tmp_path / "runs" / "from-python" / "student" / "config.json").is_file()
    assert result.student_parameters < result.teacher_parameters
    assert result.metrics["eval/perplexity"] > 1
    assert "of the teacher's parameters, held-out perplexity" in capsys.readouterr().out
    assert type(namespace["student"]).__module__.startswith("transformers.")
