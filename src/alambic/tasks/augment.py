"""TinyBERT's data augmentation for task distillation (Jiao et al. 2020; methods.md section 4).

Each example gets ``copies`` augmented versions; in each, every word is replaced with probability ``probability``
by one of its ``candidates`` best substitutes:
- a word that is one token of the model: the model's masked-LM predictions at its position, with the word masked in
  its sentence (all words of a sentence in one batched forward pass, shared by every copy: the reference runs one
  pass per word);
- a word of several tokens, or any word when the model has no MLM head (e.g. MiniLM): its nearest neighbours by
  cosine in the model's input-embedding space (mean of its tokens), where the reference used GloVe vectors.
Substitutes are whole words of the model's vocabulary, in any script (the reference keeps ASCII words only and skips
a stopword list); only alphabetic words are replaced. Both texts of a sentence pair are augmented and stay paired (the
reference mis-pairs them). NER words are replaced one for one, so tags stay aligned. QA is not augmented: a replaced
word inside or around the answer would move or break its span.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from alambic.errors import AlambicError
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

    def validate(self) -> None:
        if self.copies < 1:
            raise AlambicError(f"--copies must be >= 1, got {self.copies}")
        if not 0 <= self.probability <= 1:
            raise AlambicError(f"--probability must be between 0 and 1, got {self.probability}")
        if self.candidates < 1:
            raise AlambicError(f"--candidates must be >= 1, got {self.candidates}")


class Substitutes:
    """The ``k`` best substitutes of each word of a sentence, from one model and its tokenizer."""

    def __init__(self, model, tokenizer, k: int, batch_size: int = 64):
        if not getattr(tokenizer, "is_fast", False):
            raise AlambicError("augmentation needs a fast (Rust) tokenizer to map words to tokens")
        self.model, self.tokenizer, self.k, self.batch_size = model.eval(), tokenizer, k, batch_size
        self.uses_mlm = (has_lm_head(model) and model_kind(model) == "masked"
                         and tokenizer.mask_token_id is not None)
        self.vocab_ids, self.vocab_words = whole_word_vocabulary(tokenizer)
        if len(self.vocab_ids) <= k:
            raise AlambicError(f"the tokenizer has only {len(self.vocab_ids)} whole-word tokens, too few for "
                               f"{k} substitutes per word: lower --candidates")
        embeddings = model.get_input_embeddings().weight.detach().float()
        self.embeddings = embeddings
        self.vocab_vectors = F.normalize(embeddings[self.vocab_ids], dim=-1)

    @torch.no_grad()
    def __call__(self, words: list[str]) -> list[list[str]]:
        """Substitutes per word (empty for words that are not alphabetic or fall past the model's length)."""
        result: list[list[str]] = [[] for _ in words]
        text = " ".join(words)
        starts, position = [], 0
        for word in words:
            starts.append(position)
            position += len(word) + 1
        encoding = self.tokenizer(text, return_offsets_mapping=True, truncation=True,
                                  max_length=min(self.tokenizer.model_max_length, 512))
        ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
        pieces: list[list[int]] = [[] for _ in words]  # token positions of each word
        word = 0
        for position, (begin, end) in enumerate(offsets):
            if end <= begin:
                continue  # special tokens
            while word + 1 < len(words) and begin >= starts[word + 1]:
                word += 1
            pieces[word].append(position)
        replaceable = [i for i, w in enumerate(words) if w.isalpha() and pieces[i]]
        by_mlm = [i for i in replaceable if self.uses_mlm and len(pieces[i]) == 1]
        by_embedding = [i for i in replaceable if i not in set(by_mlm)]
        if by_mlm:
            for i, found in zip(by_mlm, self._mlm(ids, [pieces[i][0] for i in by_mlm])):
                result[i] = self._keep(found, words[i])
        if by_embedding:
            vectors = torch.stack([self.embeddings[[ids[p] for p in pieces[i]]].mean(0) for i in by_embedding])
            scores = F.normalize(vectors, dim=-1) @ self.vocab_vectors.T
            for i, row in zip(by_embedding, scores.topk(self.k + 1, dim=-1).indices.tolist()):
                result[i] = self._keep(row, words[i])
        return result

    def _mlm(self, ids: list[int], positions: list[int]) -> list[list[int]]:
        """Top candidates (indices into the whole-word vocabulary) at each position, masked one at a time."""
        device = self.embeddings.device
        base = torch.tensor(ids, device=device)
        found = []
        for start in range(0, len(positions), self.batch_size):
            chunk = torch.tensor(positions[start:start + self.batch_size], device=device)
            batch = base.repeat(len(chunk), 1)
            batch[torch.arange(len(chunk), device=device), chunk] = self.tokenizer.mask_token_id
            hidden = self.model.base_model(input_ids=batch, attention_mask=torch.ones_like(batch)).last_hidden_state
            rows = hidden[torch.arange(len(chunk), device=device), chunk]
            logits = lm_head(self.model)(rows).float()[:, self.vocab_ids]
            found += logits.topk(self.k + 1, dim=-1).indices.tolist()
        return found

    def _keep(self, ranked: list[int], word: str) -> list[str]:
        """The first ``k`` ranked vocabulary words other than ``word`` itself."""
        same = word.lower()
        return [self.vocab_words[j] for j in ranked if self.vocab_words[j].lower() != same][: self.k]


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


def _replace(words: list[str], substitutes: list[list[str]], probability: float, rng: random.Random) -> list[str]:
    return [rng.choice(options) if options and rng.random() < probability else word
            for word, options in zip(words, substitutes)]


def augment_examples(task: str, examples: list, substitutes: Substitutes, cfg: AugmentConfig, progress=None) -> list:
    """Each example followed by its ``cfg.copies`` augmented copies (labels and tags kept)."""
    if task == "qa":
        raise AlambicError("QA examples are not augmented: a replaced word could move or break the answer span; "
                           "augment classification or NER data")
    cfg.validate()
    rng = random.Random(cfg.seed)
    out = []
    for n, example in enumerate(examples):
        if task == "ner":
            options = substitutes(example.words)
            out.append(example)
            out += [TokenExample(_replace(example.words, options, cfg.probability, rng), list(example.tags))
                    for _ in range(cfg.copies)]
        else:
            texts = [example.text] + ([example.text_pair] if example.text_pair is not None else [])
            split = [t.split() for t in texts]
            options = [substitutes(words) for words in split]
            out.append(example)
            for _ in range(cfg.copies):
                new = [" ".join(_replace(w, o, cfg.probability, rng)) for w, o in zip(split, options)]
                out.append(ClassificationExample(new[0], example.label, new[1] if len(new) > 1 else None))
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
