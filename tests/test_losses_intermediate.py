"""TinyBERT and MiniLM losses against direct computations: pads, differing widths, differing head counts."""

import math

import pytest
import torch

from alambic.capture import valid_pairs
from alambic.losses import attention_mse, attention_relation_kl, hidden_mse

MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_hidden_mse_over_non_pad_rows_matches_mse_loss_and_a_loop():
    hs, ht = rand(2, 5, 6, seed=1), rand(2, 5, 6, seed=2)
    rows = MASK.flatten().nonzero().squeeze(1)
    got = hidden_mse(hs.flatten(0, 1)[rows], ht.flatten(0, 1)[rows])
    loop = [((hs[b, i] - ht[b, i]) ** 2).mean() for b, i in MASK.nonzero().tolist()]
    assert got.item() == pytest.approx((sum(loop) / len(loop)).item(), rel=1e-6)
    torch.testing.assert_close(got, torch.nn.functional.mse_loss(hs.flatten(0, 1)[rows], ht.flatten(0, 1)[rows]))
    with pytest.raises(ValueError, match="project"):
        hidden_mse(hs[..., :4].flatten(0, 1), ht.flatten(0, 1))


@pytest.mark.parametrize("causal", [False, True])
def test_attention_mse_counts_only_valid_pairs(causal):
    s, t = rand(2, 3, 5, 5, seed=3), rand(2, 3, 5, 5, seed=4)
    valid = valid_pairs(MASK, causal)
    got = attention_mse(s, t, valid)
    terms = [((s[b, :, i, j] - t[b, :, i, j]) ** 2).mean() for b, i, j in valid.nonzero().tolist()]
    assert got.item() == pytest.approx((sum(terms) / len(terms)).item(), rel=1e-6)
    # Whatever sits in padded or future entries (even -inf, as masked kernels leave) changes nothing.
    s2, t2 = s.clone(), t.clone()
    s2.masked_fill_(~valid[:, None], float("-inf"))
    t2.masked_fill_(~valid[:, None], 1e6)
    assert attention_mse(s2, t2, valid).item() == pytest.approx(got.item(), rel=1e-6)


def test_attention_mse_gradient_is_finite_and_zero_off_the_valid_pairs():
    s = rand(2, 3, 5, 5, seed=5).requires_grad_()
    valid = valid_pairs(MASK, False)
    attention_mse(s, rand(2, 3, 5, 5, seed=6), valid).backward()
    assert torch.isfinite(s.grad).all()
    assert (s.grad.transpose(0, 1)[:, ~valid] == 0).all()


def direct_relation_kl(s, t, mask, heads):
    """Loops over batch, relation heads and real query rows; keys restricted to real tokens."""
    total, rows = 0.0, 0
    for b in range(s.shape[0]):
        n = int(mask[b].sum())
        for i in range(n):
            kl = 0.0
            for r in range(heads):
                def rel(x):
                    d = x.shape[-1] // heads
                    xr = x[b, :n, r * d:(r + 1) * d]
                    return torch.softmax(xr[i] @ xr.T / math.sqrt(d), -1)
                p, q = rel(t), rel(s)
                kl += float((p * (p.log() - q.log())).sum())
            total += kl / heads
            rows += 1
    return total / rows


def test_relation_kl_matches_a_loop_with_differing_widths_and_pads():
    s, t = rand(2, 5, 8, seed=7), rand(2, 5, 12, seed=8)  # student 8 wide, teacher 12 wide
    valid = valid_pairs(MASK, False)
    got = attention_relation_kl(s, t, valid, num_relation_heads=4)
    assert got.item() == pytest.approx(direct_relation_kl(s, t, MASK, 4), rel=1e-5)
    padded = s.clone()
    padded[1, 3:] = 1e3  # padded tokens must not leak into any relation
    assert attention_relation_kl(padded, t, valid, 4).item() == pytest.approx(got.item(), rel=1e-5)
    assert attention_relation_kl(t, t, valid, 4).item() == pytest.approx(0.0, abs=1e-6)


def test_relation_kl_gradient_is_finite_with_pads_and_causal_masks():
    s = rand(2, 5, 8, seed=9).requires_grad_()
    attention_relation_kl(s, rand(2, 5, 6, seed=10), valid_pairs(MASK, True), num_relation_heads=2).backward()
    assert torch.isfinite(s.grad).all() and (s.grad[1, 3:] == 0).all()
    with pytest.raises(ValueError, match="relation heads"):
        attention_relation_kl(s, rand(2, 5, 6), valid_pairs(MASK, False), num_relation_heads=4)
