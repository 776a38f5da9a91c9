"""``alambic cache-teacher``: run the teacher once over a corpus and store its outputs for ``distill --teacher-logits``.

The examples are the ones ``alambic distill`` would train on (same data, tokenizer and ``max_length``); for each of
their tokens the teacher's top-k log-probabilities at the cache's temperature and the log of the remaining mass are
stored (format: :mod:`alambic.offline.store`). Encoders see masked inputs, so their masks are drawn once per example
here and stored with the cache (static masking, as early BERT and TinyBERT's cached data did): every epoch then
trains on the same masks, where a live teacher gets fresh ones.

Resumable and parallel: shards are written atomically one by one, a rerun skips the finished ones, and under
``torchrun`` each process writes the shards whose number is its rank modulo the world size (the first process
tokenises and starts the folder before the others begin); whichever process finds every shard written writes the
manifest.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from alambic.cache import atomic_write_text
from alambic.environment import launched_rank
from alambic.errors import AlambicError
from alambic.offline.compact import compact_shard
from alambic.offline.store import (FORMAT_VERSION, MANIFEST, READABLE_VERSIONS, SETTINGS, examples_hash, ids_dtype,
                                   shard_name)


REST_MASS_WARNING = 0.5
"""A cache whose top-k miss more than this share of the teacher's (softened) probability, on average, is warned
about: measured on SmolLM2 at T = 2, top-32 kept 21% of it and trained to a 10% worse perplexity than the full KL."""


def _settings(teacher_spec, path, config, tokenizer, data, examples, *, top_k, temperature, max_length,
              hidden_states, mlm_probability, seed, shard_examples, kind, format_version=FORMAT_VERSION) -> dict:
    from alambic import modeling
    from alambic.data.chat import ChatExamples
    from alambic.tasks.cache import teacher_fingerprint
    from alambic.teachers import vocabulary_hash

    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    with torch.device("meta"):  # the parameter count, without reading or initialising any weight
        skeleton = (AutoModelForCausalLM if kind == "causal" else AutoModelForMaskedLM).from_config(config)
    return {
        "format_version": format_version, "teacher": str(teacher_spec),
        "teacher_fingerprint": teacher_fingerprint(path),
        "teacher_parameters": sum(p.numel() for p in skeleton.parameters()),
        "teacher_layers": modeling.num_layers(config),
        "tokenizer_hash": vocabulary_hash(tokenizer), "vocab_size": modeling.vocab_size(config), "kind": kind,
        "data": [str(d) for d in data], "data_hash": examples_hash(examples), "examples": len(examples),
        "max_length": max_length, "top_k": min(top_k, modeling.vocab_size(config)), "temperature": temperature,
        "hidden_states": hidden_states, "hidden_size": modeling.hidden_size(config) if hidden_states else None,
        "masking": ({"kind": "static", "mlm_probability": mlm_probability, "seed": seed} if kind == "masked"
                    else None),
        "shard_examples": shard_examples,
        # conversations: targets on the assistant tokens only (no key for raw text, so older caches still resume)
        **({"chat": True} if isinstance(examples, ChatExamples) else {}),
    }


def _wait_for(file: Path, timeout_s: float = 3600) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not file.is_file():
        if time.monotonic() > deadline:
            raise AlambicError(f"{file} did not appear in {timeout_s:.0f} s: the first process (rank 0) starts the "
                               "cache; check its output")
        time.sleep(0.5)


def _check_folder(out: Path, settings: dict, first_process: bool) -> None:
    """``out`` is new, or a cache started with the same settings (only the first process checks that a new ``out``
    is empty: the others may find it started)."""
    file = out / SETTINGS
    if file.is_file():
        previous = json.loads(file.read_text(encoding="utf-8"))
        changed = [k for k in settings if previous.get(k) != settings[k]]
        if changed:
            raise AlambicError(f"{out} holds a teacher cache made with other settings ({', '.join(changed)} "
                               "differ): choose another --out, or rerun the command that started it")
    elif first_process and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AlambicError(f"--out {out} exists and is not a teacher cache; choose another folder")


def _static_masks(examples, first: int, count: int, masker, seed: int):
    """``(masked ids, targets)`` of each example, its masks drawn from a generator seeded by its index."""
    out = []
    for i in range(first, first + count):
        batch = masker([examples[i]], seed=seed * 1_000_003 + i)
        targets = torch.full_like(batch["input_ids"][0], -100)
        targets[batch["lm_positions"]] = batch["lm_targets"]
        out.append((batch["input_ids"][0], targets))
    return out


@torch.inference_mode()
def _shard(teacher, examples, first: int, count: int, settings: dict, masker, padder, batch_size: int,
           device) -> dict[str, torch.Tensor]:
    from alambic.data.chat import chat_targets
    from alambic.losses import topk_targets
    from alambic.modeling import lm_body, lm_head

    if masker is not None:
        pairs = _static_masks(examples, first, count, masker, settings["masking"]["seed"])
    elif settings.get("chat"):
        pairs = [(torch.as_tensor(examples[i].ids), torch.as_tensor(chat_targets(examples[i])))
                 for i in range(first, first + count)]
    else:
        pairs = [(torch.as_tensor(examples[i], dtype=torch.long), None) for i in range(first, first + count)]
    columns = {"input_ids": [], "mlm_targets": [], "topk_ids": [], "topk_log_probs": [], "rest_log_prob": [],
               "hidden": []}
    for start in range(0, len(pairs), batch_size):
        part = pairs[start:start + batch_size]
        padded = padder([p[0].numpy() for p in part])
        ids, mask = padded["input_ids"], padded["attention_mask"]
        hidden = lm_body(teacher)(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        rows = hidden.flatten(0, 1)[mask.reshape(-1).bool().to(device)]  # non-pad tokens, row-major
        top_ids, top_log_probs, rest = topk_targets(lm_head(teacher)(rows), settings["top_k"],
                                                    settings["temperature"])
        columns["topk_ids"].append(top_ids.cpu().to(ids_dtype(settings["vocab_size"])))
        columns["topk_log_probs"].append(top_log_probs.cpu().half())
        columns["rest_log_prob"].append(rest.cpu().float())
        if settings["hidden_states"]:
            columns["hidden"].append(rows.float().cpu().half())
        for example, targets in part:
            columns["input_ids"].append(example.to(torch.int32))
            if targets is not None:
                columns["mlm_targets"].append(targets.to(torch.int32))
    lengths = torch.tensor([len(p[0]) for p in pairs], dtype=torch.int64)
    out = {name: torch.cat(parts).contiguous() for name, parts in columns.items() if parts}
    out["offsets"] = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    return compact_shard(out) if settings["format_version"] >= 2 else out


def _write_atomically(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def _finish(out: Path, settings: dict, n_shards: int, examples_per_shard: int) -> dict | None:
    """The manifest, once every shard is written (by whichever process sees that first)."""
    files = [out / shard_name(s) for s in range(n_shards)]
    if not all(f.is_file() for f in files):
        return None
    from safetensors import safe_open

    shards, tokens, rest_mass = [], 0, 0.0
    for s, file in enumerate(files):
        with safe_open(str(file), framework="pt") as handle:
            rest = handle.get_tensor("rest_log_prob").float()
        count = min(examples_per_shard, settings["examples"] - s * examples_per_shard)
        shards.append({"file": file.name, "examples": count, "rows": len(rest), "bytes": file.stat().st_size})
        tokens += len(rest)
        rest_mass += float(rest.exp().sum())
    manifest = {**settings, "tokens": tokens, "bytes_per_token": sum(s["bytes"] for s in shards) / max(tokens, 1),
                "mean_rest_mass": rest_mass / max(tokens, 1), "shards": shards}
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def cache_teacher(teacher_spec, data, out, *, top_k: int = 32, temperature: float = 1.0, max_length: int = 128,
                  hidden_states: bool = False, batch_size: int = 8, mlm_probability: float = 0.15, seed: int = 0,
                  shard_examples: int = 512, text_field: str = "text", split_documents: str = "file",
                  format_version: int = FORMAT_VERSION, log=print) -> dict | None:
    """Write (or finish) the cache in ``out``; returns its manifest, or None while other processes still write.
    ``format_version``: 2 (default) stores the top-k compactly (:mod:`alambic.offline.compact`, lossy: 6-bit
    log-probabilities), 1 as float16 (exact to float16, 2.7x the bytes at k = 128)."""
    if format_version not in READABLE_VERSIONS:
        raise AlambicError(f"--cache-format {format_version}: use 2 (compact, the default) or 1 (float16)")
    from transformers import AutoConfig, AutoTokenizer

    from alambic.config import DataConfig
    from alambic.data.collate import MaskedLMCollator, PaddingCollator
    from alambic.data.pipeline import training_examples
    from alambic.data.sources import describe_sources
    from alambic.modeling import has_lm_head, model_kind
    from alambic.teachers import load_teacher, resolve_model_path

    out = Path(out)
    rank, world = launched_rank()
    if rank != 0:  # the first process tokenises (into the shared token cache) and starts the folder, then the others
        _wait_for(out / SETTINGS)
    describe_sources(list(data))
    path = resolve_model_path(teacher_spec)
    config = AutoConfig.from_pretrained(path)
    kind = model_kind(config)
    tokenizer = AutoTokenizer.from_pretrained(path)
    data_cfg = DataConfig(train=list(data), max_length=max_length, text_field=text_field,
                          split_documents=split_documents)
    data_cfg.validate()
    examples = training_examples(list(data), tokenizer, kind, data_cfg)
    settings = _settings(teacher_spec, path, config, tokenizer, data, examples, top_k=top_k, temperature=temperature,
                         max_length=max_length, hidden_states=hidden_states, mlm_probability=mlm_probability,
                         seed=seed, shard_examples=shard_examples, kind=kind, format_version=format_version)
    _check_folder(out, settings, first_process=rank == 0)
    n_shards = math.ceil(len(examples) / shard_examples)
    mine = [s for s in range(rank, n_shards, world) if not (out / shard_name(s)).is_file()]
    teacher = load_teacher(teacher_spec)[0] if mine else None
    if teacher is not None and not has_lm_head(teacher):
        raise AlambicError(f"the teacher ({type(teacher).__name__}) has no language-model head, so it has no "
                           "soft targets to cache: give a causal or masked LM")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / SETTINGS, json.dumps(settings, indent=2) + "\n")  # every process writes the same
    if rank == 0:
        tokenizer.save_pretrained(out)
    if mine:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else "cpu"
        teacher.to(device)
        masker = MaskedLMCollator(tokenizer, mlm_probability=mlm_probability) if kind == "masked" else None
        log(f"caching {settings['examples']} examples ({n_shards} shards, {len(mine)} to write by this process) of "
            f"{', '.join(map(str, data))}: top-{settings['top_k']} at T={temperature:g}"
            + (", static masks" if masker else "") + (", hidden states" if hidden_states else ""))
        for s in mine:
            first = s * shard_examples
            count = min(shard_examples, len(examples) - first)
            tensors = _shard(teacher, examples, first, count, settings, masker, PaddingCollator(tokenizer),
                             batch_size, device)
            _write_atomically(tensors, out / shard_name(s))
            log(f"shard {s + 1}/{n_shards}: {count} examples, {len(tensors['rest_log_prob'])} tokens")
    manifest = _finish(out, settings, n_shards, shard_examples)
    if manifest is not None:
        log(f"teacher cache complete in {out}: {manifest['tokens']} tokens, {manifest['bytes_per_token']:.0f} "
            f"bytes per token; the top {manifest['top_k']} hold {100 * (1 - manifest['mean_rest_mass']):.0f}% of the "
            f"teacher's probability at T={temperature:g}")
        if manifest["mean_rest_mass"] > REST_MASS_WARNING:
            log(f"alambic: warning: {100 * manifest['mean_rest_mass']:.0f}% of the teacher's softened probability "
                f"lies outside the top {manifest['top_k']}: the stored soft targets say little beyond them "
                "(docs/offline.md); a lower --temperature or a larger --top-k keeps more")
    return manifest
