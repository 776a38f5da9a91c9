"""``alambic generate``: the teacher answers prompts, and its answers become training data (sequence-level KD).

Sequence-level distillation (Kim & Rush, 2016) trains the student on what the teacher *writes* rather than on the
gold answers: the teacher's own outputs are easier to imitate than human ones and carry its style and knowledge.
Each prompt (a conversation without its final answer; a final answer present in the file is replaced) is rendered
with the teacher's chat template and answered ``num_return_sequences`` times by :func:`alambic.sampling.sample`.

The output folder holds ``data.jsonl``, one ``{"messages": prompt + [assistant answer]}`` line per answer (prompts
in file order, their answers together), which ``alambic distill --data OUT/data.jsonl`` reads as chat data, and
``manifest.json``: teacher and fingerprint, sampling settings, a SHA-256 of the prompts, counts, alambic version.
An answer that decodes to nothing is left out (an empty assistant turn teaches nothing, and chat data refuse it)
and counted as ``empty``; one that ran into ``max_new_tokens`` without ending is kept and counted as ``truncated``.

Resumable and exact: prompts are answered in batches, in file order; after each batch its lines are appended and
synced to disk, then the manifest is atomically rewritten with the prompts done and the byte length of the data.
Each batch draws from a generator seeded by ``(seed, batch index)``, so it does not matter where a run stopped:
rerunning the same command on an unfinished folder (no flag: the manifest says it is the same job) cuts
``data.jsonl`` back to the recorded length and continues, and the file ends byte-identical to an uninterrupted
run's (on the same device and dtype). A folder of another job is refused; a finished one of the same job is
reported complete and left alone.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from alambic import __version__
from alambic.cache import atomic_write_text
from alambic.data.chat import GENERATED_MANIFEST, TEACHER_WRITTEN_KIND
from alambic.data.sources import as_specs
from alambic.errors import AlambicError
from alambic.modeling import eos_token_ids
from alambic.ranges import NON_NEGATIVE, POSITIVE, Range, check_value

FORMAT_VERSION = 1
DATA = "data.jsonl"
MANIFEST = GENERATED_MANIFEST
KIND = TEACHER_WRITTEN_KIND
OPTION_RANGES = {"max_new_tokens": POSITIVE, "temperature": NON_NEGATIVE, "top_p": Range(0, 1, low_open=True),
                 "num_return_sequences": POSITIVE, "seed": NON_NEGATIVE, "batch_size": POSITIVE}


def prompts_sha256(records, ids: list[list[int]]) -> str:
    """sha256 of every prompt's messages and rendered token ids, in order: a changed prompt, chat template or
    tokenizer is another job."""
    digest = hashlib.sha256()
    for record, prompt in zip(records, ids):
        digest.update(json.dumps(record.prompt, ensure_ascii=False, sort_keys=True).encode())
        digest.update(np.asarray(prompt, dtype=np.int64).tobytes())
        digest.update(b"\x00")
    return digest.hexdigest()


def batch_generator(seed: int, batch_index: int) -> torch.Generator:
    """The CPU generator of one batch, a function of ``(seed, batch index)`` only: a resumed run draws the same."""
    return torch.Generator().manual_seed(int(np.random.default_rng([seed, batch_index]).integers(2**62)))


def prompts_per_batch(batch_size: int, num_return_sequences: int) -> int:
    """``batch_size`` counts sequences sampled together; a batch holds this many prompts, each answered n times."""
    return max(1, batch_size // num_return_sequences)


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise AlambicError(f"{path} has no usable tokenizer ({str(err).strip().splitlines()[0]}); save one next to "
                           "the model")


def _position_limit(path: Path) -> tuple[int | None, bool]:
    """The teacher's context length and whether it is a hard limit (learned absolute positions, as GPT-2's: a
    position past them is an index error; rotary models merely have not been trained that far)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "n_positions", None):
        return text.n_positions, True
    return getattr(text, "max_position_embeddings", None), False


def _read_manifest(out: Path) -> dict | None:
    file = out / MANIFEST
    if not file.is_file():
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise AlambicError(f"--out {out} exists and is not an `alambic generate` folder; choose another folder")
        return None
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except ValueError:
        raise AlambicError(f"{file} is not readable JSON: the folder is damaged; remove it or choose another --out")
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        raise AlambicError(f"--out {out} holds another tool's {MANIFEST}; choose another folder")
    return manifest


def _check_same_job(out: Path, manifest: dict, job: dict) -> None:
    """One line naming what differs between the run in ``out`` and this one."""
    differences = []
    if manifest.get("format_version") != job["format_version"]:
        differences.append(f"format {manifest.get('format_version')}, now {job['format_version']}")
    if manifest.get("teacher_fingerprint") != job["teacher_fingerprint"]:
        differences.append(f"teacher {manifest.get('teacher_path')} (or its weights changed)")
    if (manifest.get("prompts_sha256"), manifest.get("prompts_count")) != (job["prompts_sha256"],
                                                                           job["prompts_count"]):
        differences.append(f"other prompts ({manifest.get('prompts_count')} of them) or another chat template")
    before = manifest.get("sampling") or {}
    for key, value in job["sampling"].items():
        if before.get(key) != value:
            differences.append(f"--{key.replace('_', '-')} {before.get(key)}, now {value}")
    if differences:
        raise AlambicError(f"--out {out} holds an `alambic generate` run with other settings "
                           f"({'; '.join(differences)}): choose another --out, or rerun the command that started it")


def _write_manifest(out: Path, manifest: dict) -> None:
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


def _append(file: Path, lines: list[str]) -> int:
    """Append ``lines``, flushed and synced to disk; the file's new byte length."""
    with file.open("ab") as handle:
        handle.write("".join(lines).encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())
        return handle.tell()


def _answer_lines(tokenizer, records, answers, n: int, max_new_tokens: int, end_ids: set[int]):
    """The JSON lines of a batch's answers and its (truncated, empty) counts."""
    lines, truncated, empty = [], 0, 0
    for row, answer in enumerate(answers):
        ended = bool(answer) and answer[-1] in end_ids
        truncated += not ended and len(answer) >= max_new_tokens
        text = tokenizer.decode(answer[:-1] if ended else answer, skip_special_tokens=True).strip()
        if not text:
            empty += 1
            continue
        messages = records[row // n].prompt + [{"role": "assistant", "content": text}]
        lines.append(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    return lines, truncated, empty


def generate(teacher, prompts, out, *, max_new_tokens: int = 256, temperature: float = 0.7, top_p: float = 0.95,
             num_return_sequences: int = 1, seed: int = 0, batch_size: int = 8, progress: bool = False, log=print,
             max_prompts: int | None = None, stop_after_batches: int | None = None) -> dict:
    """Answer every prompt of ``prompts`` (chat files) with ``teacher`` into ``out`` (created, or continued when
    it holds an unfinished run of the same job); returns the manifest.

    ``temperature`` 0 is greedy; ``batch_size`` counts sequences sampled together; ``max_prompts`` answers only the
    first prompts (a trial run, or as many as the training will read). ``stop_after_batches`` stops
    after writing that many batches in this call, leaving a resumable folder (tests of the resume).
    """
    from alambic.data.chat import check_chat_template, prompt_ids, read_chat
    from alambic.data.collate import pad_id_of
    from alambic.sampling import sample
    from alambic.tasks.cache import teacher_fingerprint
    from alambic.teachers import load_teacher, resolve_model_path

    options = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
               "num_return_sequences": num_return_sequences, "seed": seed, "batch_size": batch_size}
    for name, allowed in OPTION_RANGES.items():
        check_value(name, options[name], allowed)
    check_value("max_prompts", max_prompts, POSITIVE)
    out = Path(out)
    specs = as_specs(prompts)
    path = resolve_model_path(teacher)
    tokenizer = _load_tokenizer(path)
    check_chat_template(tokenizer)
    records = read_chat(specs, need_response=False)[:max_prompts]
    ids = [prompt_ids(tokenizer, record.prompt) for record in records]
    limit, hard = _position_limit(path)
    longest = max(range(len(ids)), key=lambda i: len(ids[i]))
    too_long = None
    if limit is not None and len(ids[longest]) + max_new_tokens > limit:
        too_long = (f"{records[longest].where}: the prompt is {len(ids[longest])} tokens, and with --max-new-tokens "
                    f"{max_new_tokens} the answer would pass the teacher's {limit} positions")
        if hard:
            raise AlambicError(f"{too_long}: lower --max-new-tokens or shorten the prompt")
    job = {"format_version": FORMAT_VERSION, "teacher_fingerprint": teacher_fingerprint(path),
           "prompts_sha256": prompts_sha256(records, ids), "prompts_count": len(records),
           "sampling": {k: options[k] for k in ("max_new_tokens", "temperature", "top_p", "num_return_sequences",
                                                "seed", "batch_size")}}
    manifest = _read_manifest(out)
    data = out / DATA
    if manifest is not None:
        _check_same_job(out, manifest, job)
        if manifest["complete"]:
            log(f"{out} is already complete: {manifest['counts']['responses']} answers to "
                f"{manifest['counts']['prompts']} prompts in {data}; nothing to do")
            return manifest
        if not data.is_file() or data.stat().st_size < manifest["data_bytes"]:
            raise AlambicError(f"{data} is missing or shorter than its manifest records: the folder is damaged; "
                               "remove it and run the command again")

    if too_long:
        log(f"alambic: warning: {too_long} (beyond what it was trained on: such answers may degrade)")
    model, tokenizer = load_teacher(teacher)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model.to(device)
    end_ids = eos_token_ids(tokenizer, model)
    pad_id = pad_id_of(tokenizer)
    per_batch = prompts_per_batch(batch_size, num_return_sequences)
    n_batches = -(-len(records) // per_batch)
    if manifest is None:
        out.mkdir(parents=True, exist_ok=True)
        data.write_bytes(b"")
        manifest = {"kind": KIND, **job, "teacher": str(teacher), "teacher_path": str(path),
                    "prompts": specs, "eos_token_ids": end_ids, "pad_token_id": pad_id,
                    "counts": {"prompts": len(records), "done": 0, "responses": 0, "truncated": 0, "empty": 0},
                    "batches_done": 0, "data_bytes": 0, "complete": False, "alambic": __version__}
        _write_manifest(out, manifest)
    else:
        os.truncate(data, manifest["data_bytes"])  # a batch appended after the last manifest is written again
        log(f"continuing {out}: {manifest['counts']['done']} of {len(records)} prompts already answered")
    n = num_return_sequences
    log(f"answering {len(records)} prompts x {n} with {teacher} on {device}: up to {max_new_tokens} new tokens, "
        + (f"temperature {temperature:g}, top-p {top_p:g}" if temperature > 0 else "greedy"))

    from tqdm.auto import tqdm

    counts = manifest["counts"]
    written = 0
    with tqdm(total=n_batches, initial=manifest["batches_done"], unit="batch", desc="generate",
              disable=not progress) as bar:
        for index in range(manifest["batches_done"], n_batches):
            if stop_after_batches is not None and written >= stop_after_batches:
                return manifest
            first = index * per_batch
            chunk = records[first:first + per_batch]
            rows = [ids[first + i] for i in range(len(chunk)) for _ in range(n)]
            answers = sample(model, rows, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             eos_token_ids=end_ids, pad_token_id=pad_id, generator=batch_generator(seed, index))
            lines, truncated, empty = _answer_lines(tokenizer, chunk, answers, n, max_new_tokens, set(end_ids))
            manifest["data_bytes"] = _append(data, lines)
            counts.update(done=first + len(chunk), responses=counts["responses"] + len(lines),
                          truncated=counts["truncated"] + truncated, empty=counts["empty"] + empty)
            manifest["batches_done"] = index + 1
            manifest["complete"] = index + 1 == n_batches
            _write_manifest(out, manifest)
            written += 1
            bar.update(1)
    log(f"wrote {counts['responses']} answers to {data}"
        + (f"; {counts['truncated']} reached --max-new-tokens {max_new_tokens} without ending" if counts["truncated"]
           else "")
        + (f"; {counts['empty']} empty answers left out" if counts["empty"] else ""))
    if not counts["responses"]:
        log("alambic: warning: every answer decoded to nothing (only whitespace or special tokens), so the data "
            "file is empty: check the teacher and its chat template, or sample with a --temperature above 0")
    return manifest
