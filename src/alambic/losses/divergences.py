"""Divergences between the teacher's and the student's distributions (Hinton et al. 2015; methods.md section 1), and
the soft-target losses built on them.

With ``p = softmax(z_t / T)`` (teacher) and ``q = softmax(z_s / T)`` (student) over the classes (last axis):

- ``forward_kl``: ``KL(p || q) = sum p (log p - log q)`` (Hinton's soft targets; mass-covering)
- ``reverse_kl``: ``KL(q || p)`` (MiniLLM; mode-seeking)
- ``jsd``, ``beta`` in [0, 1] (generalised JSD, TRL/GKD convention): ``beta KL(p || m) + (1 - beta) KL(q || m)`` with
  ``m = beta p + (1 - beta) q``; the formula vanishes at both ends, so ``beta = 0`` is forward KL and ``beta = 1``
  reverse KL, as in TRL
- ``skew_kl``, ``alpha`` in [0, 1] (DistiLLM): ``KL(p || alpha p + (1 - alpha) q)``; ``alpha = 0`` is forward KL
- ``skew_reverse_kl``, ``alpha`` in [0, 1]: ``KL(q || (1 - alpha) p + alpha q)``; ``alpha = 0`` is reverse KL
- ``tvd``: ``1/2 sum |p - q|``

Every loss is computed on ``softmax(z / T)`` of both sides and multiplied by ``T^2`` (Hinton's factor: it keeps the
gradient's magnitude comparable across temperatures), with ``0 log 0 = 0``.

All but TVD are one family, ``D = a KL(p || m) + b KL(q || m)`` with the mixture ``m = w p + (1 - w) q`` (``m = q`` for
forward KL, ``p`` for reverse KL); :func:`_family` gives each its ``(w, a, b)``, and the value and the gradient are
written once for the family. The gradient in closed form, used by the fused vocabulary loss: with ``s = z_s / T`` and
``h = q * dD/dq`` (the gradient with respect to ``log q``),

    ``dD/ds = h - q sum(h)``, so ``d(T^2 D)/dz_s = T (h - q sum(h))``

    family: ``h = b q (log q - log m + 1 - (1 - w) q / m) - a (1 - w) p q / m``, that is
    forward KL ``-p``; reverse KL ``q (log q - log p + 1)``; JSD ``(1 - beta) q (log q - log m)``;
    skew KL ``-(1 - alpha) p q / m``; skew reverse KL ``q (log q + 1 - log m - alpha q / m)``;
    and TVD ``1/2 q sign(q - p)``.
"""

import math
import numbers

import torch
import torch.nn.functional as F

from alambic.errors import AlambicError, did_you_mean
from alambic.losses.reduction import per_item_mean

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")
DEFAULT_DIVERGENCE_PARAMS = {"jsd": 0.5, "skew_kl": 0.1, "skew_reverse_kl": 0.1}
_PARAM_NAMES = {"jsd": "beta", "skew_kl": "alpha", "skew_reverse_kl": "alpha"}
# x (log x - log y) is 0 where x = 0 (log x - log y is then -inf, or nan where y = 0 too), and +inf where y = 0 < x
_ZERO_LOG_ZERO = {"nan": 0.0, "posinf": math.inf, "neginf": 0.0}
_FLOAT_MIN = torch.finfo(torch.float32).min


def check_divergence(divergence: str, param: float | None = None) -> None:
    """Raise an :class:`AlambicError` (one line, naming the fix) unless ``divergence`` is one of :data:`DIVERGENCES`
    and ``param`` is None, or a number in [0, 1] for a divergence that takes one."""
    if divergence not in DIVERGENCES:
        raise AlambicError(f"unknown loss.divergence {divergence!r}{did_you_mean(str(divergence), DIVERGENCES)}; "
                           f"choose one of {', '.join(DIVERGENCES)}")
    if param is None:
        return
    if divergence not in _PARAM_NAMES:
        raise AlambicError(f"loss.divergence_param is not used by {divergence}, which takes no parameter: remove it")
    if isinstance(param, bool) or not isinstance(param, numbers.Real) or not 0 <= param <= 1:
        raise AlambicError(f"loss.divergence_param must be in [0, 1] for {divergence} ({_PARAM_NAMES[divergence]}), "
                           f"got {param}")


def resolve_divergence_param(divergence: str, param: float | None = None) -> float | None:
    """The checked parameter of ``divergence``: ``param``, or :data:`DEFAULT_DIVERGENCE_PARAMS`'s when None (None for
    a divergence without one)."""
    check_divergence(divergence, param)
    return DEFAULT_DIVERGENCE_PARAMS.get(divergence) if param is None else float(param)


# Each divergence of the family as (w, a, b) of D = a KL(p || m) + b KL(q || m), m = w p + (1 - w) q, from its parameter
_FAMILY = {
    "forward_kl": lambda _: (0.0, 1.0, 0.0),  # KL(p || q)
    "reverse_kl": lambda _: (1.0, 0.0, 1.0),  # KL(q || p)
    "jsd": lambda beta: (beta, beta, 1 - beta),
    "skew_kl": lambda alpha: (alpha, 1.0, 0.0),  # KL(p || alpha p + (1 - alpha) q)
    "skew_reverse_kl": lambda alpha: (1 - alpha, 0.0, 1.0),  # KL(q || (1 - alpha) p + alpha q)
}


def _family(divergence: str, param: float | None):
    """``(w, a, b)`` of ``divergence`` (checked, at its default parameter if None) in the family; None for TVD."""
    param = resolve_divergence_param(divergence, param)
    if divergence == "jsd" and param in (0.0, 1.0):  # the JSD formula vanishes at both ends: TRL's limits instead
        divergence = "forward_kl" if param == 0 else "reverse_kl"
    if divergence == "tvd":
        return None
    w, a, b = _FAMILY[divergence](param)
    # KL(p || m) with m = p, and KL(q || m) with m = q, are 0: dropped (skew KL and skew reverse KL at 1)
    return w, (0.0 if w == 1 else a), (0.0 if w == 0 else b)


def _log_mixture(log_p: torch.Tensor, log_q: torch.Tensor, w: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """``log(w p + (1 - w) q)`` for ``0 < w < 1``, as a log-sum-exp (a sum of probabilities would underflow).

    The clamp keeps it finite (about -3.4e38) where ``p = q = 0``, so that no ``-inf - -inf`` reaches a value or a
    gradient (log-sum-exp's gradient at two ``-inf`` is nan)."""
    return torch.logaddexp(torch.add(log_p, math.log(w), out=out),
                           (log_q + math.log1p(-w)).clamp_(min=_FLOAT_MIN), out=out)


def _kl_rows(log_x: torch.Tensor, log_y: torch.Tensor) -> torch.Tensor:
    """``sum x (log x - log y)`` over the last axis, ``0 log 0 = 0``."""
    return (log_x.exp() * (log_x - log_y).nan_to_num(**_ZERO_LOG_ZERO)).sum(-1)


def divergence_rows(log_p: torch.Tensor, log_q: torch.Tensor, divergence: str, param: float | None = None):
    """``D(p, q)`` of each row, without ``T^2``: the one place each divergence's value is computed.

    Shapes: ``(N, C), (N, C) -> (N,)``: fp32 log-probabilities of the teacher and the student (the teacher's need not
    sum to 1 exactly: stored top-k probabilities are rounded). ``param`` None takes the divergence's default.
    Differentiable; :func:`divergence_logit_gradient` is its gradient in closed form.
    """
    family = _family(divergence, param)
    if family is None:
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    w, a, b = family
    if not (a or b):  # skew KL or skew reverse KL at 1 compare a distribution with itself: 0, but still on the graph
        return log_q.exp().sum(-1) * 0
    log_m = log_q if w == 0 else log_p if w == 1 else _log_mixture(log_p, log_q, w)
    rows = log_q.new_zeros(log_q.shape[:-1])
    for weight, log_x in ((a, log_p), (b, log_q)):
        if weight:
            rows = rows + weight * _kl_rows(log_x, log_m)
    return rows


def _dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.dot(x.reshape(-1), y.reshape(-1))


def divergence_logit_gradient(
    log_p: torch.Tensor,
    log_q: torch.Tensor,
    divergence: str,
    param: float | None = None,
    scratch: torch.Tensor | None = None,
    teacher_normalised: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sum of :func:`divergence_rows` and, in closed form, its gradient ``dD/ds`` where ``log_q = log_softmax(s)``.

    ``dD/ds = h - q sum(h)`` with ``h = q dD/dq`` (module docstring); times ``T``, the gradient of ``T^2 D`` with
    respect to the logits ``z_s = T s``. Shapes: ``(N, C), (N, C) -> (), (N, C)``; fp32, no autograd.

    For memory (the fused vocabulary loss runs it on chunks of rows): given ``scratch``, a free fp32 buffer shaped like
    ``log_q``, it works in place, overwriting ``log_p``, ``log_q`` and ``scratch`` and returning the gradient in one of
    them, with at most one more such buffer alive at a time; without ``scratch`` its inputs are left alone.
    ``teacher_normalised=False`` where ``p`` may not sum to 1 (stored top-k probabilities, rounded to fp16): forward
    KL's ``h = -p`` then keeps its sum in the gradient, ``q sum(p) - p``, rather than the softmax's ``q - p``.
    """
    log_p, log_q = log_p.detach(), log_q.detach()
    if scratch is None:
        log_p, log_q, scratch = log_p.clone(), log_q.clone(), torch.empty_like(log_q)
    family = _family(divergence, param)
    if family is None:  # TVD: h = 1/2 q sign(q - p)
        p, q = torch.exp(log_p, out=scratch), log_q.exp_()
        difference = torch.sub(q, p, out=log_p)
        sign = torch.sign(difference, out=scratch)
        total = 0.5 * _dot(difference, sign)
        h = sign.mul_(q).mul_(0.5)
    elif family == (0.0, 1.0, 0.0):  # forward KL: h = -p
        p = torch.exp(log_p, out=scratch)
        total = _dot(p, log_p.sub_(log_q).nan_to_num_(**_ZERO_LOG_ZERO))
        q, h = log_q.exp_(), p.neg_()
        if teacher_normalised:  # sum(h) = -1
            return total, q.add_(h)
    else:
        w, a, b = family
        log_m = log_q if w == 0 else log_p if w == 1 else _log_mixture(log_p, log_q, w, out=scratch)
        total = log_q.new_zeros(())
        if a:  # a KL(p || m); here w < 1 (see _family), so log m is not in log p's buffer
            p = log_p.exp()
            total += a * _dot(p, log_p.sub_(log_m).nan_to_num_(**_ZERO_LOG_ZERO))
        log_ratio = torch.sub(log_q, log_m, out=scratch)  # log q - log m
        q_over_m = torch.exp(log_ratio, out=log_p) if w < 1 else None  # at most 1 / (1 - w)
        log_ratio.nan_to_num_(**_ZERO_LOG_ZERO)
        q = log_q.exp_()
        if b:  # b KL(q || m), and h = b q (log q - log m + 1 - (1 - w) q / m) ...
            total += b * _dot(q, log_ratio)
            h = log_ratio.add_(1)
            if w < 1:
                h.sub_(q_over_m, alpha=1 - w)
            h.mul_(q)
            if b != 1:
                h.mul_(b)
        else:
            h = log_ratio.zero_()
        if a:  # ... - a (1 - w) p q / m
            h.addcmul_(p, q_over_m, value=-a * (1 - w))
    return total, h.sub_(q.mul_(h.sum(-1, keepdim=True)))


def distribution_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence: str = "forward_kl",
    param: float | None = None,
    temperature: float = 1.0,
    num_items: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """A divergence between the temperature-softened distributions, scaled by T^2.

    ``L = T^2 * sum_rows D(softmax(z_t / T), softmax(z_s / T)) / num_items``, ``D`` one of :data:`DIVERGENCES` (module
    docstring) at parameter ``param`` (None: its default).

    Shapes: ``(N, V), (N, V) -> ()``; one row per token (or example) that counts. The softmax is over the vocabulary
    (last) axis and computed in fp32 whatever the input dtype; gradients by autograd. ``T^2`` keeps the gradient's
    magnitude comparable across temperatures.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ: "
            "teacher and student must share one vocabulary"
        )
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return per_item_mean(divergence_rows(log_p, log_q, divergence, param), num_items) * temperature**2


def soft_target_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    num_items: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Temperature-softened KL divergence, scaled by T^2: :func:`distribution_divergence`'s forward KL.

    ``L = T^2 * sum_rows KL(softmax(z_t / T) || softmax(z_s / T)) / num_items``

    Shapes: ``(N, V), (N, V) -> ()``. KL rather than cross-entropy: same gradient, but 0 when the student matches the
    teacher.
    """
    return distribution_divergence(student_logits, teacher_logits, "forward_kl", None, temperature, num_items)


def logit_mse(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    num_items: int | torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error between logits (the Korean RoBERTa study's prediction-layer loss), in fp32.

    ``L = sum_rows mean_{valid columns} (z_s - z_t)^2 / num_items``

    Shapes: ``(N, C), (N, C) [, mask (N, C) bool] -> ()``; one row per example or token that counts. ``mask`` marks
    the columns that count in each row (for QA: the context positions a start or end may take); without it every
    column counts, which with ``num_items = N`` is ``torch.nn.MSELoss()`` on the rows. Unlike the KL, MSE does not
    ignore a constant shift of the logits: it matches the teacher's logits, not only its distribution.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ: "
            "teacher and student must predict the same classes"
        )
    error = (student_logits.float() - teacher_logits.float()).pow(2)
    if mask is None:
        row_error = error.mean(dim=-1)
    else:
        row_error = torch.where(mask, error, torch.zeros((), device=error.device)).sum(dim=-1)
        row_error = row_error / mask.sum(dim=-1).clamp(min=1)
    return per_item_mean(row_error, num_items)


def topk_targets(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0):
    """The teacher's softened distribution kept as its ``k`` most probable classes plus the rest of the mass.

    ``p = softmax(z_t / T)``; returns ``(ids, log_probs, rest_log_prob)``: the top-``k`` class ids ``(N, k)`` (most
    probable first), ``log p`` at those ids ``(N, k)`` and ``log(1 - sum_topk p)`` ``(N,)``, computed as a log-sum-exp
    over the other classes (no cancellation; ``-inf`` when ``k = V``). fp32 whatever the input dtype.
    """
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    top = log_p.topk(min(k, log_p.shape[-1]), dim=-1)
    rest = torch.logsumexp(log_p.scatter(-1, top.indices, float("-inf")), dim=-1)
    return top.indices, top.values, rest


def topk_classes(log_q: torch.Tensor, ids: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """The student's log-probabilities over the ``k + 1`` classes of stored top-k targets: ``log q`` at the ``ids``,
    then the log of its mass off them (a log-sum-exp; ``-inf`` when the ids cover every class).

    Shapes: ``(N, V), (N, k) long -> (N, k + 1)``. ``scratch``, a free buffer shaped like ``log_q``, saves a copy.
    """
    off = log_q.scatter(-1, ids, -math.inf) if scratch is None else scratch.copy_(log_q).scatter_(-1, ids, -math.inf)
    return torch.cat([log_q.gather(-1, ids), torch.logsumexp(off, -1, keepdim=True)], -1)


def topk_divergence(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_log_probs: torch.Tensor,
    rest_log_prob: torch.Tensor,
    divergence: str = "forward_kl",
    param: float | None = None,
    temperature: float = 1.0,
    num_items: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """A divergence from a teacher kept as its top-k classes plus one "rest" class (offline teacher outputs), x T^2.

    With ``K`` the stored ids, ``P`` the teacher's distribution over the ``k + 1`` classes (the stored ``p_i``, at
    temperature T, and ``p_rest = 1 - sum_K p_i``) and ``Q`` the student's ``q = softmax(z_s / T)`` grouped the same
    way (``q_i`` on ``K``, ``q_rest = 1 - sum_K q_i``, see :func:`topk_classes`):

    ``L = T^2 * sum_rows D(P, Q) / num_items``   (:func:`divergence_rows`; ``D`` as in :func:`distribution_divergence`)

    Grouping classes never increases a divergence (data processing), and with ``k = V`` (``rest_log_prob = -inf``)
    this is :func:`distribution_divergence` exactly. Shapes: ``(N, V), (N, k) long, (N, k), (N,) -> ()``; fp32 math.
    """
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = torch.cat([topk_log_probs.float(), rest_log_prob.float().unsqueeze(-1)], -1)
    rows = divergence_rows(log_p, topk_classes(log_q, topk_ids), divergence, param)
    return per_item_mean(rows, num_items) * temperature**2


def topk_soft_target_kl(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_log_probs: torch.Tensor,
    rest_log_prob: torch.Tensor,
    temperature: float = 1.0,
    num_items: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """KL from a teacher kept as its top-k classes plus one "rest" class, x T^2: :func:`topk_divergence`'s forward KL.

    ``L = T^2 * sum_rows [ sum_{i in K} p_i (log p_i - log q_i) + p_rest (log p_rest - log q_rest) ] / num_items``

    Its gradient is ``T (q sum(P) - p~)`` with ``p~ = p`` on ``K`` and the teacher's rest mass spread like the
    student's, ``p~_j = p_rest q_j / q_rest``, off it (``sum(P)`` is 1 up to the rounding of stored probabilities).
    """
    return topk_divergence(student_logits, topk_ids, topk_log_probs, rest_log_prob, "forward_kl", None, temperature,
                           num_items)
