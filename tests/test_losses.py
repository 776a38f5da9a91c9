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


def _linear(weight, bias=None):
    """A Linear layer (a model's output projection) holding copies of ``weight`` and ``bias``."""
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def _direct_vocabulary_loss(x, projection, xt, teacher_projection, targets, T, kd_weight, ce_weight):
    """The fused loss written with the plain functions on full logits."""
    logits = projection(x)
    kd = (soft_target_kl(logits, teacher_projection(xt), T, num_items=1) if xt is not None
          else logits.new_zeros(()))
    ce = logits.new_zeros(())
    if targets is not None:
        kept = targets != -100
        ce = token_cross_entropy(logits[kept], targets[kept], num_items=1)
    return kd_weight * kd + ce_weight * ce, kd, ce


@pytest.mark.parametrize("chunk", [0, 1, 7, 100])
@pytest.mark.parametrize("terms", ["both", "kd", "ce"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_vocabulary_loss_equals_the_direct_formulas_in_value_and_gradients(chunk, terms, with_bias):
    from alambic.losses.vocabulary import fused_vocabulary_loss

    g = torch.Generator().manual_seed(3)
    N, d, d_t, V, T = 37, 8, 12, 50, 2.0  # teacher wider than the student: each has its own projection
    x0, xt = torch.randn(N, d, generator=g), torch.randn(N, d_t, generator=g)
    w0, wt = torch.randn(V, d, generator=g), torch.randn(V, d_t, generator=g)
    b0, bt = (torch.randn(V, generator=g), torch.randn(V, generator=g)) if with_bias else (None, None)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::3] = -100  # rows with soft targets only
    targets[-8:] = -100  # a whole chunk without hard targets
    teacher = _linear(wt, bt).requires_grad_(False)
    xt = xt if terms != "ce" else None
    targets = targets if terms != "kd" else None
    kd_weight, ce_weight = torch.tensor(5.0 / N), 2.0 / 20

    results = []
    for fn in ("direct", "fused"):
        x, projection = x0.clone().requires_grad_(), _linear(w0, b0)
        if fn == "direct":
            loss, kd, ce = _direct_vocabulary_loss(x, projection, xt, teacher, targets, T, kd_weight, ce_weight)
        else:
            loss, kd, ce = fused_vocabulary_loss(x, projection, xt, teacher, targets, T, kd_weight, ce_weight, chunk)
            assert not kd.requires_grad and not ce.requires_grad  # sums are for logging
        (3 * loss).backward()  # a scaled upstream gradient flows through
        results.append([loss, kd, ce, x.grad, projection.weight.grad]
                       + ([projection.bias.grad] if with_bias else []))
    for direct, fused in zip(*results):
        torch.testing.assert_close(fused.detach(), direct.detach(), rtol=1e-5, atol=1e-6)


def test_fused_vocabulary_loss_on_no_rows_is_zero():
    from alambic.losses.vocabulary import fused_vocabulary_loss

    x, projection = torch.zeros(0, 4, requires_grad=True), _linear(torch.randn(9, 4))
    loss, kd, ce = fused_vocabulary_loss(x, projection, torch.zeros(0, 4), _linear(torch.randn(9, 4)),
                                         torch.zeros(0, dtype=torch.long), 2.0, 1.0, 1.0)
    loss.backward()
    assert loss.item() == kd.item() == ce.item() == 0.0 and projection.weight.grad.abs().sum() == 0


def test_fused_vocabulary_loss_under_bf16_autocast_stays_close_to_fp32():
    from alambic.losses.vocabulary import fused_vocabulary_loss

    g = torch.Generator().manual_seed(0)
    x, xt = torch.randn(16, 32, generator=g, requires_grad=True), torch.randn(16, 32, generator=g)
    projection, teacher = _linear(torch.randn(64, 32, generator=g)), _linear(torch.randn(64, 32, generator=g))
    targets = torch.randint(0, 64, (16,), generator=g)
    args = (x, projection, xt, teacher, targets, 2.0, 1 / 16, 1 / 16)
    reference = fused_vocabulary_loss(*args)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = fused_vocabulary_loss(*args)[0]
    low.backward()
    assert low.dtype == projection.weight.grad.dtype == x.grad.dtype == torch.float32
    assert low.item() == pytest.approx(reference.item(), rel=0.05)


@pytest.mark.parametrize("chunk, group_logits", [(0, None), (1, 64 * 3), (5, 64 * 10), (5, 64 * 7), (16, 64)])
def test_fused_vocabulary_loss_gradients_under_bf16_match_fp32(chunk, group_logits, monkeypatch):
    """Below fp32 the chunks' logit gradients are multiplied into the weight gradient a group of rows at a time:
    every grouping (one row per chunk, groups of 3, 10, 5 rows with a partial last group) gives fp32's gradients to
    bf16 precision."""
    from alambic.losses import vocabulary

    if group_logits is not None:
        monkeypatch.setitem(vocabulary._GROUP_LOGITS, "cpu", group_logits)
    g = torch.Generator().manual_seed(1)
    N, d, V = 23, 32, 64
    x0, xt = torch.randn(N, d, generator=g), torch.randn(N, d, generator=g)
    projection, teacher = _linear(torch.randn(V, d, generator=g), torch.randn(V, generator=g)), _linear(
        torch.randn(V, d, generator=g))
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::4] = -100
    grads = []
    for low in (False, True):
        x = x0.clone().requires_grad_()
        projection.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
            loss = vocabulary.fused_vocabulary_loss(x, projection, xt, teacher, targets, 2.0, 1 / N, 0.5 / N, chunk)[0]
        (2 * loss).backward()
        grads.append([x.grad, projection.weight.grad, projection.bias.grad])
    for fp32, bf16 in zip(*grads):
        assert bf16.dtype == torch.float32
        assert (bf16 - fp32).norm() <= 0.02 * fp32.norm()


@pytest.mark.parametrize("chunk, group_logits", [(0, None), (5, 64 * 10), (5, 64 * 7)])
def test_fused_vocabulary_loss_with_bf16_parameters_matches_fp32(chunk, group_logits, monkeypatch):
    """bf16 parameters and features (``mixed_precision: bf16``, fp32 masters in the optimiser): the gradients come
    back in bf16, equal to fp32's to bf16 precision, whether one product makes the weight gradient (no groups) or
    several groups add up in fp32 (groups of 10 and of 5 rows with a partial last group)."""
    from alambic.losses import vocabulary

    if group_logits is not None:
        monkeypatch.setitem(vocabulary._GROUP_LOGITS, "cpu", group_logits)
    g = torch.Generator().manual_seed(2)
    N, d, V = 23, 32, 64
    x0, xt = torch.randn(N, d, generator=g), torch.randn(N, d, generator=g)
    weight, bias = torch.randn(V, d, generator=g), torch.randn(V, generator=g)
    teacher_weight = torch.randn(V, d, generator=g)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::4] = -100
    grads = []
    for dtype in (torch.float32, torch.bfloat16):
        x = x0.to(dtype, copy=True).requires_grad_()
        projection, teacher = _linear(weight, bias).to(dtype), _linear(teacher_weight).to(dtype)
        loss = vocabulary.fused_vocabulary_loss(x, projection, xt.to(dtype), teacher, targets, 2.0, 1 / N, 0.5 / N,
                                                chunk)[0]
        (2 * loss).backward()
        grads.append([x.grad, projection.weight.grad, projection.bias.grad])
    for fp32, bf16 in zip(*grads):
        assert bf16.dtype == torch.bfloat16
        assert (bf16.float() - fp32).norm() <= 0.02 * fp32.norm()
