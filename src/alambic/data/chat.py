"""Chat and instruction data: conversations rendered with the tokenizer's chat template, loss on assistant tokens.

A record is ``{"messages": [{"role": ..., "content": ...}, ...]}`` (TRL, Axolotl and most chat datasets) or
``{"prompt": ..., "completion": ...}`` (each a string, or a list of messages), in .jsonl, .json or .parquet files.
A prompt file (``alambic generate``, on-policy prompts, evaluation) may stop before the assistant's answer.

Which tokens are the assistant's is found from the rendered text, not guessed from token ids: for every assistant
turn, the conversation up to it rendered with the generation prompt must be a prefix of the conversation rendered
through it, and the characters between the two are the turn (its end-of-turn marker included, so the student learns
to stop). One tokenisation of the whole conversation with character offsets then marks the assistant tokens. A
template that rewrites earlier turns (some strip past reasoning) breaks the prefix property and is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from alambic.data.collate import StoredMaskCollator
from alambic.errors import AlambicError

ROLES = ("system", "user", "assistant", "tool")
CHAT_FIELDS = ("messages", "prompt")
CHAT_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class ChatRecord:
    """One conversation: ``messages`` whole, ``where`` it came from (``file:line``) for error messages, and the
    record's optional ``options`` (answer choices, the final answer among them: ``alambic eval-chat`` accuracy)."""

    messages: tuple[dict, ...]
    where: str
    options: tuple[str, ...] | None = None

    @property
    def has_response(self) -> bool:
        return bool(self.messages) and self.messages[-1]["role"] == "assistant"

    @property
    def prompt(self) -> list[dict]:
        """The messages before the final assistant answer (all of them when there is none)."""
        return list(self.messages[:-1] if self.has_response else self.messages)

    @property
    def response(self) -> str | None:
        """The final assistant answer (a gold or teacher-written reference), or None."""
        return self.messages[-1]["content"] if self.has_response else None


@dataclass
class ChatExample:
    """Token ids of a rendered conversation and which of them are assistant tokens (the ones the loss covers).
    ``prompt_length``: tokens before the final assistant answer (what a model answering the prompt is given)."""

    ids: np.ndarray  # (L,) int64
    assistant: np.ndarray  # (L,) bool
    prompt_length: int

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class ChatExamples:
    """Tokenised conversations, with how many had their answer cut to ``max_length`` or were dropped (their prompt
    alone did not fit)."""

    examples: list[ChatExample]
    truncated: int
    dropped: int
    max_length: int

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> ChatExample:
        return self.examples[index]

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(e) for e in self.examples], dtype=np.int64)

    def describe(self) -> str:
        text = f"chat data: {len(self.examples)} conversations, loss on assistant tokens only"
        if self.truncated:
            text += f"; {self.truncated} answers cut to data.max_length={self.max_length} (--max-length)"
        if self.dropped:
            text += f"; {self.dropped} dropped: their prompt alone is longer than data.max_length={self.max_length}"
        return text


# --- reading --------------------------------------------------------------------------------------------------------

TEACHER_WRITTEN_KIND = "alambic-generate"
"""The ``kind`` of the manifest that `alambic generate` writes beside the conversations it wrote."""
GENERATED_MANIFEST = "manifest.json"


def _chat_files(specs) -> list[Path]:
    from alambic.data.sources import as_specs, packaged_spec, resolve_files

    files = []
    for spec in as_specs(specs):
        if packaged_spec(str(spec)) is not None:
            return []  # packaged corpora are raw text
        files.extend(resolve_files(str(spec)))
    # `alambic generate`'s folder given as data: its conversations, not its manifest
    return [path for path in files if not (path.name == GENERATED_MANIFEST and _generated(path))]


def _records(path: Path) -> list[tuple[dict, str]]:
    """``(record, where)`` for every record of a .jsonl / .json / .parquet file."""
    from alambic.data.sources import parse_json

    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        return [(parse_json(line, f"{path}:{n}"), f"{path}:{n}") for n, line in enumerate(lines, 1) if line.strip()]
    if suffix == ".json":
        rows = parse_json(path.read_text(encoding="utf-8", errors="replace"), str(path))
        rows = rows if isinstance(rows, list) else [rows]
        return [(row, f"{path} record {n}") for n, row in enumerate(rows, 1)]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return [(row, f"{path} row {n}") for n, row in enumerate(pq.read_table(path).to_pylist(), 1)]
    raise AlambicError(f"{path}: chat data must be .jsonl, .json or .parquet records with a 'messages' or 'prompt' "
                       "field")


def is_teacher_written(specs) -> bool:
    """Whether every file of ``specs`` holds answers a teacher wrote: `alambic generate`'s output, whose folder's
    manifest.json says so (sequence-level KD data, whose answers are the teacher's own choices)."""
    files = _chat_files(specs)
    return bool(files) and all(_generated(path) for path in files)


def _generated(path: Path) -> bool:
    try:
        manifest = json.loads((path.parent / GENERATED_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("kind") == TEACHER_WRITTEN_KIND


def is_chat_data(specs) -> bool:
    """Whether ``specs`` are chat records (their first record has a ``messages`` or ``prompt`` field)."""
    files = _chat_files(specs)
    if not files or any(f.suffix.lower() not in CHAT_SUFFIXES for f in files):
        return False
    first = _first_record(files[0])
    return isinstance(first, dict) and any(k in first for k in CHAT_FIELDS)


def _first_record(path: Path):
    """The first record of a file, reading only its first line for .jsonl (detection runs on every verb's start)."""
    if path.suffix.lower() == ".jsonl":
        from alambic.data.sources import parse_json

        with path.open(encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    return parse_json(line, f"{path}:{number}")
        return None
    records = _records(path)
    return records[0][0] if records else None


def _as_messages(value, role: str, where: str, field: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return list(value)
    raise AlambicError(f"{where}: {field!r} must be a string or a list of messages, got {type(value).__name__}")


def _record_messages(record, where: str) -> list[dict]:
    if not isinstance(record, dict):
        raise AlambicError(f"{where}: a chat record must be an object with 'messages' or 'prompt', "
                           f"got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list):
            raise AlambicError(f"{where}: 'messages' must be a list of {{\"role\", \"content\"}} objects")
    elif "prompt" in record:
        messages = _as_messages(record["prompt"], "user", where, "prompt")
        if record.get("completion") is not None:
            messages += _as_messages(record["completion"], "assistant", where, "completion")
    else:
        raise AlambicError(f"{where}: no 'messages' nor 'prompt' field (fields: {', '.join(sorted(record)) or 'none'})"
                           ": write {\"messages\": [{\"role\": \"user\", \"content\": ...}, {\"role\": \"assistant\", "
                           "...}]} or {\"prompt\": ..., \"completion\": ...}")
    checked = []
    for number, message in enumerate(messages, 1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise AlambicError(f"{where}: message {number} is not a {{\"role\", \"content\"}} object")
        if message["role"] not in ROLES:
            raise AlambicError(f"{where}: message {number} has unknown role {message['role']!r}; roles: "
                               f"{', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise AlambicError(f"{where}: message {number}'s content must be a string")
        if message["role"] == "assistant" and not message["content"].strip():
            raise AlambicError(f"{where}: message {number} is an empty assistant turn: remove the record or write "
                               "the answer")
        checked.append({"role": message["role"], "content": message["content"]})
    if not checked:
        raise AlambicError(f"{where}: the conversation has no messages")
    return checked


def _record_options(record: dict, messages: list[dict], where: str) -> tuple[str, ...] | None:
    """The record's ``"options"`` (two or more distinct strings); its final assistant answer must be one of them."""
    options = record.get("options")
    if options is None:
        return None
    if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) and o.strip() for o in options):
        raise AlambicError(f"{where}: 'options' must be a list of two or more non-empty strings (the answer choices)")
    if len(set(options)) != len(options):
        raise AlambicError(f"{where}: 'options' lists the same choice twice: keep each once")
    if messages[-1]["role"] == "assistant" and messages[-1]["content"] not in options:
        raise AlambicError(f"{where}: the final answer {messages[-1]['content']!r} is not one of 'options' "
                           f"({', '.join(map(repr, options))}): write the gold option as the answer")
    return tuple(options)


def read_chat(specs, *, need_response: bool) -> list[ChatRecord]:
    """Every conversation of ``specs``, checked. ``need_response``: each must hold an assistant turn (training
    data); otherwise prompts without answers are welcome (prompt files)."""
    from alambic.data.sources import as_specs

    specs = as_specs(specs)
    files = _chat_files(specs)
    if not files:
        raise AlambicError(f"no chat records in {', '.join(map(str, specs))}: chat data are .jsonl, .json or .parquet "
                           "files of {\"messages\": [...]} or {\"prompt\": ..., \"completion\": ...} records")
    records = []
    for path in files:
        for record, where in _records(path):
            messages = _record_messages(record, where)
            if need_response and not any(m["role"] == "assistant" for m in messages):
                raise AlambicError(f"{where}: the conversation has no assistant turn, so nothing to learn from: add "
                                   "the answer (or write the answers with `alambic generate`)")
            if need_response:  # turns after the last answer teach nothing, and its prompt is what precedes it
                last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
                messages = messages[:last + 1]
            if not need_response and messages[-1]["role"] == "assistant" and len(messages) == 1:
                raise AlambicError(f"{where}: the conversation is only an assistant turn: give a prompt")
            records.append(ChatRecord(tuple(messages), where, _record_options(record, messages, where)))
    if not records:
        raise AlambicError(f"{', '.join(map(str, specs))} holds no chat records")
    return records


def chat_jsonl(conversations) -> str:
    """``{"messages": [...]}`` JSON lines, the format :func:`read_chat` reads."""
    return "".join(json.dumps({"messages": list(m)}, ensure_ascii=False) + "\n" for m in conversations)


# --- rendering ------------------------------------------------------------------------------------------------------

def check_chat_template(tokenizer, what: str = "the teacher's tokenizer") -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise AlambicError(f"{what} has no chat template, so conversations cannot be rendered: use an instruct "
                           "model's tokenizer, or set tokenizer.chat_template in its tokenizer_config.json")
    if not getattr(tokenizer, "is_fast", False):
        raise AlambicError(f"{what} is a slow (Python) tokenizer; chat data needs a fast one (tokenizer.json) to find "
                           "the assistant tokens")


def _render(tokenizer, messages, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)


def prompt_ids(tokenizer, messages) -> list[int]:
    """The ids a model answering ``messages`` is given: the conversation rendered with the generation prompt."""
    text = _render(tokenizer, messages, True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def assistant_spans(tokenizer, messages, where: str = "a conversation") -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span ``[start, end)`` of every assistant turn."""
    full = _render(tokenizer, messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True) if i else ""
        through = _render(tokenizer, messages[:i + 1], False)
        if not through.startswith(before) or not full.startswith(through):
            raise AlambicError(
                f"{where}: the chat template does not render a conversation as its prompt followed by the answer "
                f"(turn {i + 1}): the prompt rendered with the generation prompt is not a prefix of the rendered "
                "conversation, so the assistant tokens cannot be found; use a template without history rewriting")
        spans.append((len(before), len(through)))
    return full, spans


def tokenize_conversation(tokenizer, record: ChatRecord, max_length: int) -> tuple[ChatExample | None, bool]:
    """``(example, truncated)``: the conversation's ids and assistant mask, cut to ``max_length`` inside an answer,
    never inside the first prompt (None when that prompt alone does not fit)."""
    text, spans = assistant_spans(tokenizer, record.messages, record.where)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(encoded["input_ids"], dtype=np.int64)
    starts = np.asarray([start for start, _ in encoded["offset_mapping"]], dtype=np.int64)
    assistant = np.zeros(len(ids), dtype=bool)
    for start, end in spans:
        assistant |= (starts >= start) & (starts < end)
    if not assistant.any():
        raise AlambicError(f"{record.where}: the assistant turns render to no tokens: check the chat template")
    last = int(np.flatnonzero(assistant)[-1]) + 1  # nothing after the last answer is learned
    ids, assistant = ids[:last], assistant[:last]
    first_answer = int(np.flatnonzero(assistant)[0])
    final_start = spans[-1][0] if record.has_response else len(text)
    prompt_length = int(np.searchsorted(starts[:last], final_start)) if record.has_response else last
    if first_answer >= max_length:
        return None, False
    truncated = len(ids) > max_length
    return ChatExample(ids[:max_length], assistant[:max_length], min(prompt_length, max_length)), truncated


def tokenize_chat(records: list[ChatRecord], tokenizer, max_length: int) -> ChatExamples:
    check_chat_template(tokenizer)
    examples, truncated, dropped = [], 0, 0
    for record in records:
        example, cut = tokenize_conversation(tokenizer, record, max_length)
        if example is None:
            dropped += 1
            continue
        examples.append(example)
        truncated += cut
    if not examples:
        raise AlambicError(f"every conversation's prompt is longer than data.max_length={max_length}: raise it "
                           "(--max-length)")
    return ChatExamples(examples, truncated, dropped, max_length)


def chat_targets(example: ChatExample) -> np.ndarray:
    """The next-token target at each position where the next token is an assistant token, -100 elsewhere."""
    targets = np.full(len(example.ids), -100, dtype=np.int64)
    targets[:-1] = np.where(example.assistant[1:], example.ids[1:], -100)
    return targets


class ChatCollator:
    """Conversations in the batch contract: next-token targets only where the next token is an assistant token, so
    every loss on ``lm_positions`` is completion-only (collated as stored targets are: ``StoredMaskCollator``)."""

    def __init__(self, tokenizer):
        self.stored = StoredMaskCollator(tokenizer)

    def __call__(self, examples: list[ChatExample], seed: int = 0) -> dict[str, torch.Tensor]:
        """``seed`` is unused (nothing is random), accepted so every collator is called the same way."""
        return self.stored([(e.ids, chat_targets(e)) for e in examples])


def split_chat(records: list[ChatRecord], folder: Path) -> tuple[list[str], list[str]]:
    """A stable 10% of ``records`` held out (by content hash, the same on every machine), written to
    ``folder/train.jsonl`` and ``folder/validation.jsonl``; returns the two specs."""
    from alambic.cache import atomic_write_text
    from alambic.data.sources import check_hold_out, is_heldout

    parts = {"train": [], "validation": []}
    for record in records:
        held = is_heldout(json.dumps(record.messages, sort_keys=True))
        parts["validation" if held else "train"].append(record.messages)
    check_hold_out(len(records), len(parts["validation"]), "conversations")
    specs = []
    for name, messages in parts.items():
        path = Path(folder) / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, chat_jsonl(messages))
        specs.append(str(path))
    return [specs[0]], [specs[1]]
