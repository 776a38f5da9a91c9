"""Token ids computed once per (data, tokenizer, options), kept on disk and memory-mapped.

Tokenising a corpus costs minutes and every epoch, resume and evaluation needs the same ids, so they are cached
under a key that changes when the files, the tokenizer or the options do. Examples (encoder chunks, decoder
blocks) are index arrays into the memory map, so a corpus larger than RAM costs only its offsets in memory.
"""

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alambic.cache import atomic_directory, cache_dir
from alambic.data.sources import describe_sources, read_documents
from alambic.errors import AlambicError

FORMAT_VERSION = 2  # 2: meta.json counts the unknown tokens
TOKENIZE_BATCH = 256
UNKNOWN_WARNING_SHARE = 0.5


@dataclass
class TokenizedCorpus:
    """All documents' ids in one flat array; document ``i`` is ``tokens[offsets[i]:offsets[i + 1]]``."""

    tokens: np.ndarray  # (T,) uint16 | uint32, memory-mapped
    offsets: np.ndarray  # (D + 1,) int64
    vocab_size: int
    path: Path
    from_cache: bool  # False when this call tokenised, so callers and tests can tell a reuse from a rebuild
    unknown_tokens: int = 0  # tokens that are the tokenizer's unknown token

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def document(self, index: int) -> np.ndarray:
        return self.tokens[self.offsets[index]:self.offsets[index + 1]]

    def token_counts(self) -> np.ndarray:
        """How often each id occurs, (vocab_size,) int64: the input of frequency-smoothed masking."""
        counts = np.zeros(self.vocab_size, dtype=np.int64)
        step = 1 << 24  # slices, so a billion-token map is never widened to int64 all at once
        for start in range(0, len(self.tokens), step):
            counts += np.bincount(self.tokens[start:start + step], minlength=self.vocab_size)
        return counts


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes when the ids a text maps to could change: class, size and the full vocab / normaliser / merges."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)  # call-time settings, not part of what ids mean
        state.pop("padding", None)
        body = json.dumps(state, sort_keys=True)
    else:
        body = json.dumps(sorted(tokenizer.get_vocab().items()))
    digest = hashlib.sha256(body.encode()).hexdigest()
    return f"{type(tokenizer).__name__}:{len(tokenizer)}:{digest}"


def build_or_load(specs, tokenizer, *, text_field: str = "text", split_documents: str = "file") -> TokenizedCorpus:
    """The cached corpus for these inputs, tokenising only when no complete cache entry exists."""
    key_source = json.dumps({
        "sources": describe_sources(specs), "tokenizer": tokenizer_fingerprint(tokenizer),
        "text_field": text_field, "split_documents": split_documents, "format": FORMAT_VERSION,
    }, sort_keys=True)
    final = cache_dir("tokens") / hashlib.sha256(key_source.encode()).hexdigest()[:32]
    from_cache = (final / "meta.json").exists()
    if not from_cache:
        documents = read_documents(specs, text_field=text_field, split_documents=split_documents)
        with atomic_directory(final) as tmp:
            _write(tmp, documents, tokenizer, key_source)
    corpus = _load(final, from_cache=from_cache)
    share = corpus.unknown_tokens / max(1, len(corpus.tokens))
    if share >= UNKNOWN_WARNING_SHARE:
        print(f"warning: {100 * share:.0f}% of the tokens of {', '.join(map(str, specs))} are the tokenizer's unknown "
              f"token {tokenizer.unk_token!r}: most of this text is outside the teacher's vocabulary (DistilBERT's "
              "reference dropped sequences that were >= 50% unknown); check the language and the tokenizer",
              file=sys.stderr)
    return corpus


def tokenize_checked(tokenizer, items: list, encode, what: str = "document", first: int = 0, text_of=str):
    """``encode(items)``; when the tokenizer fails (the tokenizers library raises plain Exception), one clear error
    naming the first item that fails (``what`` number ``first + i + 1``, with its opening ``text_of(item)``) and
    the reason."""
    try:
        return encode(items)
    except Exception as error:
        offset = 0
        for offset, item in enumerate(items):
            try:
                encode([item])
            except Exception as one:
                error = one
                break
        text = text_of(items[offset])
        hint = ("this tokenizer has no unknown token, so characters outside its vocabulary cannot be encoded: "
                "remove or transliterate them, or use a tokenizer with an unknown token"
                if tokenizer.unk_token is None else "check the text's encoding and the tokenizer")
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise AlambicError(f"the tokenizer cannot encode {what} {first + offset + 1} ({text[:40]!r}...): {reason}; "
                           f"{hint}") from None


def _encode(tokenizer, batch: list[str], first: int) -> list[list[int]]:
    return tokenize_checked(tokenizer, batch, lambda texts: tokenizer(
        texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False,
        verbose=False)["input_ids"], first=first)


def _write(folder: Path, documents: list[str], tokenizer, key_source: str) -> None:
    """Stream ids to disk batch by batch (fast tokenizers batch in Rust), never holding the whole corpus."""
    vocab_size = len(tokenizer)
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    lengths, unknown, unk_id = [], 0, tokenizer.unk_token_id
    with open(folder / "tokens.bin", "wb") as handle:
        for start in range(0, len(documents), TOKENIZE_BATCH):
            for row in _encode(tokenizer, documents[start:start + TOKENIZE_BATCH], start):
                row = np.asarray(row, dtype=dtype)
                row.tofile(handle)
                lengths.append(len(row))
                if unk_id is not None:
                    unknown += int((row == unk_id).sum())
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
    if offsets[-1] == 0:
        raise AlambicError("the data tokenises to no tokens at all: check the files and the tokenizer")
    np.save(folder / "offsets.npy", offsets)
    meta = {"vocab_size": vocab_size, "dtype": np.dtype(dtype).name, "num_documents": len(documents),
            "num_tokens": int(offsets[-1]), "unknown_tokens": unknown, "key": json.loads(key_source)}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))


def _load(folder: Path, *, from_cache: bool) -> TokenizedCorpus:
    meta = json.loads((folder / "meta.json").read_text())
    tokens = np.memmap(folder / "tokens.bin", dtype=meta["dtype"], mode="r")
    return TokenizedCorpus(tokens, np.load(folder / "offsets.npy"), meta["vocab_size"], folder, from_cache,
                           meta["unknown_tokens"])


def special_wrapping(tokenizer) -> tuple[list[int], list[int]]:
    """The ids a tokenizer puts before and after one sequence: ([CLS], [SEP]) for BERT, (<s>, </s>) for RoBERTa.

    transformers 5 fast tokenizers no longer have ``build_inputs_with_special_tokens``; their post-processor is
    observed on a probe text instead, which covers any template.
    """
    build = getattr(tokenizer, "build_inputs_with_special_tokens", None)
    content = tokenizer("alambic probe", add_special_tokens=False)["input_ids"]
    wrapped = build(list(content)) if build is not None else tokenizer("alambic probe")["input_ids"]
    for start in range(len(wrapped) - len(content) + 1):
        if wrapped[start:start + len(content)] == content:
            return list(wrapped[:start]), list(wrapped[start + len(content):])
    raise AlambicError(f"cannot tell where {type(tokenizer).__name__} puts its special tokens: "
                       "use a tokenizer whose single-sequence template is prefix + text + suffix")


class EncoderChunks:
    """Documents cut into chunks that fit ``max_length`` once the tokenizer's special tokens are added.

    Chunks never cross documents, so an encoder never attends across unrelated texts.
    """

    def __init__(self, corpus: TokenizedCorpus, tokenizer, max_length: int, min_tokens: int = 8):
        self.corpus = corpus
        self.prefix, self.suffix = special_wrapping(tokenizer)
        content = max_length - len(self.prefix) - len(self.suffix)
        if content < 1:
            raise AlambicError(f"a max length of {max_length} tokens leaves no room for text after "
                               f"{len(self.prefix) + len(self.suffix)} special tokens: raise --max-length "
                               "(data.max_length)")
        doc_lengths = np.diff(corpus.offsets)
        per_doc = -(-doc_lengths // content)  # ceil division
        first_chunk = np.repeat(np.cumsum(per_doc) - per_doc, per_doc)
        within = np.arange(per_doc.sum()) - first_chunk  # chunk number inside its document
        doc = np.repeat(np.arange(len(doc_lengths)), per_doc)
        starts = corpus.offsets[:-1][doc] + within * content
        lengths = np.minimum(content, corpus.offsets[1:][doc] - starts)
        keep = lengths >= min_tokens
        self.starts, self.content_lengths = starts[keep].astype(np.int64), lengths[keep].astype(np.int64)
        if len(self.starts) == 0:
            raise AlambicError(f"no chunk of the data has {min_tokens} tokens or more: add text or lower min_tokens")

    @property
    def lengths(self) -> np.ndarray:
        """Lengths with special tokens, for length-grouped batching."""
        return self.content_lengths + len(self.prefix) + len(self.suffix)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> np.ndarray:
        start = self.starts[index]
        body = self.corpus.tokens[start:start + self.content_lengths[index]].astype(np.int64)
        return np.concatenate([self.prefix, body, self.suffix]).astype(np.int64)


def encoder_chunks(corpus: TokenizedCorpus, tokenizer, max_length: int, min_tokens: int = 8) -> EncoderChunks:
    return EncoderChunks(corpus, tokenizer, max_length, min_tokens)


class PackedBlocks:
    """Fixed-length blocks cut from one stream: [BOS] doc EOS [BOS] doc EOS ..., the short tail dropped.

    The stream is never materialised: a block is assembled from the memory map on demand.
    """

    def __init__(self, corpus: TokenizedCorpus, tokenizer, block_length: int):
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        if eos is None:
            raise AlambicError(f"{type(tokenizer).__name__} has no EOS token to separate documents: "
                               "use a causal-LM tokenizer or set tokenizer.eos_token")
        bos = tokenizer.bos_token_id
        self.corpus, self.block_length, self.eos = corpus, block_length, eos
        self.bos = bos if bos is not None and bos != eos else None
        doc_lengths = np.diff(corpus.offsets)
        self.docs = np.flatnonzero(doc_lengths > 0)
        span = doc_lengths[self.docs] + 1 + (self.bos is not None)
        self.stream_starts = np.concatenate([[0], np.cumsum(span)]).astype(np.int64)
        total = int(self.stream_starts[-1])
        if total < block_length:
            raise AlambicError(f"the data has {total} tokens, fewer than one block of {block_length}: "
                               "add text or lower --max-length (data.max_length)")
        self.num_blocks = total // block_length

    @property
    def lengths(self) -> np.ndarray:
        return np.full(self.num_blocks, self.block_length, dtype=np.int64)

    def __len__(self) -> int:
        return self.num_blocks

    def describe(self) -> str:
        return (f"raw text: {len(self.docs)} documents, {int(self.stream_starts[-1]):,} tokens in {self.num_blocks:,} "
                f"blocks of {self.block_length}")

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < self.num_blocks:
            raise IndexError(index)
        start = index * self.block_length
        stop = start + self.block_length
        out = np.empty(self.block_length, dtype=np.int64)
        k = int(np.searchsorted(self.stream_starts, start, side="right")) - 1  # the document holding `start`
        pos = start
        while pos < stop:
            local = pos - self.stream_starts[k]
            if self.bos is not None:
                if local == 0:
                    out[pos - start], pos = self.bos, pos + 1
                    continue
                local -= 1
            doc = self.docs[k]
            size = self.corpus.offsets[doc + 1] - self.corpus.offsets[doc]
            if local < size:
                take = min(size - local, stop - pos)
                begin = self.corpus.offsets[doc] + local
                out[pos - start:pos - start + take] = self.corpus.tokens[begin:begin + take]
                pos += take
            else:
                out[pos - start], pos, k = self.eos, pos + 1, k + 1
        return out


def packed_blocks(corpus: TokenizedCorpus, tokenizer, block_length: int) -> PackedBlocks:
    return PackedBlocks(corpus, tokenizer, block_length)
