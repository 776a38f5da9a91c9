"""Offline teacher outputs: the top-k + rest KL against direct computations, k = V against the full KL, and the fused
vocabulary loss with stored top-k targets against autograd on the formula (values and gradients)."""

import pytest
import torch

from alambic.losses import soft_target_kl, token_cross_entropy, topk_soft_target_kl, topk_targets
from alambic.losses.vocabulary import fused_vocabulary_loss
from test_losses import _linear


def _logits(n=12, v=40, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * scale, torch.randn(n, v, generator=g) * scale


def test_topk_targets_keep_the_largest_probabilities_and_the_rest_of_the_mass():
    teacher, _ = _logits()
    ids, log_p, rest = topk_targets(teacher, 5, temperature=2.0)
    p = torch.softmax(teacher / 2.0, -1)
    assert torch.equal(ids, p.topk(5, -1).indices)
    torch.testing.assert_close(log_p.exp(), p.gather(1, ids))
    torch.testing.assert_close(rest.exp(), 1 - p.gather(1, ids).sum(1))
    assert torch.isneginf(topk_targets(teacher, 40)[2]).all()  # k = V: no rest


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_with_k_equal_to_the_vocabulary_it_is_the_full_kl(temperature):
    teacher, student = _logits()
    full = soft_target_kl(student, teacher, temperature)
    topk = topk_soft_target_kl(student, *topk_targets(teacher, 40, temperature), temperature)
    torch.testing.assert_close(topk, full)


def test_topk_kl_is_the_kl_over_k_plus_one_classes():
    teacher, student = _logits(n=3, v=9)
    T, k = 1.5, 3
    ids, log_p, rest = topk_targets(teacher, k, T)
    expected = 0.0
    for row in range(3):  # group both distributions into the kept classes and one "rest" class, by hand
        p, q = torch.softmax(teacher[row] / T, -1), torch.softmax(student[row] / T, -1)
        kept = ids[row].tolist()
        others = [c for c in range(9) if c not in kept]
        p_groups = [p[c] for c in kept] + [p[others].sum()]
        q_groups = [q[c] for c in kept] + [q[others].sum()]
        expected += sum(a * (a.log() - b.log()) for a, b in zip(p_groups, q_groups))
    value = topk_soft_target_kl(student, ids, log_p, rest, T, num_items=1)
    torch.testing.assert_close(value, T**2 * expected, rtol=1e-5, atol=1e-6)
    assert topk_soft_target_kl(teacher, ids, log_p, rest, T) < 1e-6  # the teacher matches itself


@pytest.mark.parametrize("k", [1, 8, 50])
@pytest.mark.parametrize("chunk", [0, 7])
@pytest.mark.parametrize("with_ce", [True, False])
def test_fused_loss_with_topk_targets_equals_autograd_on_the_formula(k, chunk, with_ce):
    g = torch.Generator().manual_seed(5)
    N, d, V, T = 29, 8, 50, 2.0
    x0, w0, b0 = torch.randn(N, d, generator=g), torch.randn(V, d, generator=g), torch.randn(V, generator=g)
    ids, log_p, rest = topk_targets(torch.randn(N, V, generator=g) * 2, k, T)
    log_p = log_p.half()  # as stored
    targets = torch.randint(0, V, (N,), generator=g) if with_ce else None
    if with_ce:
        targets[::4] = -100
    kd_weight, ce_weight = 5.0 / N, 2.0 / N
    results = []
    for fn in ("direct", "fused"):
        x, projection = x0.clone().requires_grad_(), _linear(w0, b0)
        if fn == "direct":
            logits = projection(x)
            kd = topk_soft_target_kl(logits, ids, log_p, rest, T, num_items=1)
            ce = (token_cross_entropy(logits[targets != -100], targets[targets != -100], num_items=1) if with_ce
                  else logits.new_zeros(()))
            loss = kd_weight * kd + ce_weight * ce
        else:
            loss, kd, ce = fused_vocabulary_loss(x, projection, None, None, targets, T, kd_weight, ce_weight, chunk,
                                                 teacher_topk=(ids, log_p, rest))
        (3 * loss).backward()
        results.append([loss, kd, ce, x.grad, projection.weight.grad, projection.bias.grad])
    for direct, fused in zip(*results):
        torch.testing.assert_close(fused.detach(), direct.detach(), rtol=1e-5, atol=1e-6)


def test_fused_loss_refuses_two_teachers():
    x, projection = torch.zeros(2, 4), _linear(torch.randn(9, 4))
    ids, log_p, rest = topk_targets(torch.randn(2, 9), 3)
    with pytest.raises(ValueError, match="not both"):
        fused_vocabulary_loss(x, projection, x, projection, None, 1.0, 1.0, 1.0, teacher_topk=(ids, log_p, rest))
