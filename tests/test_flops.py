"""FLOPs per token: the formula against a hand count, and against torch's counter on a real forward."""

import pytest
import transformers

from alambic.evaluation.flops import flops_per_token, head_type, measured_flops_per_token
from tiny import DECODERS, ENCODERS, tiny_bert, tiny_gpt2, tiny_llama


def test_formula_matches_a_hand_count_for_a_tiny_llama():
    # tiny_llama: d=32, 4 query heads and 2 key/value heads of 8, FFN 64 (gated), vocab 512, 4 layers; L = 16.
    config = tiny_llama().config
    d, h, kv, e, f, v, n, L = 32, 4, 2, 8, 64, 512, 4, 16
    q = 2 * d * (h * e)                      # 2048
    k_and_v = 2 * (2 * d * (kv * e))         # 2048
    o = 2 * (h * e) * d                      # 2048
    scores = 2 * (2 * L * h * e)             # Q K^T and A V over 16 positions: 2048
    mlp = 3 * (2 * d * f)                    # gate, up, down: 12288
    head = 2 * d * v                         # 32768
    hand = n * (q + k_and_v + o + scores + mlp) + head
    assert hand == 106_496 + 8_192 == 114_688
    got = flops_per_token(config, L, "lm")
    assert got.total == hand
    assert (got.attention_projections, got.attention_scores, got.mlp, got.head) == (6144, 2048, 12288, 32768)


def test_formula_matches_a_hand_count_for_a_tiny_bert_with_its_mlm_head():
    config = tiny_bert().config  # d=32, 4 heads, FFN 64 (not gated), vocab 30522, 4 layers
    d, f, v, L = 32, 64, 30522, 10
    layer = 4 * (2 * d * d) + 2 * 2 * L * d + 2 * (2 * d * f)
    assert flops_per_token(config, L, "mlm").total == 4 * layer + 2 * d * d + 2 * d * v


@pytest.mark.parametrize("family", sorted({**DECODERS, **ENCODERS}))
@pytest.mark.parametrize("seq_len", [7, 32])
def test_formula_equals_the_count_of_a_real_forward(family, seq_len):
    model = {**DECODERS, **ENCODERS}[family]()
    head = head_type(model)
    assert head == ("lm" if family in DECODERS else "mlm")
    assert measured_flops_per_token(model, seq_len) == flops_per_token(model.config, seq_len, head).total


def test_bare_encoder_counts_its_pooler_once_per_sequence():
    model = transformers.BertModel(tiny_bert().config).eval()
    assert head_type(model) == "pooler"
    for seq_len in (8, 16):
        assert measured_flops_per_token(model, seq_len) == pytest.approx(
            flops_per_token(model.config, seq_len, "pooler").total)


def test_measured_count_includes_attention_growing_with_length():
    model = tiny_gpt2()  # 4 layers, 4 heads of 8
    grow = measured_flops_per_token(model, 40) - measured_flops_per_token(model, 8)
    assert grow == 4 * (2 * 2 * (40 - 8) * 32)
    # batch does not change the per-token count
    assert measured_flops_per_token(model, 8, batch_size=3) == measured_flops_per_token(model, 8)
