"""bf16 compute with fp32 master weights (alambic.engine.master_weights) against fp32 AdamW done directly."""

import pytest
import torch

from alambic.config import TrainingConfig
from alambic.engine.loop import build_optimizer
from alambic.engine.master_weights import MasterWeights
from tiny import tiny_llama


def _loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def test_a_step_updates_the_masters_as_fp32_adamw_on_the_same_gradients_and_rounds_them_into_the_model():
    ids = torch.randint(1, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    cfg = TrainingConfig(lr=1e-2, weight_decay=0.01)
    model, reference = tiny_llama(), tiny_llama()
    master = MasterWeights(model)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    optimizer = build_optimizer(master.trainable_masters(), cfg)
    direct = build_optimizer(reference.parameters(), cfg)
    for _ in range(3):
        _loss(model, ids).backward()
        grads = [p.grad.float() for p in model.parameters()]  # what the masters must receive
        master.gradients_in()
        assert all(p.grad is None for p in model.parameters())
        for p, g in zip(reference.parameters(), grads):
            p.grad = g
        optimizer.step()
        direct.step()
        direct.zero_grad()
        master.weights_out()
        for m, r, p in zip(master.trainable_masters(), reference.parameters(), model.parameters()):
            assert m.dtype == torch.float32 and torch.equal(m, r)  # the same fp32 update, bit for bit
            assert torch.equal(p, m.to(torch.bfloat16))  # the model holds the masters rounded


def test_updates_below_bf16_resolution_accumulate_in_the_masters():
    """A weight of 1.0 moved by 1e-3 a step: bf16 (spacing 2^-8 = 0.0039 just below 1.0) rounds each step away alone,
    while the masters carry it and the model's weight moves once the sum crosses half a spacing."""
    layer = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.ones_(layer.weight)
    master = MasterWeights(layer)
    optimizer = torch.optim.SGD(master.trainable_masters(), lr=1e-3)
    plain = torch.ones((), dtype=torch.bfloat16)
    for _ in range(10):
        layer.weight.grad = torch.ones_like(layer.weight)
        master.gradients_in()
        optimizer.step()
        master.weights_out()
        plain = plain - torch.tensor(1e-3, dtype=torch.bfloat16)
    assert float(plain) == 1.0  # bf16 alone never moved
    assert float(master.trainable_masters()[0].detach()) == pytest.approx(0.99, abs=1e-6)
    assert float(layer.weight.detach()) == float(torch.tensor(0.99).to(torch.bfloat16))


def test_inside_full_precision_the_model_is_its_masters_and_a_load_reaches_both():
    model = tiny_llama()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    master = MasterWeights(model)
    with master.full_precision():
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        assert all(torch.equal(model.state_dict()[k], original[k]) for k in original)  # exact, not rounded
        other = tiny_llama(seed=1).state_dict()
        model.load_state_dict(other)  # as resuming does
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    for (name, p), m in zip(model.named_parameters(), master.masters):
        assert torch.equal(m, other[name]) and torch.equal(p, other[name].to(torch.bfloat16))
    master.release()
    assert all(torch.equal(model.state_dict()[k], other[k]) for k in other)  # fp32 for good


def test_full_precision_keeps_the_hooks_on_the_parameters_gradient_accumulators():
    """DDP averages gradients through hooks on each parameter's gradient accumulator. Giving a parameter data of
    another dtype (``p.data = fp32``) drops that accumulator and its hooks: after the first evaluation or checkpoint
    the processes of a bf16 run would silently stop averaging and drift apart. full_precision must not do that."""
    model = torch.nn.Linear(4, 4)
    master = MasterWeights(model)
    accumulator = model.weight.view_as(model.weight).grad_fn.next_functions[0][0]  # what DDP hooks
    calls = []
    accumulator.register_hook(lambda *_: calls.append(1))
    with master.full_precision():
        assert model.weight.dtype == torch.float32
        model(torch.randn(2, 4)).sum()  # an evaluation's forward
    model(torch.randn(2, 4, dtype=torch.bfloat16)).sum().backward()
    assert calls == [1]
    assert model.weight.view_as(model.weight).grad_fn.next_functions[0][0] is accumulator


def test_a_tied_weight_is_one_master_inside_full_precision_and_one_bf16_parameter_outside():
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    master = MasterWeights(model)
    with master.full_precision():
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert model.lm_head.weight.dtype == torch.float32
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.dtype == torch.bfloat16


def test_a_parameter_without_a_gradient_this_step_is_not_updated():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    master = MasterWeights(model)
    optimizer = build_optimizer(master.trainable_masters(), TrainingConfig(lr=1e-2))
    model[0](torch.randn(2, 4, dtype=torch.bfloat16)).sum().backward()  # the second layer gets no gradient
    master.gradients_in()
    before = [m.clone() for m in master.trainable_masters()]
    optimizer.step()
    after = master.trainable_masters()
    assert not torch.equal(before[0], after[0]) and torch.equal(before[2], after[2])
