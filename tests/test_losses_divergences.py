"""The divergences of LLM distillation (forward and reverse KL, generalised JSD, skew KL and skew reverse KL, TVD): each
against a direct computation with probabilities (values and gradients), the closed-form gradient against autograd, the
fused vocabulary loss and the top-k path against the plain functions, and the limits, the temperature convention,
accumulation, empty batches and the configuration errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from alambic.errors import AlambicError
from alambic.losses import (
    DEFAULT_DIVERGENCE_PARAMS, DIVERGENCES, check_divergence, distribution_divergence, divergence_logit_gradient,
    divergence_rows, resolve_divergence_param, token_cross_entropy, topk_divergence, topk_targets,
)
from alambic.losses.vocabulary import fused_vocabulary_loss
from test_losses import _linear

# every divergence, those with a parameter away from their default (so the parameter is seen to be used)
CASES = [(name, {"jsd": 0.3, "skew_kl": 0.2, "skew_reverse_kl": 0.4}.get(name)) for name in DIVERGENCES]
# the parameters at the ends of [0, 1] as well
EDGE_CASES = CASES + [("jsd", 0.0), ("jsd", 1.0), ("jsd", 0.9), ("skew_kl", 0.0), ("skew_kl", 1.0),
                      ("skew_reverse_kl", 0.0), ("skew_reverse_kl", 1.0)]


def infinite_where_teacher_is_zero(name, param):
    """KL(q || p) and its skew at 0 are +inf where p = 0 < q."""
    return (name, param) in {("reverse_kl", None), ("jsd", 1.0), ("skew_reverse_kl", 0.0)}


def _kl(x, y):
    """KL(x || y) of each row from probabilities (``F.kl_div`` takes ``log y`` and ``x``; 0 log 0 = 0)."""
    return F.kl_div(y.log(), x, reduction="none").sum(-1)


def direct(p, q, name, param):
    """Each divergence of each row from its definition, on probabilities."""
    if name == "forward_kl":
        return _kl(p, q)
    if name == "reverse_kl":
        return _kl(q, p)
    if name == "jsd":
        m = param * p + (1 - param) * q
        return param * _kl(p, m) + (1 - param) * _kl(q, m)
    if name == "skew_kl":
        return _kl(p, param * p + (1 - param) * q)
    if name == "skew_reverse_kl":
        return _kl(q, (1 - param) * p + param * q)
    assert name == "tvd"
    return 0.5 * (p - q).abs().sum(-1)


def logits(n=8, v=17, seed=0, scale=3.0, zero_teacher=False):
    """Random (student, teacher) logits; with ``zero_teacher``, -inf teacher logits (p exactly 0) in rows 0 and 3."""
    g = torch.Generator().manual_seed(seed)
    student, teacher = torch.randn(n, v, generator=g) * scale, torch.randn(n, v, generator=g) * scale
    if zero_teacher:
        teacher[0, :5] = teacher[3, 7:] = -math.inf
    return student, teacher


def value_and_grad(fn, student):
    student = student.clone().requires_grad_()
    value = fn(student)
    value.backward()
    return value.detach(), student.grad


@pytest.mark.parametrize("name, param", CASES)
@pytest.mark.parametrize("zero_teacher", [False, True])
def test_each_divergence_matches_its_definition_in_value_and_gradient(name, param, zero_teacher):
    student, teacher = logits(zero_teacher=zero_teacher)
    T, N = 2.0, student.shape[0]
    if zero_teacher and infinite_where_teacher_is_zero(name, param):
        assert distribution_divergence(student, teacher, name, param, T).item() == math.inf  # +inf, not nan
        return
    expected = value_and_grad(lambda s: T**2 * direct(torch.softmax(teacher / T, -1), torch.softmax(s / T, -1),
                                                       name, param).sum() / N, student)
    got = value_and_grad(lambda s: distribution_divergence(s, teacher, name, param, T), student)
    assert torch.isfinite(got[0]) and torch.isfinite(got[1]).all()
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, param", CASES)
def test_classes_impossible_for_both_models_change_nothing(name, param):
    """Vocabulary padding masked to -inf in both models (p = q = 0 there): the same value and gradients as without
    the padding, 0 on the padding, and no nan anywhere (every 0 log 0 is 0)."""
    student, teacher = logits()
    pad = torch.full((student.shape[0], 5), -math.inf)
    plain = value_and_grad(lambda s: distribution_divergence(s, teacher, name, param, 2.0), student)
    padded = value_and_grad(lambda s: distribution_divergence(s, torch.cat([teacher, pad], 1), name, param, 2.0),
                            torch.cat([student, pad], 1))
    torch.testing.assert_close(padded[0], plain[0])
    torch.testing.assert_close(padded[1], torch.cat([plain[1], torch.zeros_like(pad)], 1))


@pytest.mark.parametrize("name, param", EDGE_CASES)
@pytest.mark.parametrize("teacher_kind", ["softmax", "zero_teacher", "rounded"])
def test_closed_form_gradient_equals_autograd_of_the_rows(name, param, teacher_kind):
    """``divergence_logit_gradient``: ``h - q sum(h)``, against autograd of ``divergence_rows`` through the
    log-softmax; on a softmax teacher, one with zeros, and one rounded to fp16 (not summing to 1, as stored top-k)."""
    student, teacher = logits(zero_teacher=teacher_kind == "zero_teacher")
    if teacher_kind == "zero_teacher" and infinite_where_teacher_is_zero(name, param):
        return
    log_p = torch.log_softmax(teacher, -1)
    if teacher_kind == "rounded":
        log_p = log_p.half().float()
    s = student.clone().requires_grad_()
    rows = divergence_rows(log_p, torch.log_softmax(s, -1), name, param)
    rows.sum().backward()
    log_q = torch.log_softmax(student, -1)
    inputs = (log_p.clone(), log_q.clone())
    total, grad = divergence_logit_gradient(log_p, log_q, name, param, teacher_normalised=teacher_kind != "rounded")
    assert torch.equal(log_p, inputs[0]) and torch.equal(log_q, inputs[1])  # without scratch: inputs left alone
    torch.testing.assert_close(total, rows.sum().detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, s.grad, rtol=1e-5, atol=1e-6)
    in_place = divergence_logit_gradient(*inputs, name, param, scratch=torch.empty_like(log_q),
                                         teacher_normalised=teacher_kind != "rounded")
    assert torch.equal(in_place[0], total) and torch.equal(in_place[1], grad)


def _problem(seed=3, N=23, d=8, d_t=12, V=40, teacher_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x, xt = torch.randn(N, d, generator=g), torch.randn(N, d_t, generator=g)
    student = (torch.randn(V, d, generator=g), torch.randn(V, generator=g))
    teacher = _linear(torch.randn(V, d_t, generator=g) * teacher_scale, torch.randn(V, generator=g))
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::3] = -100
    return x, xt, student, teacher.requires_grad_(False), targets


def _run(fn, x0, student):
    """``fn(x, projection) -> (loss, kd, ce)`` with 3x the loss back-propagated; values and gradients."""
    x, projection = x0.clone().requires_grad_(), _linear(*student)
    loss, kd, ce = fn(x, projection)
    (3 * loss).backward()
    return [loss.detach(), kd.detach(), ce.detach(), x.grad, projection.weight.grad, projection.bias.grad]


@pytest.mark.parametrize("name, param", CASES)
@pytest.mark.parametrize("chunk", [0, 1, 7])  # whole, a row per chunk, an uneven last chunk (23 = 3 x 7 + 2)
def test_fused_vocabulary_loss_equals_the_direct_functions(name, param, chunk):
    x0, xt, student, teacher, targets = _problem()
    T, kd_weight, ce_weight = 2.0, 5.0 / 23, 2.0 / 15
    kept = targets != -100

    def direct_loss(x, projection):
        z = projection(x)
        kd = distribution_divergence(z, teacher(xt), name, param, T, num_items=1)
        ce = token_cross_entropy(z[kept], targets[kept], num_items=1)
        return kd_weight * kd + ce_weight * ce, kd, ce

    def fused_loss(x, projection):
        return fused_vocabulary_loss(x, projection, xt, teacher, targets, T, kd_weight, ce_weight, chunk,
                                     divergence=name, divergence_param=param)

    for fused, expected in zip(_run(fused_loss, x0, student), _run(direct_loss, x0, student)):
        torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, param", CASES)
def test_fused_vocabulary_loss_under_bf16_autocast_stays_close_to_fp32(name, param):
    x0, xt, student, teacher, targets = _problem(d=32, d_t=32, V=64)

    def fused_loss(x, projection):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fused_vocabulary_loss(x, projection, xt, teacher, targets, 2.0, 1 / 23, 0.5 / 23, 5,
                                         divergence=name, divergence_param=param)

    def direct_loss(x, projection):
        z = projection(x)
        kd = distribution_divergence(z, teacher(xt), name, param, 2.0, num_items=1)
        return kd / 23 + 0.5 / 23 * token_cross_entropy(z[targets != -100], targets[targets != -100], 1), kd, kd

    low, reference = _run(fused_loss, x0, student), _run(direct_loss, x0, student)
    assert low[0].dtype == low[3].dtype == low[4].dtype == torch.float32
    assert low[1].item() == pytest.approx(reference[1].item(), rel=0.05)
    for bf16, fp32 in zip(low[3:], reference[3:]):
        assert (bf16 - fp32).norm() <= 0.05 * fp32.norm()


@pytest.mark.parametrize("name, param", CASES)
def test_topk_with_k_equal_to_the_vocabulary_is_the_full_divergence(name, param):
    student, teacher = logits()
    T = 1.5
    targets = topk_targets(teacher, student.shape[1], T)
    full = value_and_grad(lambda s: distribution_divergence(s, teacher, name, param, T), student)
    topk = value_and_grad(lambda s: topk_divergence(s, *targets, name, param, T), student)
    for a, b in zip(topk, full):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, param", CASES)
def test_topk_divergence_never_exceeds_the_full_one(name, param):
    """Grouping the classes off the top k into one can only lose information (data processing inequality): row by
    row, every k gives at most the full divergence, and a grouped value that is not trivially 0."""
    student, teacher = logits(n=6)
    for row in range(student.shape[0]):
        s, t = student[row:row + 1], teacher[row:row + 1]
        full = distribution_divergence(s, t, name, param, 2.0)
        for k in (1, 3, 10):
            grouped = topk_divergence(s, *topk_targets(t, k, 2.0), name, param, 2.0)
            assert 0 < grouped <= full * (1 + 1e-5) + 1e-7


@pytest.mark.parametrize("name, param", CASES)
@pytest.mark.parametrize("k, chunk", [(5, 1), (5, 7), (40, 0)])
def test_fused_loss_with_topk_targets_equals_the_topk_divergence(name, param, k, chunk):
    x0, _, student, teacher, targets = _problem()
    T, N = 2.0, x0.shape[0]
    g = torch.Generator().manual_seed(9)
    ids, log_p, rest = topk_targets(torch.randn(N, 40, generator=g) * 2, k, T)
    log_p = log_p.half()  # as stored: the k + 1 probabilities no longer sum to 1 exactly
    kept = targets != -100

    def direct_loss(x, projection):
        z = projection(x)
        kd = topk_divergence(z, ids, log_p, rest, name, param, T, num_items=1)
        ce = token_cross_entropy(z[kept], targets[kept], num_items=1)
        return 5.0 / N * kd + 2.0 / N * ce, kd, ce

    def fused_loss(x, projection):
        return fused_vocabulary_loss(x, projection, None, None, targets, T, 5.0 / N, 2.0 / N, chunk,
                                     teacher_topk=(ids, log_p, rest), divergence=name, divergence_param=param)

    for fused, expected in zip(_run(fused_loss, x0, student), _run(direct_loss, x0, student)):
        torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-6)


def test_limits_of_the_parameters_are_the_kls_exactly():
    student, teacher = logits()
    value = {(name, param): distribution_divergence(student, teacher, name, param, 2.0) for name, param in EDGE_CASES}
    forward, reverse = value["forward_kl", None], value["reverse_kl", None]
    assert torch.equal(value["jsd", 0.0], forward) and torch.equal(value["jsd", 1.0], reverse)  # TRL's convention
    assert torch.equal(value["skew_kl", 0.0], forward) and torch.equal(value["skew_reverse_kl", 0.0], reverse)
    assert value["skew_kl", 1.0] == value["skew_reverse_kl", 1.0] == 0  # a distribution against itself
    # the JSD formula itself vanishes at both ends, at the rate of the KL it is replaced by there
    eps = 1e-4
    near_forward = distribution_divergence(student, teacher, "jsd", eps, 2.0)
    near_reverse = distribution_divergence(student, teacher, "jsd", 1 - eps, 2.0)
    assert near_forward < 1e-3 * forward and near_reverse < 1e-3 * reverse
    assert (near_forward / eps).item() == pytest.approx(forward.item(), rel=1e-2)
    assert (near_reverse / eps).item() == pytest.approx(reverse.item(), rel=1e-2)


@pytest.mark.parametrize("name, param", EDGE_CASES)
def test_every_divergence_is_nonnegative_and_zero_on_identical_inputs(name, param):
    student, teacher = logits(scale=5.0)
    log_p, log_q = torch.log_softmax(teacher, -1), torch.log_softmax(student, -1)
    assert (divergence_rows(log_p, log_q, name, param) >= 0).all()
    assert divergence_rows(log_p, log_p, name, param).abs().max() < 1e-6


def test_symmetric_jsd_is_symmetric_tvd_at_most_one_and_none_means_the_default():
    student, teacher = logits()
    jsd = lambda a, b, beta: distribution_divergence(a, b, "jsd", beta)  # noqa: E731
    torch.testing.assert_close(jsd(student, teacher, 0.5), jsd(teacher, student, 0.5))
    torch.testing.assert_close(jsd(student, teacher, 0.3), jsd(teacher, student, 0.7))  # swapping p, q: 1 - beta
    far_apart = torch.eye(4) * 200  # disjoint supports, up to e^-200: total variation 1
    tvd = divergence_rows(torch.log_softmax(far_apart, -1), torch.log_softmax(far_apart.roll(1, 0), -1), "tvd")
    assert (tvd <= 1).all() and tvd.min() > 1 - 1e-6
    student, teacher = logits(scale=5.0)
    assert (divergence_rows(torch.log_softmax(teacher, -1), torch.log_softmax(student, -1), "tvd") <= 1).all()
    for name, default in DEFAULT_DIVERGENCE_PARAMS.items():
        assert torch.equal(distribution_divergence(student, teacher, name), distribution_divergence(
            student, teacher, name, default))


@pytest.mark.parametrize("name, param", CASES)
def test_temperature_softens_both_sides_and_scales_by_t_squared(name, param):
    student, teacher = logits()
    T = 3.0
    torch.testing.assert_close(distribution_divergence(student, teacher, name, param, T),
                               T**2 * distribution_divergence(student / T, teacher / T, name, param, 1.0))


@pytest.mark.parametrize("name, param", CASES)
def test_accumulated_micro_batches_normalised_by_the_global_count_equal_the_whole_batch(name, param):
    """Two micro-batches of 5 and 18 rows, each normalised by the 23 rows of the whole batch: the summed losses and the
    accumulated gradients are those of one call on all rows, for the plain and the fused loss."""
    x0, xt, student, teacher, _ = _problem()
    N, halves = x0.shape[0], (slice(0, 5), slice(5, None))
    s0, t = _linear(*student)(x0).detach(), teacher(xt)
    whole = value_and_grad(lambda s: distribution_divergence(s, t, name, param, 2.0), s0)
    parts = [value_and_grad(lambda s: distribution_divergence(s, t[h], name, param, 2.0, torch.tensor(N)), s0[h])
             for h in halves]
    torch.testing.assert_close(parts[0][0] + parts[1][0], whole[0])
    torch.testing.assert_close(torch.cat([parts[0][1], parts[1][1]]), whole[1])

    projection = _linear(*student)
    x = x0.clone().requires_grad_()
    fused = [fused_vocabulary_loss(x[h], projection, xt[h], teacher, None, 2.0, 1 / N, 0.0, divergence=name,
                                   divergence_param=param)[0] for h in halves]
    (fused[0] + fused[1]).backward()
    accumulated = [x.grad, projection.weight.grad, projection.bias.grad]
    x.grad, projection = None, _linear(*student)
    one_call = fused_vocabulary_loss(x, projection, xt, teacher, None, 2.0, 1 / N, 0.0, divergence=name,
                                     divergence_param=param)[0]
    one_call.backward()
    torch.testing.assert_close(fused[0] + fused[1], one_call, rtol=1e-6, atol=0)
    torch.testing.assert_close(one_call, whole[0])
    for a, b in zip(accumulated, [x.grad, projection.weight.grad, projection.bias.grad]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name, param", CASES)
def test_no_rows_give_zero_without_nan(name, param):
    empty = torch.zeros(0, 9, requires_grad=True)
    ids, log_p, rest = topk_targets(torch.zeros(0, 9), 3)
    x, projection = torch.zeros(0, 4, requires_grad=True), _linear(torch.randn(9, 4))
    for value in (
        distribution_divergence(empty, empty.detach(), name, param, 2.0),
        distribution_divergence(empty, empty.detach(), name, param, 2.0, torch.tensor(0)),
        topk_divergence(empty, ids, log_p, rest, name, param, 2.0),
        fused_vocabulary_loss(x, projection, torch.zeros(0, 4), _linear(torch.randn(9, 4)), None, 2.0, 1.0, 0.0,
                              divergence=name, divergence_param=param)[0],
        fused_vocabulary_loss(x, projection, None, None, None, 2.0, 1.0, 0.0, teacher_topk=(ids, log_p, rest),
                              divergence=name, divergence_param=param)[0],
    ):
        assert value.item() == 0.0
        value.backward()
    assert empty.grad.shape == (0, 9) and projection.weight.grad.abs().sum() == 0


def test_configuration_mistakes_are_one_readable_line_naming_the_fix():
    with pytest.raises(AlambicError) as error:
        check_divergence("revrse_kl", None)
    message = str(error.value)
    assert "loss.divergence" in message and "did you mean 'reverse_kl'" in message and "\n" not in message
    assert all(name in message for name in DIVERGENCES)
    with pytest.raises(AlambicError, match=r"^loss.divergence_param must be in \[0, 1\] for jsd \(beta\), got 1.5$"):
        check_divergence("jsd", 1.5)
    with pytest.raises(AlambicError, match=r"skew_kl \(alpha\), got -0.1"):
        resolve_divergence_param("skew_kl", -0.1)
    with pytest.raises(AlambicError, match="loss.divergence_param is not used by tvd"):
        check_divergence("tvd", 0.5)
    with pytest.raises(AlambicError, match="unknown loss.divergence 'kl'"):  # the losses check too
        distribution_divergence(torch.zeros(2, 3), torch.zeros(2, 3), "kl")
    x, projection = torch.zeros(2, 4), _linear(torch.randn(9, 4))
    with pytest.raises(AlambicError, match="for jsd"):
        fused_vocabulary_loss(x, projection, x, projection, None, 1.0, 1.0, 0.0, divergence="jsd", divergence_param=2)
    check_divergence("skew_reverse_kl", 1)  # the ends of [0, 1] are allowed
    assert resolve_divergence_param("jsd", None) == 0.5 and resolve_divergence_param("skew_kl", 0) == 0.0
    assert resolve_divergence_param("tvd", None) is None and resolve_divergence_param("forward_kl") is None
