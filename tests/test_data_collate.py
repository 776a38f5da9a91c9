import numpy as np
import pytest
import torch
from test_data_support import roberta_style_tokenizer
from tiny import bpe_tokenizer, sample_texts, wordpiece_tokenizer

from alambic.data import CausalLMCollator, MaskedLMCollator, encoder_chunks, smoothed_token_weights
from alambic.data.tokenized import TokenizedCorpus
from alambic.errors import AlambicError

KEYS = ["input_ids", "attention_mask", "token_positions", "lm_positions", "lm_targets", "lm_token_rows"]


def examples(tok, n=48, max_length=96):
    """Real BERT/RoBERTa-style inputs of varied lengths (so batches have padding)."""
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in sample_texts(n)]
    flat = np.concatenate([np.asarray(i) for i in ids]).astype(np.uint16)
    corpus = TokenizedCorpus(flat, np.concatenate([[0], np.cumsum([len(i) for i in ids])]), len(tok), None, False)
    chunks = encoder_chunks(corpus, tok, max_length=max_length)
    return [chunks[i] for i in range(len(chunks))]


def padded(batch_examples, pad_id):
    width = max(len(e) for e in batch_examples)
    return torch.tensor([list(e) + [pad_id] * (width - len(e)) for e in batch_examples])


def check_contract(batch, batch_examples):
    """Every index tensor against a construction written out loop by loop."""
    assert list(batch) == KEYS and all(v.dtype == torch.long for v in batch.values())
    B, L = batch["input_ids"].shape
    assert B == len(batch_examples) and L == max(len(e) for e in batch_examples)
    token_positions = [b * L + t for b, e in enumerate(batch_examples) for t in range(len(e))]
    assert batch["attention_mask"].reshape(-1).nonzero().squeeze(1).tolist() == token_positions
    assert batch["token_positions"].tolist() == token_positions
    assert batch["lm_token_rows"].tolist() == [token_positions.index(p) for p in batch["lm_positions"].tolist()]
    assert batch["lm_positions"].tolist() == sorted(batch["lm_positions"].tolist())


def test_masked_lm_contract_against_direct_construction():
    tok = wordpiece_tokenizer()
    batch_examples = examples(tok)[:8]
    batch = MaskedLMCollator(tok)(batch_examples, seed=3)
    check_contract(batch, batch_examples)
    original = padded(batch_examples, tok.pad_token_id).reshape(-1)
    positions = batch["lm_positions"]
    assert torch.equal(batch["lm_targets"], original[positions])
    untouched = torch.ones_like(original, dtype=torch.bool)
    untouched[positions] = False
    assert torch.equal(batch["input_ids"].reshape(-1)[untouched], original[untouched])


def masking_stats(tok, collator, batch_examples, seeds):
    """Counts over many batches: maskable tokens, chosen, and how each chosen token was replaced."""
    special = torch.tensor(tok.all_special_ids)
    totals = dict(maskable=0, chosen=0, mask=0, random=0, kept=0)
    for seed in seeds:
        batch = collator(batch_examples, seed=seed)
        original = padded(batch_examples, tok.pad_token_id).reshape(-1)
        real = batch["attention_mask"].reshape(-1).bool()
        maskable = real & ~torch.isin(original, special)
        positions = batch["lm_positions"]
        assert maskable[positions].all()  # never a special token, never a pad
        new = batch["input_ids"].reshape(-1)[positions]
        is_mask, is_kept = new == tok.mask_token_id, new == original[positions]
        is_random = ~is_mask & ~is_kept
        assert not torch.isin(new[is_random], special).any()
        totals["maskable"] += int(maskable.sum())
        totals["chosen"] += len(positions)
        totals["mask"] += int(is_mask.sum())
        totals["random"] += int(is_random.sum())
        totals["kept"] += int(is_kept.sum())
    return totals


@pytest.mark.parametrize("make_tok", [wordpiece_tokenizer, roberta_style_tokenizer], ids=["bert", "roberta"])
def test_uniform_masking_statistics(make_tok):
    tok = make_tok()
    batch_examples = examples(tok)
    s = masking_stats(tok, MaskedLMCollator(tok), batch_examples, seeds=range(12))
    assert s["maskable"] > 30_000
    assert abs(s["chosen"] / s["maskable"] - 0.15) < 0.01
    assert abs(s["mask"] / s["chosen"] - 0.8) < 0.02
    assert abs(s["random"] / s["chosen"] - 0.1) < 0.015
    assert abs(s["kept"] / s["chosen"] - 0.1) < 0.015


def test_other_ratios_are_respected():
    tok = wordpiece_tokenizer()
    s = masking_stats(tok, MaskedLMCollator(tok, mlm_probability=0.3, mask_ratio=0.0, random_ratio=1.0),
                      examples(tok)[:16], seeds=range(4))
    assert abs(s["chosen"] / s["maskable"] - 0.3) < 0.02
    assert s["random"] / s["chosen"] > 0.99  # a random draw equals the original once in ~30k


def test_same_seed_same_batch_different_seed_different_masks():
    tok = wordpiece_tokenizer()
    batch_examples = examples(tok)[:8]
    collator = MaskedLMCollator(tok)
    a, b, c = collator(batch_examples, seed=7), collator(batch_examples, seed=7), collator(batch_examples, seed=8)
    assert all(torch.equal(a[k], b[k]) for k in KEYS)
    assert not torch.equal(a["lm_positions"], c["lm_positions"]) or not torch.equal(a["input_ids"], c["input_ids"])
    assert torch.equal(a["token_positions"], c["token_positions"])


def test_every_batch_has_at_least_one_masked_token():
    tok = wordpiece_tokenizer()
    collator = MaskedLMCollator(tok, mlm_probability=0.01)
    one = [np.array([101, 2054, 2003, 102])]
    assert all(len(collator(one, seed=s)["lm_positions"]) >= 1 for s in range(50))
    only_special = collator([np.array([101, 102])], seed=0)
    assert len(only_special["lm_positions"]) == 0 and only_special["input_ids"].tolist() == [[101, 102]]


def test_frequency_smoothed_masking_prefers_rare_tokens():
    tok = wordpiece_tokenizer()
    batch_examples = examples(tok)
    stream = np.concatenate([e for e in batch_examples])
    counts = np.bincount(stream, minlength=len(tok))
    weights = smoothed_token_weights(counts, power=0.7)
    assert weights[counts == 0].min() == 1.0 and np.isfinite(weights).all()
    collator = MaskedLMCollator(tok, token_weights=weights)
    frequent, rare = counts >= 200, (counts >= 1) & (counts <= 2)
    hits = {"frequent": 0, "rare": 0}
    seen = {"frequent": 0, "rare": 0}
    for seed in range(8):
        batch = collator(batch_examples, seed=seed)
        real = batch["attention_mask"].reshape(-1).bool()
        original = padded(batch_examples, tok.pad_token_id).reshape(-1)
        maskable = real & ~torch.isin(original, torch.tensor(tok.all_special_ids))
        assert len(batch["lm_positions"]) == round(0.15 * int(maskable.sum()))  # exactly p * maskable
        assert maskable[batch["lm_positions"]].all()
        chosen = batch["lm_targets"].numpy()
        for name, group in (("frequent", frequent), ("rare", rare)):
            hits[name] += int(group[chosen].sum())
            seen[name] += int(group[original[maskable].numpy()].sum())
    assert hits["rare"] / seen["rare"] > 3 * hits["frequent"] / seen["frequent"]


def test_masked_lm_needs_a_mask_token_and_sane_ratios():
    with pytest.raises(AlambicError, match="has no mask token"):
        MaskedLMCollator(bpe_tokenizer())
    with pytest.raises(AlambicError, match="mlm_probability must be in"):
        MaskedLMCollator(wordpiece_tokenizer(), mlm_probability=0)
    with pytest.raises(AlambicError, match="sum to at most 1"):
        MaskedLMCollator(wordpiece_tokenizer(), mask_ratio=0.8, random_ratio=0.3)
    with pytest.raises(AlambicError, match="token_weights has 10 entries"):
        MaskedLMCollator(wordpiece_tokenizer(), token_weights=np.ones(10))


def test_causal_lm_contract_against_direct_construction():
    tok = bpe_tokenizer()
    batch_examples = [np.array(tok(t[:300])["input_ids"]) for t in sample_texts(4)]
    batch_examples.append(np.array([1]))  # a one-token row has no target
    batch = CausalLMCollator(tok)(batch_examples, seed=0)
    check_contract(batch, batch_examples)
    L = batch["input_ids"].shape[1]
    expected = [(b * L + t, int(e[t + 1])) for b, e in enumerate(batch_examples) for t in range(len(e) - 1)]
    assert batch["lm_positions"].tolist() == [p for p, _ in expected]
    assert batch["lm_targets"].tolist() == [t for _, t in expected]
    assert torch.equal(batch["input_ids"], padded(batch_examples, tok.pad_token_id))


def test_causal_lm_equal_blocks_have_no_padding():
    tok = bpe_tokenizer()
    blocks = [np.arange(10, 26), np.arange(30, 46)]
    batch = CausalLMCollator(tok)(blocks, seed=1)
    assert batch["attention_mask"].all() and len(batch["lm_positions"]) == 2 * 15
    assert batch["lm_targets"].tolist() == list(range(11, 26)) + list(range(31, 46))
