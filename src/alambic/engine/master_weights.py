"""bf16 compute with fp32 master weights (``training.mixed_precision: bf16``; apex's "O2", Megatron's bf16 scheme).

The student's parameters are bf16 tensors, so its forward and backward run in bf16 throughout: no cast of any
Linear's input or weight, as bf16 autocast does on every call while the parameters stay fp32. The optimiser owns an
fp32 copy of every parameter (the master weights). After the backward pass, :meth:`MasterWeights.gradients_in` copies
the bf16 gradients into the masters' fp32 gradients (one multi-tensor copy a step, after any accumulation and
all-reduce); the optimiser updates the masters in fp32, and :meth:`MasterWeights.weights_out` rounds them back into
the bf16 parameters. Updates smaller than bf16's resolution (2^-8 relative) therefore accumulate in the masters
instead of vanishing, which is what makes bf16 weights trainable. The gradients of several micro-batches
(``training.grad_accum``) add up in bf16 before that copy, as apex O2's half-precision gradients did: each partial
sum is rounded to bf16's 8 bits, where autocast accumulates in fp32.

Buffers (rotary frequencies, position ids) keep their dtype. Everything that reads or writes the student as a model
(evaluation, checkpoints, resuming, the final save) does so inside :meth:`MasterWeights.full_precision`, where the
model's parameters *are* the fp32 masters: checkpoints hold the masters exactly, and a resumed run rounds them to the
same bf16 weights, so resuming is exact. :meth:`release` leaves the model in fp32 at the end of training.

Inside :meth:`~MasterWeights.full_precision` the masters are registered in the modules in place of the bf16
parameters; the bf16 parameter tensors themselves are never given data of another dtype while training. Changing a
parameter's dtype through ``.data`` drops its gradient accumulator, and with it the hooks DistributedDataParallel put
there: the processes would silently stop averaging their gradients and drift apart after the first evaluation or
checkpoint.
"""

from __future__ import annotations

import contextlib

import torch


class MasterWeights:
    """The fp32 masters of ``model``'s floating-point parameters; the model itself is cast to ``dtype`` (bf16)."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16):
        self.parameters = [p for p in model.parameters() if p.is_floating_point()]
        self.masters = [torch.nn.Parameter(p.detach().float().clone(), requires_grad=p.requires_grad)
                        for p in self.parameters]
        for p in self.parameters:  # before any wrapper (DDP) hooks the parameters' gradient accumulators
            p.data = p.detach().to(dtype)
        self.trainable = [(p, m) for p, m in zip(self.parameters, self.masters) if p.requires_grad]
        index = {id(p): i for i, p in enumerate(self.parameters)}
        # every place a parameter is registered (a tied weight is registered in two modules)
        self.registrations = [(module, name, index[id(p)]) for module in model.modules()
                              for name, p in module._parameters.items() if p is not None and id(p) in index]

    def trainable_masters(self) -> list[torch.nn.Parameter]:
        """What the optimiser updates: the masters of the trainable parameters, in the model's order."""
        return [m for _, m in self.trainable]

    def gradients_in(self) -> None:
        """The model's bf16 gradients, summed over micro-batches and processes, into the masters' fp32 gradients
        (buffers kept from step to step); the model's are released. A parameter without a gradient this step leaves
        its master without one, so the optimiser skips it."""
        pairs = []
        for p, m in self.trainable:
            if p.grad is None:
                m.grad = None
                continue
            if m.grad is None:
                m.grad = torch.empty_like(m)
            pairs.append((p, m))
        if pairs:
            torch._foreach_copy_([m.grad for _, m in pairs], [p.grad for p, _ in pairs])
        for p, _ in pairs:
            p.grad = None

    def weights_out(self) -> None:
        """The updated masters, rounded into the model's bf16 parameters."""
        if self.trainable:
            torch._foreach_copy_([p.data for p, _ in self.trainable], [m.detach() for _, m in self.trainable])

    @contextlib.contextmanager
    def full_precision(self):
        """The model's parameters are the fp32 masters inside (what is evaluated, saved or loaded is exact); on leaving,
        the bf16 parameters are registered again and rounded from the masters, which a load may have changed."""
        for module, name, i in self.registrations:
            module._parameters[name] = self.masters[i]
        try:
            yield
        finally:
            for module, name, i in self.registrations:
                module._parameters[name] = self.parameters[i]
            torch._foreach_copy_([p.data for p in self.parameters], [m.detach() for m in self.masters])

    def release(self) -> None:
        """Leave the model in fp32 (the masters) for good: training is over."""
        for p, m in zip(self.parameters, self.masters):
            p.data = m.data
