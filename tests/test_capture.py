"""Hooks read the right tensors: hidden states as output_hidden_states, attention as the model's own eager attention."""

import pytest
import torch
import transformers

from alambic.capture import LayerTaps, count_valid_pairs, valid_pairs
from alambic.errors import AlambicError
from tiny import tiny_bert, tiny_distilbert, tiny_gpt2, tiny_llama, tiny_qwen2, tiny_roberta

FAMILIES = {"bert": tiny_bert, "roberta": tiny_roberta, "distilbert": tiny_distilbert, "llama": tiny_llama,
            "gpt2": tiny_gpt2, "qwen2": tiny_qwen2}


def batch(vocab, causal):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, min(vocab, 500), (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding on the second row
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_states_match_output_hidden_states(family):
    model = FAMILIES[family]()
    ids, mask = batch(model.config.vocab_size, family in ("llama", "gpt2", "qwen2"))
    n = model.config.num_hidden_layers if hasattr(model.config, "num_hidden_layers") else model.config.n_layers
    with LayerTaps(model, tuple(range(n))) as taps:
        taps.run({"input_ids": ids, "attention_mask": mask})
    reference = model.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for m in range(n):  # the last entry of hidden_states may be after a final norm; taps give raw layer outputs
        torch.testing.assert_close(taps.hidden[m], reference[m])


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_scores_reproduce_the_models_own_attention_probabilities(family):
    """Softmax of the captured scores over valid keys equals the eager kernel's attention weights (rotary, grouped
    key/value heads and GPT-2's fused projection included)."""
    model = FAMILIES[family](attn_implementation="eager")
    causal = family in ("llama", "gpt2", "qwen2")
    ids, mask = batch(model.config.vocab_size, causal)
    with LayerTaps(model, attention_layers=(1, 3)) as taps:
        taps.run({"input_ids": ids, "attention_mask": mask})
    eager = model.base_model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    valid = valid_pairs(mask, causal)
    for m in (1, 3):
        probs = torch.softmax(taps.attention(m).scores().masked_fill(~valid[:, None], float("-inf")), -1)
        rows = mask.bool()  # padded query rows attend anywhere in the model; they are excluded from every loss
        torch.testing.assert_close(probs.transpose(1, 2)[rows], eager[m - 1].transpose(1, 2)[rows], atol=1e-5, rtol=1e-4)


def test_taps_are_removed_after_use():
    model = tiny_bert()
    with LayerTaps(model, (0, 2), (1,)):
        pass
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    assert hooks == 0


def test_unsupported_attention_layout_names_the_model_class():
    config = transformers.GPTNeoXConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=32, max_position_embeddings=32)
    model = transformers.GPTNeoXForCausalLM(config)
    with pytest.raises(AlambicError, match="GPTNeoXForCausalLM .* attention and relation loss weights to 0"):
        LayerTaps(model, attention_layers=(1,)).__enter__()


def test_valid_pairs_and_their_count():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    for causal, expected in ((False, 9 + 4), (True, 6 + 3)):
        valid = valid_pairs(mask, causal)
        assert int(valid.sum()) == expected == count_valid_pairs(mask, causal)
        assert not valid[0, 3].any() and not valid[0, :, 3].any()
    assert not valid_pairs(mask, True)[0, 0, 1]
