"""Batched KV-cache sampling: greedy answers equal transformers' generate, padding changes nothing, the generator
fixes every draw, and the draws follow softmax(logits / T) and its top-p nucleus."""

import pytest
import torch

from alambic.errors import AlambicError
from alambic.sampling import sample, sample_batched
from tiny import DECODERS, tiny_llama

LENGTHS = (3, 11, 6, 1)


def prompts_of(lengths=LENGTHS, seed=0, high=500):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, high, (n,), generator=g).tolist() for n in lengths]


def greedy(model, prompts, n, eos=None):
    return sample(model, prompts, max_new_tokens=n, temperature=0, eos_token_ids=eos, pad_token_id=0)


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_greedy_equals_transformers_generate_one_prompt_at_a_time(name):
    model = DECODERS[name]()
    prompts = prompts_of()
    got = greedy(model, prompts, 12)  # one left-padded batch
    expected = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                             pad_token_id=0, eos_token_id=None)
        expected.append(out[0, len(prompt):].tolist())
    assert got == expected
    assert all(len(row) == 12 for row in got)


def test_a_batch_gives_each_prompt_its_answer_alone():
    model = tiny_llama()
    prompts = prompts_of((2, 17, 9, 5, 13))
    batch = greedy(model, prompts, 10)
    assert batch == [greedy(model, [p], 10)[0] for p in prompts]
    assert sample_batched(model, prompts, 2, max_new_tokens=10, temperature=0, eos_token_ids=None,
                          pad_token_id=0) == batch


def test_eos_ends_a_row_and_nothing_follows_it():
    model = tiny_llama()
    prompts = prompts_of()
    free = greedy(model, prompts, 16)
    eos = free[0][3]
    first = free[0].index(eos)  # the first time row 0 writes it (at most position 3)
    got = greedy(model, prompts, 16, eos=[eos, 2])
    for row, answer in zip(free, got):
        stop = next((i + 1 for i, t in enumerate(row) if t in (eos, 2)), len(row))
        assert answer == row[:stop]  # other rows are not disturbed by a finished one
    assert got[0] == free[0][:first + 1] and got[0][-1] == eos
    assert greedy(model, prompts, 16, eos=eos) == greedy(model, prompts, 16, eos=[eos])


def test_max_new_tokens_is_respected():
    model = tiny_llama()
    prompts = prompts_of()
    for n in (1, 5):
        answers = sample(model, prompts, max_new_tokens=n, temperature=1.0, eos_token_ids=None, pad_token_id=0,
                         generator=torch.Generator().manual_seed(0))
        assert [len(a) for a in answers] == [n] * len(prompts)
    assert greedy(model, prompts, 0) == [[] for _ in prompts]


def test_same_seed_same_samples_other_seed_other_samples():
    model = tiny_llama()
    prompts = prompts_of()

    def draw(seed):
        return sample(model, prompts, max_new_tokens=16, temperature=1.0, top_p=0.95, eos_token_ids=2,
                      pad_token_id=0, generator=torch.Generator().manual_seed(seed))

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)
    assert draw(7) != greedy(model, prompts, 16, eos=2)


def test_top_p_towards_zero_is_greedy():
    model = tiny_llama()
    prompts = prompts_of()
    nucleus = sample(model, prompts, max_new_tokens=12, temperature=1.3, top_p=1e-6, eos_token_ids=2,
                     pad_token_id=0, generator=torch.Generator().manual_seed(3))
    assert nucleus == greedy(model, prompts, 12, eos=2)


def _first_token_frequencies(model, prompt, rows, temperature, top_p, vocab):
    answers = sample(model, [prompt] * rows, max_new_tokens=1, temperature=temperature, top_p=top_p,
                     eos_token_ids=None, pad_token_id=0, generator=torch.Generator().manual_seed(0))
    return torch.bincount(torch.tensor([a[0] for a in answers]), minlength=vocab).double() / rows


def test_draws_follow_softmax_of_logits_over_temperature_and_the_top_p_nucleus():
    vocab, rows, temperature = 8, 20000, 0.7
    model = tiny_llama(vocab_size=vocab, initializer_range=0.2)
    prompt = [3, 5, 4]
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1].double()
    expected = torch.softmax(logits / temperature, -1)
    assert expected.max() - expected.min() > 0.1  # a distribution worth telling apart from uniform
    seen = _first_token_frequencies(model, prompt, rows, temperature, 1.0, vocab)
    assert (seen - expected).abs().max() < 0.015  # about 4 standard errors at 20,000 draws

    top_p = 0.6
    ranked, order = expected.sort(descending=True)
    kept = int(((ranked.cumsum(0) - ranked) < top_p).sum())
    nucleus = torch.zeros(vocab, dtype=torch.float64)
    nucleus[order[:kept]] = ranked[:kept] / ranked[:kept].sum()
    assert 1 < kept < vocab
    seen = _first_token_frequencies(model, prompt, rows, temperature, top_p, vocab)
    assert seen[order[kept:]].sum() == 0  # nothing outside the nucleus is ever drawn
    assert (seen - nucleus).abs().max() < 0.015


def test_the_training_mode_is_restored():
    model = tiny_llama().train()
    greedy(model, prompts_of(), 3)
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    greedy(model, prompts_of(), 3)
    assert not any(m.training for m in model.modules())


def test_sampling_takes_no_gradient_and_refuses_an_empty_prompt():
    model = tiny_llama()
    model.requires_grad_(True)
    with pytest.raises(AlambicError, match="prompt 1 has no tokens"):
        greedy(model, [[5], []], 3)
    with pytest.raises(AlambicError, match="temperature must be >= 0"):
        sample(model, [[5]], max_new_tokens=2, temperature=-1, eos_token_ids=None, pad_token_id=0)
    assert all(p.grad is None for p in model.parameters())
