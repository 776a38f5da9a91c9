import pytest
import torch
import transformers
from tiny import DECODERS, ENCODERS, tiny_bert

from alambic import modeling
from alambic.errors import AlambicError

FAMILIES = {**ENCODERS, **DECODERS}


def _batch(vocab):
    torch.manual_seed(1)
    ids = torch.randint(3, vocab, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padding, so the split is checked where masks matter
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_head_of_body_equals_model_logits(family):
    model = FAMILIES[family]()
    ids, mask = _batch(model.config.vocab_size)
    with torch.no_grad():
        hidden = modeling.lm_body(model)(input_ids=ids, attention_mask=mask).last_hidden_state
        rows = hidden.reshape(-1, hidden.shape[-1])  # recipes feed (N, d) rows, not (B, L, d)
        logits = modeling.lm_head(model)(rows)
        expected = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(logits, expected.reshape(-1, expected.shape[-1]))


@pytest.mark.parametrize("family", FAMILIES)
def test_split_head_is_features_then_the_output_projection(family):
    model = FAMILIES[family]()
    rows = torch.randn(5, modeling.hidden_size(model.config))
    features, projection = modeling.split_lm_head(model)
    with torch.no_grad():
        assert projection is model.get_output_embeddings()
        torch.testing.assert_close(projection(features(rows)), modeling.lm_head(model)(rows))
    assert "forward" not in vars(projection)  # the bypass is undone


@pytest.mark.parametrize("family", FAMILIES)
def test_architecture_facts(family):
    model = FAMILIES[family]()
    kind = "causal" if family in DECODERS else "masked"
    assert modeling.model_kind(model) == kind and modeling.model_kind(model.config) == kind
    assert len(modeling.transformer_layers(model)) == modeling.num_layers(model.config) == 4
    assert modeling.hidden_size(model.config) == 32
    assert modeling.num_heads(model.config) == 4
    assert modeling.vocab_size(model.config) == model.get_input_embeddings().weight.shape[0]
    assert modeling.has_lm_head(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_setters_write_the_stored_attribute(family):
    config = FAMILIES[family]().config
    modeling.set_num_layers(config, 2)
    modeling.set_intermediate_size(config, 24)
    stored = config.to_dict()
    assert modeling.num_layers(config) == 2 and modeling.intermediate_size(config) == 24
    assert 2 in [stored.get(k) for k in ("num_hidden_layers", "n_layer", "n_layers")]


def test_gpt2_default_ffn_is_four_times_hidden():
    assert modeling.intermediate_size(DECODERS["gpt2"]().config) == 128


def test_bare_encoder_has_no_head():
    bare = transformers.BertModel(tiny_bert().config)
    assert not modeling.has_lm_head(bare)
    assert modeling.model_kind(bare) == "masked"
    assert len(modeling.transformer_layers(bare)) == 4
    assert modeling.lm_body(bare) is bare
    with pytest.raises(AlambicError, match="BertModel has no language-model head"):
        modeling.lm_head(bare)


def test_unsupported_models_are_named():
    with pytest.raises(AlambicError, match="T5Config is an encoder-decoder model"):
        modeling.model_kind(transformers.T5Config())
    with pytest.raises(AlambicError, match="Gemma2ForCausalLM rescales its logits"):
        config = transformers.Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=8)
        modeling.lm_head(transformers.Gemma2ForCausalLM(config))
