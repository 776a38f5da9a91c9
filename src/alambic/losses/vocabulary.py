"""The two vocabulary-sized losses of LM distillation, fused with the output projection and computed in row chunks.

A vocabulary of V and N rows make every (N, V) tensor large (8 x 4,096 tokens of a 128k vocabulary: 16 GB in fp32),
and written as separate ops (projection, log-softmax, divergence, cross-entropy, their backwards) autograd keeps
several of them and sweeps them a dozen times. Here the projection and both losses run together, a chunk of rows at a
time, and each chunk's gradients are computed in the forward pass from the closed forms

    d(T^2 D(p_T, q_T)) / dz_s = T (h - q_T sum(h))        d CE / dz_s = softmax(z_s) - onehot(target)

(p_T, q_T: teacher and student softmax at temperature T; D one of the divergences of
:mod:`alambic.losses.divergences`, ``h = q_T dD/dq_T``, for the default forward KL ``h = -p_T`` and the gradient
``T (q_T - p_T)``; :func:`alambic.losses.divergences.divergence_logit_gradient`), then multiplied back through the
projection at once. Only ``chunk_rows x V`` fp32 buffers are ever alive (four, and one more for a moment for the
divergences other than forward and reverse KL and TVD), nothing vocabulary-sized is kept for backward, and no
projection is recomputed (the same idea as Liger-Kernel's fused linear cross-entropy). Tested against the unfused
formulas, values and gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from alambic.losses.divergences import divergence_logit_gradient, resolve_divergence_param, topk_classes

_CHUNK_LOGITS = {"cpu": 2**23, "cuda": 2**26}  # logits per chunk: ~32 MB (cache-sized) on CPU, ~256 MB on GPU
# Below fp32, the chunks' logit gradients are kept (in the compute dtype) for up to this many logits and multiplied
# into the weight gradient at once: a bf16 product per chunk would need a cast and an add over the whole V x d weight
# gradient each time (on CPU that cost more than the product itself), and one product over more rows runs faster.
_GROUP_LOGITS = {"cpu": 2**26, "cuda": 2**27}


def default_chunk_rows(vocab_size: int, device: torch.device) -> int:
    return max(1, _CHUNK_LOGITS.get(device.type, _CHUNK_LOGITS["cuda"]) // vocab_size)


def fused_vocabulary_loss(
    student_features: torch.Tensor,
    student_projection: nn.Linear,
    teacher_features: torch.Tensor | None,
    teacher_projection: nn.Linear | None,
    targets: torch.Tensor | None,
    temperature: float,
    kd_weight: float | torch.Tensor,
    ce_weight: float | torch.Tensor,
    chunk_rows: int = 0,
    teacher_topk: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    divergence: str = "forward_kl",
    divergence_param: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted soft-target divergence plus hard cross-entropy on projected rows, and each sum for logging.

    With ``z_s = student_projection(student_features)``, ``z_t = teacher_projection(teacher_features)`` and ``D`` the
    ``divergence`` at parameter ``divergence_param`` (None: its default; see :mod:`alambic.losses.divergences`):

    ``kd_sum = T^2 * sum_rows D(softmax(z_t / T), softmax(z_s / T))``   (:func:`distribution_divergence` x ``N``)
    ``ce_sum = sum_{rows with target != -100} -log softmax(z_s)[target]``  (:func:`token_cross_entropy` x rows)
    ``loss = kd_weight * kd_sum + ce_weight * ce_sum``

    Shapes: features ``(N, d_s)`` / ``(N, d_t)``, projections ``d -> V`` (the models' output Linear layers, see
    :func:`alambic.modeling.split_lm_head`), targets ``(N,)``. Returns ``(loss, kd_sum, ce_sum)``; only ``loss``
    carries gradients (to the student's features and projection), the sums are detached. ``teacher_features=None``
    (and no ``teacher_topk``) skips the divergence, ``targets=None`` the cross-entropy. The weights are the caller's
    normalisation (``alpha / num_items``), plain numbers or tensors. Softmax math is fp32; under autocast the
    projections run in the autocast dtype. ``chunk_rows=0`` picks a chunk size from V and the device.

    ``teacher_topk = (ids (N, k), log_probs (N, k), rest_log_prob (N,))`` replaces the teacher's features and
    projection with stored top-k outputs (:func:`alambic.losses.divergences.topk_targets`, made at the same T): the
    divergence is then :func:`alambic.losses.divergences.topk_divergence`'s, over the ``k + 1`` classes.
    """
    if teacher_features is None and targets is None and teacher_topk is None:
        raise ValueError("fused_vocabulary_loss needs teacher outputs (divergence), targets (cross-entropy) or both")
    if teacher_features is not None and teacher_topk is not None:
        raise ValueError("give the teacher as features and projection, or as top-k outputs, not both")
    divergence_param = resolve_divergence_param(divergence, divergence_param)
    teacher_weight, teacher_bias = (
        (teacher_projection.weight, teacher_projection.bias) if teacher_features is not None else (None, None))
    topk_ids, topk_log_probs, rest_log_prob = teacher_topk or (None, None, None)
    return _FusedVocabularyLoss.apply(
        student_features, student_projection.weight, student_projection.bias, teacher_features, teacher_weight,
        teacher_bias, targets,
        float(temperature), torch.as_tensor(kd_weight, dtype=torch.float32, device=student_features.device),
        torch.as_tensor(ce_weight, dtype=torch.float32, device=student_features.device), chunk_rows,
        topk_ids, topk_log_probs, rest_log_prob, divergence, divergence_param,
    )


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    device = tensor.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else tensor.dtype


def _project(out: torch.Tensor, features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: float):
    """``out = scale * (features @ weight.T + bias)`` in fp32 ``out``, without an intermediate when all is fp32."""
    if features.dtype == weight.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32):
        if bias is None:
            torch.mm(features, weight.t(), out=out)
            return out.mul_(scale) if scale != 1 else out
        return torch.addmm(bias, features, weight.t(), beta=scale, alpha=scale, out=out)
    out.copy_(F.linear(features, weight, bias))
    return out.mul_(scale) if scale != 1 else out


class _FusedVocabularyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, x_t, weight_t, bias_t, targets, temperature, kd_weight, ce_weight, chunk_rows,
                topk_ids, topk_log_probs, rest_log_prob, divergence, param):
        # Autocast's choice is applied by hand (matmuls in its dtype, softmax math in fp32) and autocast is then
        # switched off, so no reduction below (the divergence's dot products) silently runs in bf16.
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            return _FusedVocabularyLoss._forward(ctx, dtype, x, weight, bias, x_t, weight_t, bias_t, targets,
                                                 temperature, kd_weight, ce_weight, chunk_rows,
                                                 topk_ids, topk_log_probs, rest_log_prob, divergence, param)

    @staticmethod
    def _forward(ctx, dtype, x, weight, bias, x_t, weight_t, bias_t, targets, temperature, kd_weight, ce_weight,
                 chunk_rows, topk_ids, topk_log_probs, rest_log_prob, divergence, param):
        x_c, w_c = x.to(dtype), weight.to(dtype)
        b_c = bias.to(dtype) if bias is not None else None
        rows, vocab = x.shape[0], weight.shape[0]
        sparse = topk_ids is not None
        with_kd, with_ce = x_t is not None or sparse, targets is not None
        if with_kd and not sparse:
            x_t, weight_t = x_t.to(dtype), weight_t.to(dtype)
            bias_t = bias_t.to(dtype) if bias_t is not None else None
        chunk = chunk_rows if chunk_rows > 0 else default_chunk_rows(vocab, x.device)
        chunk = max(1, min(chunk, rows))
        logits, spare, grad = (torch.empty(chunk, vocab, dtype=torch.float32, device=x.device) for _ in range(3))
        teacher_buffer = torch.empty_like(logits) if with_kd and not sparse else None
        grad_x = torch.empty_like(x)
        grad_w = None  # V x d, fp32 where several products add up; the first product is written, later ones added
        grad_b = torch.zeros(vocab, dtype=torch.float32, device=x.device) if bias is not None else None
        if dtype == torch.float32:
            group_rows, group = chunk, None
        else:
            group_logits = _GROUP_LOGITS.get(x.device.type, _GROUP_LOGITS["cuda"])
            group_rows = min(rows, max(chunk, group_logits // vocab // chunk * chunk))
            group = torch.empty(group_rows, vocab, dtype=dtype, device=x.device)
        kd_sum, ce_sum = x.new_zeros((), dtype=torch.float32), x.new_zeros((), dtype=torch.float32)
        T = temperature
        if with_ce:
            valid = (targets != -100).float().unsqueeze(1)
            safe_targets = targets.clamp(min=0).unsqueeze(1)
        for start in range(0, rows, chunk):
            part = slice(start, start + chunk)
            n = min(chunk, rows - start)
            z, buf, g32 = logits[:n], spare[:n], grad[:n]
            if with_kd and not sparse:
                log_p = torch.log_softmax(_project(buf, x_t[part], weight_t, bias_t, 1 / T), -1, out=teacher_buffer[:n])
            _project(z, x_c[part], w_c, b_c, 1.0)
            if with_ce:
                log_q1 = torch.log_softmax(z, -1, out=buf)
                ce_sum -= (log_q1.gather(1, safe_targets[part]) * valid[part]).sum()
                softmax_minus_onehot = log_q1.exp_().scatter_add_(1, safe_targets[part], -valid[part])
                torch.mul(softmax_minus_onehot, valid[part] * ce_weight, out=g32)
            if with_kd:
                log_q = torch.log_softmax(z.mul_(1 / T), -1, out=buf)
                if sparse:
                    teacher = torch.cat([topk_log_probs[part].float(), rest_log_prob[part].float().unsqueeze(1)], 1)
                    kd_part, kd_grad = _topk_chunk(log_q, z, topk_ids[part], teacher, divergence, param)
                else:
                    kd_part, kd_grad = divergence_logit_gradient(log_p, log_q, divergence, param, scratch=z)
                kd_sum += kd_part
                if with_ce:
                    g32.addcmul_(kd_grad, kd_weight * T)
                else:
                    torch.mul(kd_grad, kd_weight * T, out=g32)
            if grad_b is not None:
                grad_b += g32.sum(0)
            if group is None:  # fp32: accumulate the weight gradient in place, chunk by chunk
                grad_x[part] = g32 @ w_c
                grad_w = g32.t() @ x_c[part] if grad_w is None else grad_w.addmm_(g32.t(), x_c[part])
                continue
            offset = start % group_rows
            g = group[offset:offset + n]
            g.copy_(g32)
            grad_x[part] = (g @ w_c).to(x.dtype)
            end = start + n
            if end % group_rows == 0 or end == rows:  # the group is full (or the rows are done): one product
                product = group[:offset + n].t() @ x_c[start - offset:end]
                if grad_w is None and end == rows and weight.dtype == dtype:
                    grad_w = product  # one product is the whole gradient, in the weight's dtype: no fp32 round trip
                else:
                    grad_w = product.float() if grad_w is None else grad_w.add_(product)
        if grad_w is None:  # no rows
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device)
        kd_sum = kd_sum * T**2
        ctx.save_for_backward(grad_x, grad_w, grad_b)
        ctx.param_dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        loss = kd_weight * kd_sum + ce_weight * ce_sum
        ctx.mark_non_differentiable(kd_sum, ce_sum)
        return loss, kd_sum, ce_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        grad_x, grad_w, grad_b = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.param_dtypes
        # In place: these were computed for this backward alone (a V x d weight gradient is too big to copy).
        grad_x = grad_x.mul_(grad_loss.to(grad_x.dtype))
        grad_w = grad_w.mul_(grad_loss).to(weight_dtype)
        grad_b = grad_b.mul_(grad_loss).to(bias_dtype) if grad_b is not None else None
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None, None, None, None, None, None, None


def _topk_chunk(log_q, scratch, ids, log_p, divergence, param):
    """One chunk of the top-k divergence (before T^2) and its gradient ``dD/ds``, the latter in ``log_q``'s buffer.

    ``log_p``: the teacher over the k + 1 classes, ``(n, k + 1)``; ``scratch``: a free ``(n, V)`` fp32 buffer. The
    gradient ``G`` over the k + 1 classes goes to the stored ids as it is; the rest class's logit is the log-sum-exp
    of the logits off the ids, so (chain rule) each class ``j`` off them gets ``G_rest q_j / q_rest``, with
    ``q_j / q_rest <= 1`` taken in log space (no overflow as ``q_rest`` vanishes). The stored probabilities are rounded,
    so the teacher is not taken to sum to 1 (forward KL's gradient keeps their mass).
    """
    log_q_top_rest = topk_classes(log_q, ids, scratch)
    kd, grad = divergence_logit_gradient(log_p, log_q_top_rest, divergence, param, teacher_normalised=False)
    # (at k = V, log q_rest = -inf and every class is an id: the scatter overwrites the whole row)
    return kd, log_q.sub_(log_q_top_rest[:, -1:]).exp_().mul_(grad[:, -1:]).scatter_(1, ids, grad[:, :-1])
