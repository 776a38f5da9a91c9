"""Each loss against a direct, obviously-correct computation; pads, masks, T^2 and accumulation included."""

import math

import pytest
import torch
import torch.nn.functional as F

from alambic.losses import cosine_distance, soft_target_kl, token_cross_entropy


def padded_batch(seed=0, B=3, L=7, V=11, d=5):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 4, 2])
    mask = torch.arange(L)[None, :] < lengths[:, None]
    return (
        torch.randn(B, L, V, generator=g) * 3,
        torch.randn(B, L, V, generator=g) * 3,
        torch.randn(B, L, d, generator=g),
        torch.randn(B, L, d, generator=g),
        mask,
    )


def direct_kl_over_tokens(s, t, mask, T):
    """Python loops over every token, straight from the definition."""
    total, count = 0.0, 0
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            if not mask[b, i]:
                continue
            p = [math.exp(x) for x in (t[b, i] / T).tolist()]
            q = [math.exp(x) for x in (s[b, i] / T).tolist()]
            zp, zq = sum(p), sum(q)
            total += sum(pi / zp * math.log((pi / zp) / (qi / zq)) for pi, qi in zip(p, q))
            count += 1
    return T * T * total / count


@pytest.mark.parametrize("T", [1.0, 2.0, 4.5])
def test_soft_target_kl_matches_definition_over_non_pad_tokens(T):
    s, t, _, _, mask = padded_batch()
    flat = mask.flatten().nonzero().squeeze(1)
    got = soft_target_kl(s.flatten(0, 1)[flat], t.flatten(0, 1)[flat], temperature=T)
    assert got.item() == pytest.approx(direct_kl_over_tokens(s, t, mask, T), rel=1e-5)


def test_soft_target_kl_equals_torch_kl_div_batchmean_times_t_squared():
    s, t, *_ = padded_batch()
    s, t, T = s.flatten(0, 1), t.flatten(0, 1), 3.0
    reference = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction="batchmean", log_target=True)
    assert soft_target_kl(s, t, T).item() == pytest.approx((reference * T * T).item(), rel=1e-6)


def test_soft_target_kl_gradient_matches_closed_form():
    """d/dz_s of T^2 * KL(t||s) / N is T * (softmax(z_s/T) - softmax(z_t/T)) / N."""
    s, t, *_ = padded_batch()
    s, t, T = s.flatten(0, 1).requires_grad_(), t.flatten(0, 1), 2.0
    soft_target_kl(s, t, T).backward()
    expected = T * (torch.softmax(s.detach() / T, -1) - torch.softmax(t / T, -1)) / s.shape[0]
    torch.testing.assert_close(s.grad, expected, rtol=1e-5, atol=1e-7)


def test_soft_target_kl_properties():
    s, t, *_ = padded_batch()
    s, t = s.flatten(0, 1), t.flatten(0, 1)
    assert soft_target_kl(t, t, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert soft_target_kl(s, t, 2.0).item() > 0
    assert soft_target_kl(s.bfloat16(), t.bfloat16(), 2.0).dtype == torch.float32
    with pytest.raises(ValueError, match="one vocabulary"):
        soft_target_kl(s[:, :5], t, 1.0)


def test_token_cross_entropy_matches_definition_on_masked_rows():
    s, *_ = padded_batch()
    g = torch.Generator().manual_seed(1)
    targets = torch.randint(0, s.shape[-1], s.shape[:2], generator=g)
    masked = torch.zeros(s.shape[:2], dtype=torch.bool)
    masked[0, 1] = masked[0, 5] = masked[1, 2] = True
    rows = masked.flatten().nonzero().squeeze(1)
    got = token_cross_entropy(s.flatten(0, 1)[rows], targets.flatten()[rows])
    expected = sum(-torch.log_softmax(s[b, i], -1)[targets[b, i]] for b, i in masked.nonzero().tolist()) / 3
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_cosine_distance_matches_definition_over_non_pad_tokens():
    _, _, hs, ht, mask = padded_batch()
    rows = mask.flatten().nonzero().squeeze(1)
    got = cosine_distance(hs.flatten(0, 1)[rows], ht.flatten(0, 1)[rows])
    terms = [1 - (hs[b, i] @ ht[b, i]) / (hs[b, i].norm() * ht[b, i].norm()) for b, i in mask.nonzero().tolist()]
    assert got.item() == pytest.approx((sum(terms) / len(terms)).item(), rel=1e-6)
    assert cosine_distance(ht, ht).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="equal widths"):
        cosine_distance(hs[..., :3], ht)


@pytest.mark.parametrize(
    "loss", [lambda s, t, n: soft_target_kl(s, t, 2.0, n), lambda s, t, n: token_cross_entropy(s, t.argmax(-1), n)]
)
def test_accumulated_micro_batches_normalised_by_global_count_equal_the_full_batch(loss):
    """Micro-batches of unequal token counts: per-micro-batch means would weight tokens unequally; the global count
    gives exactly the full-batch loss and gradient."""
    s, t, *_ = padded_batch(V=13)
    s, t = s.flatten(0, 1), t.flatten(0, 1)
    splits = [s[:3], s[3:17]], [t[:3], t[3:17]]
    full_s = torch.cat(splits[0]).clone().requires_grad_()
    full = loss(full_s, torch.cat(splits[1]), None)
    full.backward()

    micro_s = [x.clone().requires_grad_() for x in splits[0]]
    total_rows = sum(x.shape[0] for x in micro_s)
    accumulated = 0.0
    for ms, mt in zip(micro_s, splits[1]):
        part = loss(ms, mt, torch.tensor(total_rows))
        part.backward()
        accumulated += part.item()
    assert accumulated == pytest.approx(full.item(), rel=1e-6)
    torch.testing.assert_close(torch.cat([x.grad for x in micro_s]), full_s.grad)

    naive = sum(loss(ms.detach(), mt, None).item() for ms, mt in zip(micro_s, splits[1])) / 2
    assert naive != pytest.approx(full.item(), rel=1e-3)


def test_empty_selection_gives_zero_not_nan():
    empty = torch.zeros(0, 11, requires_grad=True)
    for value in (
        soft_target_kl(empty, empty.detach(), 2.0),
        token_cross_entropy(empty, torch.zeros(0, dtype=torch.long)),
        cosine_distance(empty, empty.detach()),
        soft_target_kl(empty, empty.detach(), 2.0, torch.tensor(0)),
    ):
        assert value.item() == 0.0
        value.backward()


def test_chunked_vocabulary_losses_equal_the_plain_ones_in_value_and_gradient():
    g = torch.Generator().manual_seed(3)
    N, d, V, T = 37, 8, 50, 2.0
    hs, ht = torch.randn(N, d, generator=g), torch.randn(N, d, generator=g)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::3] = -100  # rows with soft targets only
    student_head, teacher_head = torch.nn.Linear(d, V), torch.nn.Linear(d, V)
    from alambic.losses.chunked import vocabulary_losses

    results = {}
    for chunk in (0, 8):
        head = torch.nn.Linear(d, V)
        head.load_state_dict(student_head.state_dict())
        h = hs.clone().requires_grad_()
        kd, ce = vocabulary_losses(h, ht, targets, head, teacher_head, T, chunk_rows=chunk)
        (kd / N + 0.5 * ce / N).backward()
        results[chunk] = (kd.detach(), ce.detach(), h.grad, head.weight.grad)
    for plain, chunked in zip(results[0], results[8]):
        torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        kept = targets != -100
        assert results[0][0].item() == pytest.approx(soft_target_kl(student_head(hs), teacher_head(ht), T).item() * N, rel=1e-5)
        assert results[0][1].item() == pytest.approx(
            token_cross_entropy(student_head(hs)[kept], targets[kept]).item() * int(kept.sum()), rel=1e-5)
