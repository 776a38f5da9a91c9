"""Instruct models evaluated without a judge model: what each answers to held-out chat prompts, scored against the
gold answers and, given a teacher, against the teacher (``alambic eval-chat``).

Every model answers the same prompts (each record's messages before its final assistant turn, rendered with the
shared chat template), greedily by default, with at most ``max_new_tokens`` new tokens. Per model:

- ``rouge_l``: ROUGE-L F1 of the answer against the record's final assistant turn, averaged over records. Computed by
  the ``rouge-score`` package (Lin 2004: F1 of the longest common subsequence of words) with its tokenisation made
  Unicode-aware: lowercase, words are runs of letters and digits (rouge-score's own keeps ``[a-z0-9]`` only, which
  scores Korean text 0; on ASCII text the two agree). No stemming. Two answers without any word score 1.0 (equal),
  where rouge-score says 0.
- ``accuracy`` (records with ``options`` only): the generated answer is right when its normalised words (lowercase,
  punctuation removed, whitespace collapsed) *begin with* the normalised gold answer's words: "Business." and
  "business news" answer "business"; "sports" does not answer "sport". Equality would fail every chatty but right
  answer; containment would reward listing every option.
- ``option_accuracy`` (records with ``options`` only, lm-eval's multiple-choice ``acc``): each option is scored by the
  model's log-likelihood of answering exactly it, ``sum_t log p(option_t | prompt, option_<t)`` over the option's
  tokens *plus the end-of-turn token* (the tokenizer's EOS, where generation stops), so an option that is a prefix of
  another ("sport" / "sports") is not favoured for being short; the prediction is the argmax.
  ``option_accuracy_norm``: the argmax of that sum divided by the option's length in UTF-8 bytes (lm-eval's
  ``acc_norm``). The option's tokens are those of the prompt text followed by the option, tokenised together (as
  training tokenises a conversation), after the prompt's tokens.
- ``mean_tokens``: mean answer length in tokens, the end-of-turn token not counted; ``hit_max_new_tokens``: the
  share of answers cut off at ``max_new_tokens`` before their end-of-turn token.

With a teacher (which answers the same prompts with the same settings):

- ``rouge_l_teacher``: ROUGE-L F1 of the model's answers against the teacher's;
- ``teacher_nll``: how plausible the teacher finds the model's answers, ``-(1/N) sum log p_teacher(y_t | prompt,
  y_<t)`` over every token ``y_t`` of every answer (end-of-turn token included when produced);
- ``forward_kl``: ``(1/N) sum_t KL(p_teacher(. | x, y_<t) || p_model(. | x, y_<t))`` at temperature 1 over every
  token position of the *teacher's* answers, both models teacher-forced on the same tokens: how far the model's
  next-token distributions are from the teacher's where the teacher would go, the quantity forward-KL distillation
  minimises. 0 for the teacher itself.

Means over tokens pool every token of every answer. Scores are computed in fp32 from the logits of answer positions
only, projected onto the vocabulary in chunks of rows, so long answers and large vocabularies stay in memory.

A GGUF export run by llama.cpp (``alambic.export.runtime``) is evaluated the same way, with what that runtime offers:
greedy answers from llama.cpp's own key-value cache, one prompt at a time, and every score from the full logits of
whole sequences (prompt and answer, or prompt and option) instead of hidden rows and a shared prompt cache.
"""

from __future__ import annotations

import functools
import re
import string
import unicodedata
from dataclasses import dataclass, field

import torch

from alambic.data.chat import ChatRecord, check_chat_template, prompt_ids
from alambic.data.collate import pad_id_of, pad_rows
from alambic.errors import AlambicError
from alambic.modeling import eos_token_ids, lm_body, lm_head, model_device

ROW_CHUNK = 512
"""Rows projected onto the vocabulary at once (512 x a 150k vocabulary x 4 bytes = 300 MB per logits tensor)."""


# --- text metrics ---------------------------------------------------------------------------------------------------

_WORD = re.compile(r"[^\W_]+")


class _Words:
    """rouge-score's tokeniser, Unicode-aware: lowercase, then the runs of letters and digits."""

    @staticmethod
    def tokenize(text: str) -> list[str]:
        return _WORD.findall(text.lower())


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Words())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of ``prediction`` against ``reference``: with ``L`` the length of their longest common subsequence
    of words, ``P = L / len(prediction)``, ``R = L / len(reference)``, ``F1 = 2PR / (P + R)``."""
    if not _Words.tokenize(prediction) and not _Words.tokenize(reference):
        return 1.0
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


def normalize_answer(text: str) -> str:
    """Lowercase, punctuation (ASCII and Unicode) removed, whitespace collapsed."""
    text = "".join(ch for ch in text.lower()
                   if ch not in string.punctuation and not unicodedata.category(ch).startswith("P"))
    return " ".join(text.split())


def answer_matches(generated: str, gold: str) -> bool:
    """Whether the normalised ``generated`` answer's words begin with the normalised ``gold`` answer's words."""
    gold_words = normalize_answer(gold).split()
    return bool(gold_words) and normalize_answer(generated).split()[:len(gold_words)] == gold_words


# --- prompts and answers --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChatItem:
    """A record ready to evaluate: the rendered prompt (text and ids), the gold answer, the answer options."""

    prompt_text: str
    prompt_ids: tuple[int, ...]
    reference: str
    options: tuple[str, ...] | None
    where: str


def chat_items(records: list[ChatRecord], tokenizer, max_examples: int | None = None,
               what: str = "the tokenizer") -> list[ChatItem]:
    """The first ``max_examples`` records (all by default) rendered with ``tokenizer``'s chat template; each must end
    with the assistant's gold answer."""
    check_chat_template(tokenizer, what)
    items = []
    for record in records[:max_examples]:
        if not record.has_response:
            raise AlambicError(f"{record.where}: the conversation does not end with an assistant answer, so there is "
                               "nothing to compare the models' answers with: end each record with the gold answer")
        text = tokenizer.apply_chat_template(record.prompt, tokenize=False, add_generation_prompt=True)
        ids = prompt_ids(tokenizer, record.prompt)
        items.append(ChatItem(text, tuple(ids), record.response, record.options, record.where))
    if not items:
        raise AlambicError("no chat records to evaluate")
    return items


def check_positions(config, items: list[ChatItem], max_new_tokens: int, name: str) -> None:
    """One line when the longest prompt plus ``max_new_tokens`` does not fit the positions of the model of
    ``config``: past them, learned position embeddings fail and rotary ones run where the model never trained."""
    config = getattr(config, "config", config)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not limit:
        return
    longest = max(items, key=lambda item: len(item.prompt_ids))
    if len(longest.prompt_ids) + max_new_tokens > limit:
        raise AlambicError(f"{longest.where}: the prompt ({len(longest.prompt_ids)} tokens) plus --max-new-tokens "
                           f"{max_new_tokens} exceed the {limit} positions of {name}: lower --max-new-tokens or "
                           "shorten the prompt")


@dataclass
class Answers:
    """A model's answers: generated ids (the end-of-turn token included when produced), their text, whether each
    ended with an end-of-turn token."""

    ids: list[list[int]]
    texts: list[str]
    stopped: list[bool]


def generate_answers(model, tokenizer, items: list[ChatItem], *, max_new_tokens: int = 64, batch_size: int = 8,
                     temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> Answers:
    """Each prompt's answer from :func:`alambic.sampling.sample_batched`: greedy at ``temperature`` 0, else sampled
    (nucleus ``top_p``) with a CPU generator seeded with ``seed`` (the same answers on any device, up to
    floating-point differences)."""
    from alambic.sampling import sample_batched

    stops = eos_token_ids(tokenizer, model)
    if _runs_elsewhere(model):
        if temperature > 0:
            raise AlambicError(f"{model.runtime} answers greedily here: evaluate the export at temperature 0, or "
                               "sample from its PyTorch source")
        new = [model.answer_greedily(list(item.prompt_ids), max_new_tokens, stops) for item in items]
    else:
        generator = torch.Generator().manual_seed(seed) if temperature > 0 else None
        new = sample_batched(model, [list(item.prompt_ids) for item in items], batch_size,
                             max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             eos_token_ids=stops, pad_token_id=pad_id_of(tokenizer), generator=generator)
    ids = [[int(i) for i in answer] for answer in new]
    stopped = [bool(answer) and answer[-1] in stops for answer in ids]
    return Answers(ids, [tokenizer.decode(answer, skip_special_tokens=True) for answer in ids], stopped)


def _runs_elsewhere(model) -> bool:
    """Whether another runtime runs ``model`` (a GGUF export in llama.cpp): it answers one prompt at a time with its
    own key-value cache, and is scored on whole sequences, since no transformers cache fits it."""
    return hasattr(model, "answer_greedily")


# --- scoring tokens -------------------------------------------------------------------------------------------------

def _identity(rows: torch.Tensor) -> torch.Tensor:
    return rows


def _log_softmax_chunks(rows: torch.Tensor, head):
    """``(first, log_softmax(head(rows[first:first + ROW_CHUNK])))`` in fp32, chunk by chunk."""
    for first in range(0, len(rows), ROW_CHUNK):
        yield first, torch.log_softmax(head(rows[first:first + ROW_CHUNK]).float(), dim=-1)


def _rows(model, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor):
    """``(rows, head)``: the hidden states at ``positions`` (of the flattened batch x time) and the map from them to
    logits, so only scored positions meet the vocabulary; a model whose logits are rescaled after its head
    (soft-capping) gives its full logits' rows and the identity."""
    device = model_device(model)
    ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
    try:
        head = lm_head(model)
    except AlambicError:
        logits = model(input_ids=ids, attention_mask=mask).logits
        return logits.flatten(0, 1).index_select(0, positions), _identity
    hidden = lm_body(model)(input_ids=ids, attention_mask=mask).last_hidden_state
    return hidden.flatten(0, 1).index_select(0, positions), head


def _batches(sequences: list[list[int]], starts: list[int], batch_size: int, pad_id: int):
    """Per batch: ``(first, ids, mask, positions, targets, owners)``; ``positions`` index the flattened batch x time
    at every position predicting a token at or after its sequence's ``start``, ``targets`` are those tokens and
    ``owners`` the sequence (counted from ``first``) each row belongs to."""
    for first in range(0, len(sequences), batch_size):
        chunk = sequences[first:first + batch_size]
        ids, mask = pad_rows(chunk, pad_id)
        width = ids.shape[1]
        positions, owners = [], []
        for row, (sequence, start) in enumerate(zip(chunk, starts[first:first + batch_size])):
            positions.extend(row * width + t for t in range(start - 1, len(sequence) - 1))
            owners.extend([row] * (len(sequence) - start))
        positions = torch.tensor(positions, dtype=torch.long)
        yield first, ids, mask, positions, ids.flatten()[positions + 1], torch.tensor(owners, dtype=torch.long)


@torch.no_grad()
def continuation_logprobs(model, sequences: list[list[int]], starts: list[int], *, batch_size: int = 8,
                          pad_id: int = 0) -> list[torch.Tensor]:
    """Per sequence, ``log p(token_t | tokens_<t)`` (fp32, on the CPU) of each of its tokens from ``starts[i]`` on
    (``starts[i] >= 1``)."""
    was_training = model.training
    model.eval()
    out: list[torch.Tensor] = []
    try:
        for first, ids, mask, positions, targets, owners in _batches(sequences, starts, batch_size, pad_id):
            rows, head = _rows(model, ids, mask, positions)
            targets = targets.to(rows.device)
            picked = torch.zeros(len(rows), dtype=torch.float32)
            for i, logp in _log_softmax_chunks(rows, head):
                picked[i:i + len(logp)] = logp.gather(1, targets[i:i + len(logp), None]).squeeze(1).cpu()
            count = min(batch_size, len(sequences) - first)
            out.extend(picked[owners == row] for row in range(count))
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def scored_rows(model, sequences: list[list[int]], starts: list[int], *, batch_size: int = 8,
                pad_id: int = 0) -> list[tuple[torch.Tensor, object]]:
    """Per batch of :func:`_batches`, ``model``'s ``(rows, head)`` at every position predicting a token from
    ``starts[i]`` on: what :func:`forward_kl_sum` needs of the teacher, read once for every model compared with it
    (hidden states, so a few kilobytes per token; full logits rows for a soft-capped model)."""
    was_training = model.training
    model.eval()
    try:
        return [_rows(model, ids, mask, positions)
                for _, ids, mask, positions, _, _ in _batches(sequences, starts, batch_size, pad_id)]
    finally:
        model.train(was_training)


@torch.no_grad()
def forward_kl_sum(teacher_rows: list[tuple[torch.Tensor, object]], model, sequences: list[list[int]],
                   starts: list[int], *, batch_size: int = 8, pad_id: int = 0) -> tuple[float, int]:
    """``(sum, count)`` of ``KL(p_teacher || p_model)`` (T = 1, fp32) over every position predicting a token from
    ``starts[i]`` on, both models reading the same tokens; ``teacher_rows``: the teacher's :func:`scored_rows` of
    the same sequences and batch size."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64), 0
    try:
        for (t_rows, t_head), (_, ids, mask, positions, _, _) in zip(
                teacher_rows, _batches(sequences, starts, batch_size, pad_id), strict=True):
            m_rows, m_head = _rows(model, ids, mask, positions)
            for (i, t_logp), (_, m_logp) in zip(_log_softmax_chunks(t_rows, t_head),
                                                _log_softmax_chunks(m_rows, m_head)):
                m_logp = m_logp.to(t_logp.device)
                total += (t_logp.exp() * (t_logp - m_logp)).sum().double().cpu()
            count += len(positions)
    finally:
        model.train(was_training)
    return float(total), count


def option_continuations(tokenizer, item: ChatItem) -> list[list[int]]:
    """Each option's tokens after the prompt's, the end-of-turn token appended: the tail of the prompt text plus the
    option tokenised together, or the option alone if that tokenisation does not keep the prompt's tokens."""
    prompt = list(item.prompt_ids)
    continuations = []
    for option in item.options or ():
        whole = tokenizer(item.prompt_text + option, add_special_tokens=False)["input_ids"]
        if whole[:len(prompt)] == prompt and len(whole) > len(prompt):
            tokens = whole[len(prompt):]
        else:
            tokens = tokenizer(option, add_special_tokens=False)["input_ids"]
        continuations.append(list(tokens) + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []))
    return continuations


@torch.no_grad()
def option_scores(model, tokenizer, items: list[ChatItem], *, batch_size: int = 8) -> list[list[float]]:
    """Per item with options, each option's summed log-likelihood (end-of-turn token included) after the prompt.

    Each prompt is read once (``batch_size`` prompts per forward, keeping their keys and values), then all its
    options at once from that cache: the options' tokens are a few, the prompt's hundreds."""
    from alambic.sampling import extend, prefill

    scored = [item for item in items if item.options]
    pad = pad_id_of(tokenizer)
    if _runs_elsewhere(model):  # each prompt + option read whole: the same log-likelihoods, without a shared cache
        continuations = [option_continuations(tokenizer, item) for item in scored]
        pairs = [(list(item.prompt_ids), c) for item, cs in zip(scored, continuations) for c in cs]
        logprobs = continuation_logprobs(model, [prompt + c for prompt, c in pairs], [len(p) for p, _ in pairs],
                                         batch_size=batch_size, pad_id=pad)
        sums = iter(float(lp.double().sum()) for lp in logprobs)
        return [[next(sums) for _ in cs] for cs in continuations]
    was_training = model.training
    model.eval()
    out = []
    try:
        for first in range(0, len(scored), batch_size):
            chunk = scored[first:first + batch_size]
            continuations = [option_continuations(tokenizer, item) for item in chunk]
            logits, prefix = prefill(model, [list(item.prompt_ids) for item in chunk], pad)
            owners = torch.tensor([row for row, c in enumerate(continuations) for _ in c], dtype=torch.long)
            prefix.select(owners)
            flat = [c for cs in continuations for c in cs]
            ids, mask = pad_rows(flat, pad)
            device = logits.device
            following = extend(model, prefix, ids.to(device), mask.to(device))
            # token t of a continuation is predicted by the prompt's last position (t = 0), else by token t - 1
            predicting = torch.cat([logits[owners.to(device), None], following[:, :-1]], dim=1)
            logp = torch.log_softmax(predicting.float(), dim=-1).gather(-1, ids.to(device)[..., None]).squeeze(-1)
            sums = (logp * mask.to(device)).double().sum(-1).tolist()
            at = 0
            for cs in continuations:
                out.append(sums[at:at + len(cs)])
                at += len(cs)
    finally:
        model.train(was_training)
    return out


def _argmax(values) -> int:
    return max(range(len(values)), key=lambda i: values[i])


# --- one model ------------------------------------------------------------------------------------------------------

@dataclass
class TeacherAnswers:
    """The teacher and its answers to the items, shared by every model evaluated against it."""

    model: torch.nn.Module
    answers: Answers
    _rows: dict = field(default_factory=dict, repr=False)

    def rows(self, items: list[ChatItem], batch_size: int, pad_id: int) -> list[tuple[torch.Tensor, object]]:
        """The teacher's :func:`scored_rows` of its own answers to ``items``, computed on first use."""
        key = (tuple(item.prompt_ids for item in items), batch_size, pad_id)
        if key not in self._rows:
            sequences = [list(item.prompt_ids) + ids for item, ids in zip(items, self.answers.ids)]
            self._rows[key] = scored_rows(self.model, sequences, [len(item.prompt_ids) for item in items],
                                          batch_size=batch_size, pad_id=pad_id)
        return self._rows[key]


def evaluate_model(model, tokenizer, items: list[ChatItem], *, teacher: TeacherAnswers | None = None,
                   max_new_tokens: int = 64, batch_size: int = 8, temperature: float = 0.0, top_p: float = 1.0,
                   seed: int = 0, answers: Answers | None = None) -> dict:
    """The metrics of the module docstring for one model on ``items`` (``answers``: its answers, when already
    generated)."""
    if answers is None:
        answers = generate_answers(model, tokenizer, items, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   temperature=temperature, top_p=top_p, seed=seed)
    n = len(items)
    lengths = [len(ids) - stopped for ids, stopped in zip(answers.ids, answers.stopped)]
    row = {"rouge_l": sum(rouge_l(a, item.reference) for a, item in zip(answers.texts, items)) / n}
    with_options = [i for i, item in enumerate(items) if item.options]
    if with_options:
        scores = option_scores(model, tokenizer, items, batch_size=batch_size)
        golds = [items[i].options.index(items[i].reference) for i in with_options]
        norm = [[s / len(o.encode("utf-8")) for s, o in zip(sc, items[i].options)]
                for sc, i in zip(scores, with_options)]
        row["accuracy"] = sum(answer_matches(answers.texts[i], items[i].reference) for i in with_options) / len(golds)
        row["option_accuracy"] = sum(_argmax(s) == g for s, g in zip(scores, golds)) / len(golds)
        row["option_accuracy_norm"] = sum(_argmax(s) == g for s, g in zip(norm, golds)) / len(golds)
        row["option_examples"] = len(golds)
    if teacher is not None:
        pad = pad_id_of(tokenizer)
        starts = [len(item.prompt_ids) for item in items]
        own = [list(item.prompt_ids) + ids for item, ids in zip(items, answers.ids)]
        logprobs = continuation_logprobs(teacher.model, own, starts, batch_size=batch_size, pad_id=pad)
        tokens = sum(len(lp) for lp in logprobs)
        theirs = [list(item.prompt_ids) + ids for item, ids in zip(items, teacher.answers.ids)]
        kl, positions = forward_kl_sum(teacher.rows(items, batch_size, pad), model, theirs, starts,
                                       batch_size=batch_size, pad_id=pad)
        row["rouge_l_teacher"] = sum(rouge_l(a, t) for a, t in zip(answers.texts, teacher.answers.texts)) / n
        row["teacher_nll"] = -sum(float(lp.double().sum()) for lp in logprobs) / max(tokens, 1)
        row["forward_kl"] = kl / max(positions, 1)
    row["mean_tokens"] = sum(lengths) / n
    row["hit_max_new_tokens"] = sum(not s for s in answers.stopped) / n
    row["examples"] = n
    return row


# --- several models -------------------------------------------------------------------------------------------------

def _tokenizer_and_config(spec):
    """``(tokenizer, config)`` of a spec, read without loading weights (None and its config for a loaded model), so
    every model is checked before the first one runs."""
    if isinstance(spec, torch.nn.Module):
        return None, spec.config
    from transformers import AutoConfig, AutoTokenizer

    from alambic.export.runtime import export_folder, read_manifest, resolve_measured_path

    path = resolve_measured_path(spec)
    if export_folder(spec) is not None and (fmt := read_manifest(path)["format"]) != "gguf":
        raise AlambicError(f"{path} is a {fmt} export: chat evaluation generates with PyTorch models and GGUF exports "
                           "(in llama.cpp); evaluate its PyTorch source, or export it with --format gguf")
    try:
        return AutoTokenizer.from_pretrained(path), AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise AlambicError(f"{path} has no usable tokenizer or config ({str(err).strip().splitlines()[0]}); save them "
                           "next to the model")


def load_chat_model(spec, device) -> tuple[torch.nn.Module, int]:
    """``(model, parameters)``: a spec loaded as a causal LM onto ``device``, an `alambic export` folder in its runtime
    (GGUF: llama.cpp; its source's parameter count), an already-loaded model as it is."""
    from alambic.students import count_parameters

    if isinstance(spec, torch.nn.Module):
        return spec, count_parameters(spec)
    from alambic.export.runtime import export_folder, load_exported, read_manifest
    from alambic.teachers import load_model

    folder = export_folder(spec)
    if folder is not None:
        manifest = read_manifest(folder)
        return load_exported(folder, manifest), manifest["parameters"]["total"]
    model = load_model(spec, kind="causal")[0].to(device)
    return model, count_parameters(model)


def _check_vocabulary(name: str, tokenizer, reference_tokenizer, reference: str) -> None:
    from alambic.teachers import vocabulary_hash

    if tokenizer is None or tokenizer is reference_tokenizer:
        return
    if vocabulary_hash(tokenizer) != vocabulary_hash(reference_tokenizer):
        raise AlambicError(f"{name} has another tokenizer than {reference}: eval-chat gives every model the same "
                           "prompt tokens and scores their answers with one tokenizer; evaluate it separately")


def _check_logit_columns(name: str, config, teacher_config, teacher_name: str) -> None:
    from alambic.modeling import vocab_size

    if vocab_size(config) != vocab_size(teacher_config):
        raise AlambicError(f"{name} has {vocab_size(config)} logit columns but {teacher_name} "
                           f"{vocab_size(teacher_config)}: the KL needs one vocabulary; resize its embeddings")


def evaluate_chat(models, records: list[ChatRecord], *, teacher=None, names: list[str] | None = None,
                  tokenizer=None, max_new_tokens: int = 64, batch_size: int = 8, temperature: float = 0.0,
                  top_p: float = 1.0, seed: int = 0, max_examples: int | None = None, device=None,
                  samples: list | None = None) -> list[dict]:
    """One row per model: ``{"model": name, "parameters": ..., <metrics of the module docstring>, "examples": n}``.

    ``models`` and ``teacher``: specs :func:`alambic.teachers.load_model` takes (loaded one at a time, as causal LMs,
    onto ``device``: the GPU when there is one), or loaded models, left where they are (``tokenizer`` then
    required). Prompts are rendered with ``tokenizer``, else the teacher's, else the first model's; every model must
    share its vocabulary, checked (with the positions each prompt needs) before any model runs. Greedy at
    ``temperature`` 0, else seeded sampling (``top_p``); the teacher answers with the same settings.

    ``samples``: a list that receives one record per evaluated prompt, to read the answers behind the figures:
    ``{"where": file:line, "messages": the prompt, "gold": answer, "answers": {name: text}}``, the teacher's answer
    under the name ``teacher``."""
    models = list(models)
    if not models:
        raise AlambicError("no model to evaluate: give one or more models")
    names = [str(n) for n in names] if names else [
        f"model {i + 1}" if isinstance(m, torch.nn.Module) else str(m) for i, m in enumerate(models)]
    if len(names) != len(models):
        raise AlambicError(f"{len(names)} names for {len(models)} models: give one name per model (--names)")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    settings = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, temperature=temperature, top_p=top_p,
                    seed=seed)

    specs = ([teacher] if teacher is not None else []) + models
    teacher_label = "the teacher" if isinstance(teacher, torch.nn.Module) else f"the teacher {teacher}"
    labels = ([teacher_label] if teacher is not None else []) + names
    described = [_tokenizer_and_config(spec) for spec in specs]
    if tokenizer is not None:
        reference = "the given tokenizer"
    else:
        at = next((i for i, (tok, _) in enumerate(described) if tok is not None), None)
        if at is None:
            raise AlambicError("loaded models need their tokenizer: pass tokenizer=")
        tokenizer, reference = described[at][0], labels[at]
    items = chat_items(records, tokenizer, max_examples, f"{reference}'s tokenizer")
    for label, (own, config) in zip(labels, described):
        _check_vocabulary(label, own, tokenizer, reference)
        if teacher is not None:
            _check_logit_columns(label, config, described[0][1], labels[0])
        check_positions(config, items, max_new_tokens, label)

    answer_texts = {}  # name -> its answers, for ``samples``
    teacher_answers = None
    if teacher is not None:
        teacher_model = load_chat_model(teacher, device)[0]
        teacher_answers = TeacherAnswers(teacher_model, generate_answers(teacher_model, tokenizer, items, **settings))
        answer_texts["teacher"] = teacher_answers.answers.texts
    rows = []
    for spec, name in zip(models, names):
        model, parameters = load_chat_model(spec, device)
        answers = generate_answers(model, tokenizer, items, **settings)
        metrics = evaluate_model(model, tokenizer, items, teacher=teacher_answers, answers=answers, **settings)
        rows.append({"model": name, "parameters": parameters, **metrics})
        answer_texts[name] = answers.texts
        del model
    if samples is not None:
        samples += [{"where": item.where, "messages": record.prompt, "gold": item.reference,
                     "answers": {name: texts[i] for name, texts in answer_texts.items()}}
                    for i, (record, item) in enumerate(zip(records, items))]
    return rows
