"""Task data from the user's own files, in standard formats, and the label maps saved with the models.

- classification: CSV / TSV / JSONL / JSON records (``text``, optional ``text_pair``, ``label``), a folder of
  ``<label>/*.txt`` files (identical texts kept once; bytes that are not UTF-8 replaced), or a labelled packaged
  corpus (``bbc-news:train`` / ``bbc-news:heldout``, the same stable 90/10 split as its raw text);
- ner: CoNLL column files: one token per line, the token first and its BIO / IOB2 tag last, a blank line between
  sentences, ``-DOCSTART-`` lines ignored;
- qa: SQuAD-format JSON (``data[].paragraphs[].{context, qas[].{id, question, answers[].{text, answer_start}}}``).

Labels are mapped deterministically (:func:`label_list`), and without a validation file a seeded, stratified 10% of
train is held out (:func:`holdout_split`), as the Korean RoBERTa study did.

Task distillation also learns from *unlabelled* examples (a transfer set: Hinton et al. 2015; Turc et al. 2019):
records with an empty or missing label, CoNLL sentences of tokens without tags, SQuAD questions without answers,
or a plain ``.txt`` file (one text, or one sentence of space-separated tokens for NER, per line). They get the
teacher's soft targets only. Fine-tuning needs labels and refuses them.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from alambic.data.sources import packaged_labelled_texts
from alambic.errors import AlambicError, did_you_mean

TASKS = ("classification", "ner", "qa")
HOLDOUT_FRACTION = 0.1
_TAG = re.compile(r"^[BI]-\S+$")


@dataclass
class ClassificationExample:
    text: str
    label: str | None
    """None: unlabelled (soft targets only)."""
    text_pair: str | None = None

    @property
    def labelled(self) -> bool:
        return self.label is not None


@dataclass
class TokenExample:
    words: list[str]
    tags: list[str] | None
    """None: unlabelled (soft targets only)."""

    @property
    def labelled(self) -> bool:
        return self.tags is not None


@dataclass
class QAExample:
    id: str
    question: str
    context: str
    answers: list[str] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)

    @property
    def labelled(self) -> bool:
        return bool(self.answers)


def unlabelled(example):
    """The same example without its label (a transfer-set example)."""
    if isinstance(example, ClassificationExample):
        return ClassificationExample(example.text, None, example.text_pair)
    if isinstance(example, TokenExample):
        return TokenExample(example.words, None)
    return QAExample(example.id, example.question, example.context)


def check_task(task: str) -> str:
    if task not in TASKS:
        raise AlambicError(f"unknown task {task!r}{did_you_mean(str(task), TASKS)}; use one of: {', '.join(TASKS)}")
    return task


def read_task_data(task: str, path, *, text_field: str = "text", pair_field: str = "text_pair",
                   label_field: str = "label", allow_unlabelled: bool = False) -> list:
    """Every example of ``path`` for ``task`` (see the module docstring for the formats). ``allow_unlabelled``:
    examples without a label are kept (task distillation) instead of refused (fine-tuning, evaluation)."""
    check_task(task)
    packaged = packaged_labelled_texts(str(path)) if task == "classification" else None
    path = Path(path).expanduser()
    if packaged is not None:
        examples = [ClassificationExample(text, label) for text, label in packaged]
    elif not path.exists():
        raise AlambicError(f"no such file or folder: {path}")
    elif path.suffix.lower() == ".txt" and path.is_file() and task != "qa":
        examples = _read_lines(task, path)
    elif task == "classification":
        examples = _read_classification(path, text_field, pair_field, label_field, allow_unlabelled)
    elif task == "ner":
        examples = read_conll(path)
    else:
        examples = read_squad(path)
    if not examples:
        raise AlambicError(f"{path} holds no {task} examples: check the file and its format")
    if not allow_unlabelled:
        missing = [i for i, e in enumerate(examples) if not e.labelled]
        if len(missing) == len(examples):
            raise AlambicError(f"{path} has no labelled example ({len(examples)} without a {_label_word(task)}): "
                               "fine-tuning and evaluation need labels; give this text to distill-task as "
                               "--unlabelled, where the teacher labels it")
        if missing:
            raise AlambicError(f"{path}: {_where(task, examples[missing[0]], missing[0])} has no "
                               f"{_label_word(task)} ({len(missing)} of {len(examples)} examples lack one): label "
                               "them, or pass the unlabelled ones to distill-task (--unlabelled)")
    return examples


def _label_word(task: str) -> str:
    return {"classification": "label", "ner": "tags", "qa": "answer"}[task]


def _where(task: str, example, index: int) -> str:
    if task == "qa":
        return f"question {example.id!r}"
    return f"example {index + 1}"


def _read_lines(task: str, path: Path) -> list:
    """A plain text file: one unlabelled example per non-empty line (NER: its space-separated tokens)."""
    lines = [line.strip() for line in path.read_text(encoding="utf-8-sig", errors="replace").splitlines()]
    if task == "ner":
        return [TokenExample(line.split(), None) for line in lines if line]
    return [ClassificationExample(line, None) for line in lines if line]


# --- classification ---------------------------------------------------------------------------------------------

def _read_classification(path: Path, text_field: str, pair_field: str, label_field: str, allow_unlabelled: bool):
    if path.is_dir():
        return _read_label_folders(path)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with path.open(encoding="utf-8-sig", errors="replace", newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
            rows = [(number, row) for number, row in enumerate(reader, 2)]
            columns = reader.fieldnames or []
    elif suffix == ".jsonl":
        rows, columns = [], set()
        for number, line in enumerate(path.read_text(encoding="utf-8-sig", errors="replace").splitlines(), 1):
            if line.strip():
                rows.append((number, parse_json(line, f"{path}:{number}")))
        columns = sorted({k for _, r in rows if isinstance(r, dict) for k in r})
    elif suffix == ".json":
        records = parse_json(path.read_text(encoding="utf-8-sig", errors="replace"), str(path))
        if not isinstance(records, list):
            raise AlambicError(f"{path} holds a JSON {type(records).__name__}, not a list of records: write "
                               f'[{{"{text_field}": "...", "{label_field}": "..."}}, ...] or use .jsonl')
        rows = list(enumerate(records, 1))
        columns = sorted({k for _, r in rows if isinstance(r, dict) for k in r})
    else:
        raise AlambicError(f"unsupported classification file {path.name}: use .csv, .tsv, .jsonl, .json or a folder "
                           "of <label>/*.txt files")
    required = ((text_field, "--text-field"),) + (() if allow_unlabelled else ((label_field, "--label-field"),))
    for name, flag in required:
        if name not in columns:
            found = (f"{path} has no field {name!r}{did_you_mean(name, columns)} (fields: "
                     f"{', '.join(columns) or 'none'})")
            if name == label_field:
                raise AlambicError(f"{found}, so no example is labelled: rename it or pass {flag}; unlabelled text "
                                   "can teach a student through distill-task --unlabelled")
            raise AlambicError(f"{found}: rename it or pass {flag}")
    pairs = pair_field in columns
    examples = []
    for number, row in rows:
        where = f"{path}:{number}" if suffix != ".json" else f"{path}: record {number}"
        if not isinstance(row, dict):
            raise AlambicError(f"{where} is not a record with fields {text_field!r} and {label_field!r}")
        label, text = row.get(label_field), row.get(text_field)
        label = None if label is None or str(label).strip() == "" else str(label).strip()
        if text is None:
            raise AlambicError(f"{where} has no {text_field!r}: give every example a text")
        pair = row.get(pair_field) if pairs else None
        examples.append(ClassificationExample(str(text), label, None if pair is None else str(pair)))
    return examples


def _read_label_folders(root: Path):
    """``root/<label>/*.txt``: the folder name is the label; identical texts are kept once (first in sorted order)."""
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise AlambicError(f"folder {root} has no <label>/ subfolders: lay classification text out as "
                           f"{root}/<label>/*.txt, or give a CSV / JSONL file")
    seen, examples = set(), []
    for folder in folders:
        for file in sorted(folder.glob("*.txt")):
            text = file.read_text(encoding="utf-8", errors="replace")
            if text.strip() and text not in seen:
                seen.add(text)
                examples.append(ClassificationExample(text, folder.name))
    return examples


def parse_json(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise AlambicError(f"{where} is not valid JSON ({error.msg}, line {error.lineno} column {error.colno}): "
                           "fix or remove it") from None


# --- NER ----------------------------------------------------------------------------------------------------------

def read_conll(path) -> list[TokenExample]:
    """CoNLL columns (token first, BIO / IOB2 tag last); a sentence of one-column lines (tokens only) is unlabelled.
    A malformed line is refused with its file and line number."""
    path = Path(path)
    if path.is_dir():
        raise AlambicError(f"{path} is a folder: give a CoNLL file (one token and its tag per line)")
    examples, words, tags, lines = [], [], [], []

    def close():
        if not words:
            return
        tagged = [t is not None for t in tags]
        if any(tagged) and not all(tagged):
            number = lines[tagged.index(False)]
            raise AlambicError(f"{path}:{number}: expected a token and its tag separated by a space or tab, got "
                               f"{words[tagged.index(False)]!r} alone (the sentence's other tokens are tagged; a "
                               "sentence of tokens without tags is read as unlabelled)")
        examples.append(TokenExample(list(words), list(tags) if all(tagged) else None))
        for part in (words, tags, lines):
            part.clear()

    for number, line in enumerate(path.read_text(encoding="utf-8-sig", errors="replace").splitlines(), 1):
        if not line.strip():
            close()
            continue
        if line.startswith("-DOCSTART-"):
            continue
        columns = line.split()
        tag = columns[-1] if len(columns) >= 2 else None
        if tag is not None and tag != "O" and not _TAG.match(tag):
            raise AlambicError(f"{path}:{number}: tag {tag!r} is not BIO / IOB2 (O, B-TYPE or I-TYPE): fix the tag "
                               "or convert the file to IOB2")
        words.append(columns[0])
        tags.append(tag)
        lines.append(number)
    close()
    return examples


# --- QA -----------------------------------------------------------------------------------------------------------

def read_squad(path) -> list[QAExample]:
    """SQuAD 1.1-format questions; every answer must sit at its ``answer_start`` in the context."""
    path = Path(path)
    if path.is_dir():
        raise AlambicError(f"{path} is a folder: give a SQuAD-format .json file")
    document = parse_json(path.read_text(encoding="utf-8-sig", errors="replace"), str(path))
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        raise AlambicError(f'{path} is not SQuAD format: expected {{"data": [{{"paragraphs": [{{"context": ..., '
                           '"qas": [...]}]}]}')
    examples = []
    for article in document["data"]:
        for paragraph in article.get("paragraphs", []):
            context = paragraph.get("context")
            if not isinstance(context, str):
                raise AlambicError(f"{path}: a paragraph of {article.get('title', 'an article')!r} has no context text")
            for qa in paragraph.get("qas", []):
                qid = str(qa.get("id", len(examples)))
                answers = qa.get("answers") or []
                if qa.get("is_impossible"):
                    raise AlambicError(f"{path}: question {qid!r} is marked unanswerable (SQuAD 2.0): extractive QA "
                                       "here needs an answer span in the context; remove unanswerable ones")
                texts, starts = [], []
                for answer in answers:
                    text, start = answer.get("text"), answer.get("answer_start")
                    if not isinstance(text, str) or not isinstance(start, int) or isinstance(start, bool):
                        raise AlambicError(f"{path}: question {qid!r}: every answer needs a text and an integer "
                                           "answer_start")
                    found = context[start:start + len(text)]
                    if found != text:
                        raise AlambicError(f"{path}: question {qid!r}: answer {text!r} is not at answer_start {start} "
                                           f"(the context there reads {found!r}): fix answer_start (0-based "
                                           "character offset into the context)")
                    texts.append(text)
                    starts.append(start)
                examples.append(QAExample(qid, str(qa.get("question", "")), context, texts, starts))
    return examples


# --- labels and the held-out split ------------------------------------------------------------------------------

def _example_labels(task: str, example) -> list[str]:
    if not getattr(example, "labelled", True):
        return []
    if task == "classification":
        return [example.label]
    if task == "ner":
        return example.tags
    return []


def _label_order(value: str):
    """Integers in numeric order (so 2 < 10), then everything else alphabetically."""
    return (0, int(value), "") if re.fullmatch(r"-?\d+", value) else (1, 0, value)


def label_list(task: str, examples) -> list[str]:
    """The label of each class id, the same for the same label set whatever the example order: sorted class names;
    for NER ``O`` then ``B-TYPE, I-TYPE`` for each entity type in sorted order; nothing for QA."""
    if task == "qa":
        return []
    seen = {label for example in examples for label in _example_labels(task, example)}
    if task == "classification":
        return sorted(seen, key=_label_order)
    types = sorted({tag[2:] for tag in seen if tag != "O"})
    return ["O"] + [f"{prefix}-{kind}" for kind in types for prefix in "BI"]


def check_labels(task: str, examples, labels: list[str], where: str, known_from: str = "the training data") -> None:
    """Refuse labels the model cannot predict (e.g. a validation label never seen in training)."""
    if task == "qa":
        return
    known = set(labels)
    for example in examples:
        for label in _example_labels(task, example):
            if label not in known:
                shown = ", ".join(labels[:12]) + (" ..." if len(labels) > 12 else "")
                raise AlambicError(f"{where}: label {label!r} never occurs in {known_from} (labels: {shown}); "
                                   "fix the label or add examples of it to the training data")


def holdout_split(task: str, examples: list, fraction: float = HOLDOUT_FRACTION, seed: int = 42):
    """``(train, held_out)``: a seeded ``fraction`` of the examples, stratified by label for classification (each
    class gives round(fraction * count), at least one when it has two or more examples); order is preserved."""
    if not 0 < fraction < 1:
        raise AlambicError(f"the held-out fraction must be between 0 and 1, got {fraction}")
    rng = np.random.default_rng(seed)
    labelled = [i for i, example in enumerate(examples) if example.labelled]  # unlabelled ones cannot validate
    if task == "classification":
        groups: dict[str, list[int]] = {}
        for i in labelled:
            groups.setdefault(examples[i].label, []).append(i)
        strata = [groups[label] for label in sorted(groups, key=_label_order)]
    else:
        strata = [labelled]
    held = set()
    for members in strata:
        k = round(fraction * len(members))
        if len(members) >= 2:
            k = min(max(k, 1), len(members) - 1)
        else:
            k = 0
        held.update(members[j] for j in rng.permutation(len(members))[:k])
    if not held:
        raise AlambicError(f"{len(labelled)} labelled example(s) are too few to hold out a validation set: "
                           "give --validation")
    train = [e for i, e in enumerate(examples) if i not in held]
    return train, [e for i, e in enumerate(examples) if i in held]
