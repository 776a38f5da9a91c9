"""The on-disk format of offline teacher outputs (``alambic cache-teacher``), versions 1 and 2.

A cache folder holds ``manifest.json``, the teacher's tokenizer, and shards ``shard-00000.safetensors``... Each
shard covers consecutive training examples (the packed blocks of decoders, the chunks of encoders, exactly as
``alambic distill`` builds them from the same data, tokenizer and ``max_length``) and stores, for every token of
them, one row:

| tensor | shape, dtype | meaning |
| --- | --- | --- |
| ``offsets`` | (n + 1,) int64 | where each example's rows start (rows of one example are its tokens, in order) |
| ``input_ids`` | (T,) int32 | the tokens the teacher saw (for encoders: with the static masks applied) |
| ``mlm_targets`` | (T,) int32 | encoders only: the original token where a mask was placed, else -100 |
| ``topk_ids`` | (T, k) uint16 (vocabularies up to 65,536) or int32 | the teacher's k most probable next / masked tokens |
| ``topk_log_probs`` | (T, k) float16 | their log-probabilities at the cache's temperature |
| ``rest_log_prob`` | (T,) float32 | ``log(1 - sum of the k probabilities)``, -inf when k = V |
| ``hidden`` | (T, d) float16 | optional: the teacher's last hidden states (the cosine term) |

so a token costs ``4 + k (2 + 2) + 4`` bytes (k = 32: 136 bytes; +4 for encoders; +2d with hidden states).

Format 2 (the default since issue 22) replaces ``topk_ids`` and ``topk_log_probs`` by their compact encoding
(:mod:`alambic.offline.compact`: ids delta-coded, log-probabilities as 6-bit gaps below the row's maximum, LZMA2 over
blocks of examples), under 200 bytes per token at k = 128 where format 1 takes 520:

| tensor | shape, dtype | meaning |
| --- | --- | --- |
| ``top_log_prob`` | (T,) float16 | each row's largest log-probability |
| ``rest_log_prob`` | (T,) float16 | as in format 1 |
| ``packed`` | (B,) uint8 | the compressed blocks, one after the other |
| ``block_examples`` | (b + 1,) int64 | the first example of each block (the last entry: n) |
| ``block_bytes`` | (b + 1,) int64 | where each block starts in ``packed`` |

Both formats are read; the rows come back the same way (ids of format 2 in ascending order, not by probability: the
losses do not depend on the order). The
manifest records what a cache is only valid for: format version, teacher fingerprint, tokenizer hash, data specs and
the hash of the examples' token ids, ``max_length``, k, temperature, masking, the mean probability outside the top k
(``mean_rest_mass``), and each shard's file, examples, rows and bytes. :func:`check_cache` refuses, in one line, a
cache that does not match a run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from alambic.errors import AlambicError

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
SETTINGS = "settings.json"
"""Written when a cache starts: a resumed or parallel run must use the same settings."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def examples_hash(examples) -> str:
    """sha256 of every example's token ids, in order: equal exactly when a run would train on the same sequences."""
    digest = hashlib.sha256()
    for i in range(len(examples)):
        example = examples[i]
        ids = np.asarray(getattr(example, "ids", example), dtype=np.int32)  # a chat example: its ids and mask
        digest.update(len(ids).to_bytes(4, "little"))
        digest.update(ids.tobytes())
        if hasattr(example, "assistant"):
            digest.update(np.packbits(example.assistant).tobytes())
    return digest.hexdigest()


def ids_dtype(vocab_size: int) -> torch.dtype:
    return torch.uint16 if vocab_size <= 2**16 else torch.int32


def read_manifest(folder) -> dict:
    folder = Path(folder)
    file = folder / MANIFEST
    if not file.is_file():
        partial = (folder / SETTINGS).is_file()
        raise AlambicError(f"{folder} is not a finished teacher cache (no {MANIFEST}): " + (
            "run the same `alambic cache-teacher` command again to finish it" if partial else
            "make one with `alambic cache-teacher --teacher T --data D --out DIR`"))
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise AlambicError(f"{file} is not readable JSON ({error}); make the cache again") from None
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise AlambicError(f"{folder} is a teacher cache of format {manifest.get('format_version')}, this alambic "
                           f"reads formats {' and '.join(map(str, READABLE_VERSIONS))}: make the cache again")
    for shard in manifest["shards"]:
        path = folder / shard["file"]
        if not path.is_file() or path.stat().st_size != shard["bytes"]:
            raise AlambicError(f"{path} is missing or has another size than its manifest says: the cache is "
                               "incomplete or damaged; make it again")
    return manifest


def check_cache(manifest: dict, *, max_length: int, temperature: float, needs_hidden: bool, folder,
                tokenizer_hash: str | None = None, kind: str | None = None, data_hash: str | None = None,
                student_vocab_size: int | None = None, student_hidden_size: int | None = None) -> None:
    """One line for the first way ``manifest`` does not fit the run about to read it. The settings are checked
    before any model loads; the student's tokenizer and kind, and the data, once they are known (None: later)."""
    where = f"the teacher cache {folder}"
    if tokenizer_hash is not None and manifest["tokenizer_hash"] != tokenizer_hash:
        raise AlambicError(f"{where} was made with another tokenizer than the student's: cache the teacher with the "
                           "student's vocabulary (students built by alambic share their teacher's)")
    if kind is not None and manifest["kind"] != kind:
        raise AlambicError(f"{where} holds {manifest['kind']}-LM outputs but the student is a {kind} LM")
    if manifest["max_length"] != max_length:
        raise AlambicError(f"{where} was made with max_length {manifest['max_length']}, the run uses {max_length}: "
                           f"set data.max_length={manifest['max_length']} or cache again")
    if abs(manifest["temperature"] - temperature) > 1e-9:
        raise AlambicError(f"{where} stores the teacher at temperature {manifest['temperature']:g}, the run's "
                           f"loss.temperature is {temperature:g}: set loss.temperature={manifest['temperature']:g} "
                           "or cache again with --temperature")
    if data_hash is not None and manifest["data_hash"] != data_hash:
        raise AlambicError(f"{where} was made on other data ({', '.join(manifest['data'])}) than the run's: leave "
                           "data.train empty to train on the cached sequences, or cache this data")
    if needs_hidden and not manifest["hidden_states"]:
        raise AlambicError(f"{where} has no hidden states, which the cosine term needs: set loss.alpha_cos=0 or "
                           "cache again with --hidden-states")
    if student_vocab_size is not None and student_vocab_size != manifest["vocab_size"]:
        raise AlambicError(f"{where} holds a teacher with {manifest['vocab_size']} output rows, the student has "
                           f"{student_vocab_size}: resize the student's embeddings to {manifest['vocab_size']} rows")
    if student_hidden_size is not None and manifest["hidden_size"] != student_hidden_size:
        raise AlambicError(f"{where} stores hidden states of width {manifest['hidden_size']}, the student's are "
                           f"{student_hidden_size}: the cosine term needs equal widths, set loss.alpha_cos=0")


@dataclass
class CachedExample:
    input_ids: np.ndarray
    mlm_targets: np.ndarray | None
    rows: slice
    shard: int


_SAFETENSORS_DTYPES = {"I64": np.int64, "I32": np.int32, "U16": np.uint16, "U8": np.uint8, "F16": np.float16,
                       "F32": np.float32}
"""The dtypes a cache shard holds (see the table above)."""


class ShardReader:
    """Rows of one safetensors shard, read on demand: each read opens the file, ``pread``s the rows' bytes and
    closes it. Nothing is mapped, kept or left open, so neither the memory a run holds nor its open files grow with
    the cache (a 1B-token cache at 136 B/token is 136 GB, in thousands of shards)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as file:
            (size,) = np.frombuffer(file.read(8), dtype="<u8")
            header = json.loads(file.read(int(size)))
        header.pop("__metadata__", None)
        self.start = 8 + int(size)
        self.tensors = header

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def rows(self, name: str, begin: int, end: int) -> torch.Tensor:
        """Rows ``begin:end`` (first dimension) of tensor ``name``."""
        import os

        info = self.tensors[name]
        dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
        shape = info["shape"]
        row_bytes = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
        first = self.start + info["data_offsets"][0] + begin * row_bytes
        with open(self.path, "rb") as file:
            data = os.pread(file.fileno(), (end - begin) * row_bytes, first)
        if len(data) != (end - begin) * row_bytes:
            raise AlambicError(f"{self.path} is shorter than its header says (cut while copying?): cache again")
        return torch.from_numpy(np.frombuffer(data, dtype=dtype).reshape(end - begin, *shape[1:]).copy())

    def whole(self, name: str) -> torch.Tensor:
        return self.rows(name, 0, self.tensors[name]["shape"][0])


class TeacherOutputs:
    """The cache's examples and their teacher rows, streamed: each read takes only the rows a batch needs from its
    shard; only the shards' small offset tables are kept."""

    def __init__(self, folder, manifest: dict):
        self.folder, self.manifest = Path(folder), manifest
        self._readers: dict[int, ShardReader] = {}
        self._offsets: dict[int, np.ndarray] = {}
        self._blocks: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # format 2: each shard's block rows and bytes
        self._decoded: tuple | None = None  # format 2: the last block decoded (consecutive examples share it)
        self.starts = np.cumsum([0] + [s["examples"] for s in manifest["shards"]])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int) -> "CachedExample":
        return self.example(index)

    def _reader(self, index: int) -> ShardReader:
        if index not in self._readers:
            self._readers[index] = ShardReader(self.folder / self.manifest["shards"][index]["file"])
            self._offsets[index] = self._readers[index].whole("offsets").numpy()
        return self._readers[index]

    def example(self, index: int) -> CachedExample:
        shard = int(np.searchsorted(self.starts, index, side="right") - 1)
        reader = self._reader(shard)
        local = index - int(self.starts[shard])
        start, end = int(self._offsets[shard][local]), int(self._offsets[shard][local + 1])
        targets = reader.rows("mlm_targets", start, end).numpy().astype(np.int64) if "mlm_targets" in reader else None
        return CachedExample(reader.rows("input_ids", start, end).numpy().astype(np.int64), targets,
                             slice(start, end), shard)

    @property
    def lengths(self) -> np.ndarray:
        for i in range(len(self.starts) - 1):
            self._reader(i)
        return np.concatenate([np.diff(self._offsets[i]) for i in range(len(self.starts) - 1)])

    def rows(self, examples: list[CachedExample]) -> dict[str, torch.Tensor]:
        """The teacher rows of ``examples``, concatenated in order (= the batch's non-pad tokens, row-major)."""
        compact = self.manifest["format_version"] >= 2
        names = ["rest_log_prob"] + ([] if compact else ["topk_ids", "topk_log_probs"]) + (
            ["hidden"] if self.manifest["hidden_states"] else [])
        parts = {name: [self._reader(e.shard).rows(name, e.rows.start, e.rows.stop) for e in examples]
                 for name in names}
        out = {name: torch.cat(chunks) for name, chunks in parts.items()}
        out["rest_log_prob"] = out["rest_log_prob"].float()
        if compact:
            decoded = [self._compact_rows(e) for e in examples]
            out["topk_ids"] = torch.cat([ids for ids, _ in decoded])
            log_probs = torch.cat([lp for _, lp in decoded])
            # the quantised probabilities and the rest sum to 1 +- the quantisation: renormalise, so that every
            # divergence against them is a divergence between distributions (>= 0)
            total = torch.logaddexp(log_probs.logsumexp(-1), out["rest_log_prob"])
            out["topk_log_probs"] = log_probs - total[:, None]
            out["rest_log_prob"] = out["rest_log_prob"] - total
        out["topk_ids"] = out["topk_ids"].to(torch.int64)
        return out

    def _compact_rows(self, example: CachedExample) -> tuple[torch.Tensor, torch.Tensor]:
        """Format 2: decode the block ``example`` lies in (kept for the next example) and take its rows."""
        from alambic.offline.compact import decode_block

        reader = self._reader(example.shard)
        if example.shard not in self._blocks:
            first_rows = self._offsets[example.shard][reader.whole("block_examples").numpy()]
            self._blocks[example.shard] = (first_rows, reader.whole("block_bytes").numpy())
        first_rows, block_bytes = self._blocks[example.shard]
        block = int(np.searchsorted(first_rows, example.rows.start, side="right") - 1)
        key = (example.shard, block)
        if self._decoded is None or self._decoded[0] != key:
            begin, end = int(first_rows[block]), int(first_rows[block + 1])
            blob = reader.rows("packed", int(block_bytes[block]), int(block_bytes[block + 1])).numpy().tobytes()
            self._decoded = (key, *decode_block(blob, reader.rows("top_log_prob", begin, end), self.manifest["top_k"]))
        _, ids, log_probs = self._decoded
        start = example.rows.start - int(first_rows[block])
        length = example.rows.stop - example.rows.start
        return ids[start:start + length], log_probs[start:start + length]
