import torch
from tiny import DECODERS, ENCODERS, bpe_tokenizer, wordpiece_tokenizer


def test_tiny_models_run_on_real_tokenizers():
    wp, bpe = wordpiece_tokenizer(), bpe_tokenizer()
    for build in ENCODERS.values():
        model = build()
        tok = wp if model.config.vocab_size == wp.vocab_size else bpe
        enc = tok(["Shares rose on Monday."], return_tensors="pt")
        assert model(**{k: v for k, v in enc.items() if k != "token_type_ids"}).logits.shape[-1] == model.config.vocab_size
    for build in DECODERS.values():
        model = build()
        ids = torch.tensor([bpe("Shares rose on Monday.")["input_ids"]])
        assert model(input_ids=ids).logits.shape == (1, ids.shape[1], 512)
