"""TinyBERT's data augmentation for task distillation (Jiao et al. 2020; methods.md section 4).

Each example gets ``copies`` augmented versions; in each, every word is replaced with probability ``probability``
by one of its ``candidates`` best substitutes:
- a word that is one token of the model: the model's masked-LM predictions at its position, with the word masked in
  its sentence, or in a window of ``context`` tokens around it in a longer text (all words of a text in batched
  forward passes, shared by every copy: the reference runs one pass per word and copy);
- a word of several tokens, or any word when the model has no MLM head (e.g. MiniLM): its nearest neighbours by
  cosine in the model's input-embedding space (mean of its tokens), where the reference used GloVe vectors.
Substitutes are whole words of the model's vocabulary, in any script (the reference keeps ASCII words only and skips
a stopword list); only words made of letters are replaced, in place, so punctuation, numbers and spacing stay. Both texts of a sentence pair are augmented and stay paired (the
reference mis-pairs them). NER words are replaced one for one, so tags stay aligned. QA is not augmented: a replaced
word inside or around the answer would move or break its span.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from alambic.errors import AlambicError
from alambic.evaluation.speed import max_positions
from alambic.modeling import has_lm_head, lm_head, model_kind
from alambic.tasks.data import ClassificationExample, TokenExample


@dataclass
class AugmentConfig:
    copies: int = 20
    """Augmented copies per example (the reference: 20; 30 for small tasks, 10 for large)."""
    probability: float = 0.4
    """Chance that a word is replaced in a copy (p_t)."""
    candidates: int = 15
    """Substitutes kept per word (K)."""
    seed: int = 0
    batch_size: int = 64
    """Sequences per masked-LM forward pass."""
    context: int = 128
    """Tokens the masked LM sees around each word of a longer text (special tokens included)."""

    def validate(self) -> None:
        if self.copies < 1:
            raise AlambicError(f"--copies must be >= 1, got {self.copies}")
        if not 0 <= self.probability <= 1:
            raise AlambicError(f"--probability must be between 0 and 1, got {self.probability}")
        if self.candidates < 1:
            raise AlambicError(f"--candidates must be >= 1, got {self.candidates}")
        if self.context < 3:
            raise AlambicError(f"--context must be >= 3 tokens, got {self.context}")


class Substitutes:
    """The ``k`` best substitutes of each word of a sentence, from one model and its tokenizer."""

    def __init__(self, model, tokenizer, k: int, batch_size: int = 64, context: int = 128):
        if not getattr(tokenizer, "is_fast", False):
            raise AlambicError("augmentation needs a fast (Rust) tokenizer to map words to tokens")
        self.model, self.tokenizer, self.k, self.batch_size = model.eval(), tokenizer, k, batch_size
        self.context = context  # tokens the masked LM sees around each word, special tokens included
        self.uses_mlm = (has_lm_head(model) and model_kind(model) == "masked"
                         and tokenizer.mask_token_id is not None)
        self.vocab_ids, self.vocab_words = whole_word_vocabulary(tokenizer)
        if len(self.vocab_ids) <= k:
            raise AlambicError(f"the tokenizer has only {len(self.vocab_ids)} whole-word tokens, too few for "
                               f"{k} substitutes per word: lower --candidates")
        embeddings = model.get_input_embeddings().weight.detach().float()
        self.embeddings = embeddings
        self.vocab_ids = self.vocab_ids.to(embeddings.device)
        self.vocab_vectors = F.normalize(embeddings[self.vocab_ids], dim=-1)
        # Longer texts are cut here: their later words keep no substitutes. RoBERTa-style position ids start after
        # the padding index, so those models take two positions fewer than their table holds.
        positions = max_positions(model.config) or 512
        if getattr(model.config, "model_type", "").endswith("roberta"):
            positions -= 2
        self.max_length = min(positions, 512, tokenizer.model_max_length)

    @torch.no_grad()
    def __call__(self, text: str, spans: list[tuple[int, int]]) -> list[list[str]]:
        """Substitutes for the words at character ``spans`` of ``text`` (empty for a word whose tokens do not line
        up with it, or past the model's length)."""
        result: list[list[str]] = [[] for _ in spans]
        encoding = self.tokenizer(text, return_offsets_mapping=True, truncation=True, max_length=self.max_length)
        ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
        pieces: list[list[int]] = []  # token positions of each word
        for begin, end in spans:
            inside = [p for p, (b, e) in enumerate(offsets) if e > b and b >= begin and e <= end]
            aligned = inside and offsets[inside[0]][0] == begin and offsets[inside[-1]][1] == end
            pieces.append(inside if aligned else [])
        by_mlm = [i for i, p in enumerate(pieces) if self.uses_mlm and len(p) == 1]
        by_embedding = [i for i, p in enumerate(pieces) if p and not (self.uses_mlm and len(p) == 1)]
        words = [text[b:e] for b, e in spans]
        if by_mlm:
            for i, found in zip(by_mlm, self._mlm(ids, [pieces[i][0] for i in by_mlm])):
                result[i] = self._keep(found, words[i])
        if by_embedding:
            vectors = torch.stack([self.embeddings[[ids[p] for p in pieces[i]]].mean(0) for i in by_embedding])
            scores = F.normalize(vectors, dim=-1) @ self.vocab_vectors.T
            for i, row in zip(by_embedding, scores.topk(self.k + 1, dim=-1).indices.tolist()):
                result[i] = self._keep(row, words[i])
        return result

    def _windows(self, ids: list[int], positions: list[int]) -> tuple[torch.Tensor, list[int]]:
        """One sequence per position with that token masked: the whole text, or, past ``context`` tokens, the
        ``context - 2`` tokens around it between the text's first and last (special) tokens. All of one length."""
        if len(ids) <= self.context:
            sequences, where = [list(ids) for _ in positions], list(positions)
        else:
            width, inner = self.context - 2, ids[1:-1]
            sequences, where = [], []
            for p in positions:
                start = min(max(p - 1 - width // 2, 0), len(inner) - width)
                sequences.append([ids[0], *inner[start:start + width], ids[-1]])
                where.append(p - start)
        for sequence, p in zip(sequences, where):
            sequence[p] = self.tokenizer.mask_token_id
        return torch.tensor(sequences, device=self.embeddings.device), where

    def _mlm(self, ids: list[int], positions: list[int]) -> list[list[int]]:
        """Top candidates (indices into the whole-word vocabulary) at each position, masked one at a time."""
        device = self.embeddings.device
        found = []
        for start in range(0, len(positions), self.batch_size):
            batch, where = self._windows(ids, positions[start:start + self.batch_size])
            chunk = torch.tensor(where, device=device)
            hidden = self.model.base_model(input_ids=batch, attention_mask=torch.ones_like(batch)).last_hidden_state
            rows = hidden[torch.arange(len(chunk), device=device), chunk]
            logits = lm_head(self.model)(rows).float()[:, self.vocab_ids]
            found += logits.topk(self.k + 1, dim=-1).indices.tolist()
        return found

    def _keep(self, ranked: list[int], word: str) -> list[str]:
        """The first ``k`` ranked vocabulary words other than ``word`` itself, in ``word``'s capitalisation (an
        uncased model proposes lower-case words)."""
        same = word.lower()
        kept = [self.vocab_words[j] for j in ranked if self.vocab_words[j].lower() != same][: self.k]
        if len(word) > 1 and word.isupper():
            return [w.upper() for w in kept]
        return [w[:1].upper() + w[1:] for w in kept] if word[:1].isupper() else kept


def whole_word_vocabulary(tokenizer) -> tuple[torch.Tensor, list[str]]:
    """The tokens that are a whole alphabetic word on their own: the token a word becomes when it follows a space
    (BERT's ``house``, GPT-2 / RoBERTa's ``Ġhouse``, SentencePiece's ``▁house``; not ``##ing`` or a word's middle)."""
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    words = [tokenizer.decode([i]).strip() for i in ids]
    kept = [(i, w) for i, w in zip(ids, words) if w.isalpha()]
    encoded = tokenizer([" " + w for _, w in kept], add_special_tokens=False)["input_ids"]
    kept = [(i, w) for (i, w), e in zip(kept, encoded) if e == [i]]
    return torch.tensor([i for i, _ in kept], dtype=torch.long), [w for _, w in kept]


WORD = re.compile(r"(?<!\w)[^\W\d_]+(?!\w)")  # a word of letters only, in any script ("bn" of "$1.13bn" is not)


def _augment_text(text: str, substitutes: Substitutes, cfg: AugmentConfig, rng: random.Random) -> list[str]:
    """``cfg.copies`` versions of ``text``, words replaced in place (punctuation and spacing kept)."""
    spans = [m.span() for m in WORD.finditer(text)]
    options = substitutes(text, spans)
    copies = []
    for _ in range(cfg.copies):
        parts, last = [], 0
        for (begin, end), choices in zip(spans, options):
            if choices and rng.random() < cfg.probability:
                parts += [text[last:begin], rng.choice(choices)]
                last = end
        copies.append("".join(parts) + text[last:])
    return copies


def _augment_words(words: list[str], substitutes: Substitutes, cfg: AugmentConfig, rng: random.Random):
    """``cfg.copies`` versions of a word list (NER), alphabetic words replaced one for one."""
    text, spans, position = " ".join(words), [], 0
    for word in words:
        spans.append((position, position + len(word)))
        position += len(word) + 1
    options = substitutes(text, spans)
    return [[rng.choice(choices) if choices and WORD.fullmatch(word) and rng.random() < cfg.probability else word
             for word, choices in zip(words, options)] for _ in range(cfg.copies)]


def augment_examples(task: str, examples: list, substitutes: Substitutes, cfg: AugmentConfig, progress=None) -> list:
    """Each example followed by its ``cfg.copies`` augmented copies (labels and tags kept)."""
    if task == "qa":
        raise AlambicError("QA examples are not augmented: a replaced word could move or break the answer span; "
                           "augment classification or NER data")
    cfg.validate()
    rng = random.Random(cfg.seed)
    out = []
    for n, example in enumerate(examples):
        out.append(example)
        if task == "ner":
            out += [TokenExample(words, list(example.tags)) for words in _augment_words(example.words, substitutes,
                                                                                         cfg, rng)]
        else:
            texts = _augment_text(example.text, substitutes, cfg, rng)
            pairs = (_augment_text(example.text_pair, substitutes, cfg, rng) if example.text_pair is not None
                     else [None] * cfg.copies)
            out += [ClassificationExample(t, example.label, pair) for t, pair in zip(texts, pairs)]
        if progress is not None:
            progress(n + 1)
    return out


def write_examples(task: str, examples: list, path: Path) -> Path:
    """Classification as JSONL records (``text``, ``text_pair``, ``label``); NER as a CoNLL file (token, tag)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    with tmp.open("w", encoding="utf-8") as handle:
        for example in examples:
            if task == "ner":
                handle.write("".join(f"{w} {t}\n" for w, t in zip(example.words, example.tags)) + "\n")
            else:
                record = {"text": example.text, "label": example.label}
                if example.text_pair is not None:
                    record["text_pair"] = example.text_pair
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path
