"""Every `alambic` command of README.md and docs/*.md runs as written, in order, with tiny budgets.

A newcomer copies these blocks; once one drifts from the code it fails for every reader. So each block is read from
the Markdown itself, split into commands, and run through ``alambic``'s entry point in one working folder, in the
order a reader meets them (README first: its runs feed the docs). Only budgets are made small (steps, prompts,
examples, timing repeats), and the placeholder paths a reader substitutes (``path/to/bert-base``, ``train.jsonl``,
``corpus/`` ...) are provided first: real BBC text and labels, and a randomly initialised 12-layer BERT for
``path/to/bert-base`` (no BERT-base ships offline). The packaged models are the real ones.

Lines that are not alambic commands are not run, and :data:`NOT_RUN` says why for each kind.
"""

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from alambic.cli import main
from tiny import BBC_DIR, MINILM_DIR, sample_texts

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ["README.md", "docs/export.md", "docs/offline.md", "docs/report.md", "docs/tasks.md", "docs/search.md"]
"""In reading order. docs/chat.md's block is the README's (tests/test_readme_chat.py checks they are the same)."""
NOT_RUN = {
    "make": "make targets (setup, the demos, the tests) are what CI itself runs",
    "source": "shell set-up",
    "accelerate": "several processes: tests/test_distributed.py runs DDP and FSDP under torchrun",
    "torchrun": "several processes: tests/test_distributed.py runs DDP and FSDP under torchrun",
}
SMALL = {"--max-steps": "2", "--budget": "3", "--max-prompts": "2", "--max-examples": "4", "--max-new-tokens": "4",
         "--repeats": "1", "--warmup": "0", "--max-tokens": "1024", "--seq-lens": "32", "--batch-size": "4"}
"""Budgets made small; every other flag is run as written."""
SMALL_SETTINGS = {"training.grad_accum": "1"}
"""``--set`` budgets made small."""
BUDGETS = {
    "distill": ["--max-steps", "2", "--batch-size", "4", "--set", "training.grad_accum=1"],
    "finetune": ["--max-steps", "2"], "distill-task": ["--max-steps", "2"],
    "report": ["--repeats", "1", "--warmup", "0", "--max-tokens", "1024", "--seq-lens", "32",
               "--chat-max-examples", "4", "--chat-max-new-tokens", "4"],
    "eval-lm": ["--max-tokens", "1024"], "cache-teacher": [], "eval-chat": ["--max-examples", "4"],
}
"""Budget flags added where a command leaves them to defaults or a config file (DistilBERT's config trains 100,000
steps of 250 micro-batches)."""
MAX_LENGTH = {"distill": "64", "cache-teacher": "64"}
"""A shorter max length for raw-text runs that give none (a cache and the runs on it agree)."""
INPUTS = {
    "docs/export.md": {"runs/demo": "runs/demo", "runs/demo-lm/student": "runs/smol/student"},
    "docs/offline.md": {"students/smol-auto": "students/smol-auto"},
    "docs/report.md": {"runs/smol": "runs/smol", "runs/chat": "runs/chat",
                       "runs/distill-vs-no-teacher/variant-0/student": "runs/smol/student",
                       "runs/distill-vs-no-teacher/variant-0/student-init": "students/smol-auto",
                       "runs/distill-vs-no-teacher/variant-0/metrics.jsonl": "runs/smol/metrics.jsonl",
                       "runs/distill-vs-no-teacher/variant-0/config.yaml": "runs/smol/config.yaml"},
    "docs/tasks.md": {},
    "docs/search.md": {"runs/demo": "runs/demo"},
}
"""Each docs page runs in a folder of its own (its commands write the same --out names as the README's), with the
README's outputs it reads linked in. Outputs of skipped steps stand in by the README's equivalents: `make demo-lm`'s
student by the README's SmolLM2 student, benchmarks/distill_vs_no_teacher.py's run by the README's SmolLM2 run."""


def commands(document: str) -> list[list[str]]:
    """The shell lines of ``document``'s bash blocks, continuation lines joined, comments dropped."""
    text = (ROOT / document).read_text(encoding="utf-8")
    lines = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#") and "..." not in line:
                lines.append(shlex.split(line))
    return lines


def small(command: list[str], variables: dict) -> list[str]:
    words = []
    for before, word in zip([""] + command, command):
        if word.startswith("[") and word.endswith("]"):  # an optional flag shown in brackets: not given
            continue
        for name, value in variables.items():
            word = word.replace(f"${name}", value)
        if before == "--set" and word.split("=", 1)[0] in SMALL_SETTINGS:
            word = f"{word.split('=', 1)[0]}={SMALL_SETTINGS[word.split('=', 1)[0]]}"
        words.append(SMALL.get(before, word))
    verb = words[1] if words[0] == "alambic" else None
    for flag, value in zip(BUDGETS.get(verb, [])[::2], BUDGETS.get(verb, [])[1::2]):
        if flag == "--set" or flag not in words:
            words += [flag, value]
    if verb in MAX_LENGTH and "--max-length" not in words and "--teacher-logits" not in words \
            and "--resume" not in words:
        words += ["--max-length", MAX_LENGTH[verb]]
    return words


def write_placeholders(world: Path, shared: Path) -> None:
    """The files and folders the docs name as the reader's own, and the checkout's configs/."""
    shutil.copytree(ROOT / "configs", world / "configs")
    texts = sample_texts(40)
    (world / "corpus").mkdir()
    (world / "wiki").mkdir()
    for i, text in enumerate(texts[:8]):
        (world / "corpus" / f"{i}.txt").write_text(text)
        (world / "wiki" / f"{i}.txt").write_text(text)
    for name in ("heldout.txt", "my-text.txt", "in-domain.txt", "raw-texts.txt"):
        (world / name).write_text("\n\n".join(texts[8:12]))
    topics = sorted(p for p in BBC_DIR.iterdir() if p.is_dir())
    by_topic = [sorted(topic.glob("*.txt"))[:10] for topic in topics]
    records = [{"text": path.read_text(encoding="utf-8", errors="replace")[:600], "label": path.parent.name}
               for round_ in zip(*by_topic) for path in round_]  # every topic in every slice
    for name, part in (("train.jsonl", records[:30]), ("few-labels.jsonl", records[:10]),
                       ("labelled.jsonl", records[:20]), ("validation.jsonl", records[30:40]),
                       ("test.jsonl", records[40:50])):
        (world / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    shutil.copy(ROOT / "tests" / "data" / "ner.conll", world / "train.conll")
    for name in ("path", "bert-mlm"):
        (world / name).symlink_to(shared / name, target_is_directory=True)
    (world / "runs").mkdir()
    (world / "runs" / "ner-teacher").symlink_to(shared / "ner-teacher", target_is_directory=True)


def write_shared(shared: Path) -> None:
    """What every folder links to: a BERT-base-shaped stand-in (12 layers, random weights: no BERT-base ships
    offline) for ``path/to/bert-base`` and ``bert-mlm/``, and the NER teacher docs/tasks.md distils."""
    torch.manual_seed(0)
    bert = transformers.BertConfig(vocab_size=30522, hidden_size=512, num_hidden_layers=12, num_attention_heads=8,
                                   intermediate_size=2048, max_position_embeddings=512)
    transformers.BertForMaskedLM(bert).save_pretrained(shared / "path" / "to" / "bert-base")
    transformers.AutoTokenizer.from_pretrained(MINILM_DIR).save_pretrained(shared / "path" / "to" / "bert-base")
    (shared / "bert-mlm").symlink_to(shared / "path" / "to" / "bert-base", target_is_directory=True)
    shutil.copy(ROOT / "tests" / "data" / "ner.conll", shared / "train.conll")
    assert main(["finetune", "--task", "ner", "--model", "minilm-l6", "--train", str(shared / "train.conll"), "--out",
                 str(shared / "ner-teacher"), "--max-steps", "2", "--no-progress"]) == 0


def link(world: Path, target: str, source: Path) -> None:
    (world / target).parent.mkdir(parents=True, exist_ok=True)
    (world / target).symlink_to(source, target_is_directory=source.is_dir())


@pytest.mark.slow
@pytest.mark.real_model
def test_every_documented_command_runs_as_written(tmp_path, monkeypatch, capsys):
    shared = tmp_path / "shared"
    write_shared(shared)
    ran, skipped = [], []
    readme_world = tmp_path / "README.md"
    for document in DOCUMENTS:
        world = tmp_path / document
        world.mkdir(parents=True)
        write_placeholders(world, shared)
        for target, source in INPUTS.get(document, {}).items():
            link(world, target, readme_world / source)
        monkeypatch.chdir(world)
        variables = {}
        for command in commands(document):
            if len(command) == 1 and re.fullmatch(r"[A-Z_]+=\S+", command[0]):  # V=... : a shell variable
                name, value = command[0].split("=", 1)
                variables[name] = value
                continue
            if command[0] != "alambic" and not (command[0] == "python" and command[1].startswith("benchmarks/")):
                assert command[0] in NOT_RUN, f"{document}: {' '.join(command)} is neither run nor excused"
                skipped.append((document, command[0]))
                continue
            argv = small(command, variables)
            if argv[0] == "python":  # a benchmark's data step (--data-only): a script, not a verb
                subprocess.run([sys.executable, str(ROOT / argv[1]), *argv[2:]], check=True, timeout=300)
            else:
                code = main(argv[1:])
                captured = capsys.readouterr()
                assert code == 0, f"{document}: {' '.join(argv)}\n{captured.err[-2000:]}"
            ran.append((document, " ".join(argv)))
        # ~15 GB at the peak otherwise: no later document resumes a run (only links to its models) or reads another
        # document's folder but the README's
        monkeypatch.chdir(tmp_path)
        if document != "README.md":
            shutil.rmtree(world)
        else:
            for checkpoints in sorted(world.rglob("checkpoints")):
                shutil.rmtree(checkpoints)
    assert len(ran) >= 50, ran
    assert {document for document, _ in ran} == set(DOCUMENTS)
    # what the README promised exists where it said
    for folder in ("runs/demo/student/best", "runs/smol/student", "exports/smol-q8_0", "exports/bbc-int8",
                   "students/smol-auto", "runs/chat/student/student", "runs/smol-offline/student",
                   "runs/s3-transfer/best", "reports/exports"):
        assert (readme_world / folder).is_dir(), folder
