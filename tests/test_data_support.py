"""Shared helpers for the data tests: a RoBERTa-style tokenizer built from the real BPE one."""

import functools

from tiny import bpe_tokenizer
from tokenizers import Tokenizer, processors
from transformers import PreTrainedTokenizerFast


@functools.lru_cache(maxsize=None)
def roberta_style_tokenizer():
    """The tiny BPE vocabulary with RoBERTa's template (<s> x </s>) and a <mask> token."""
    backend = Tokenizer.from_str(bpe_tokenizer().backend_tokenizer.to_str())
    backend.add_special_tokens(["<mask>"])
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", mask_token="<mask>")


def test_roberta_style_tokenizer_wraps_like_roberta():
    tok = roberta_style_tokenizer()
    ids = tok("Shares rose.")["input_ids"]
    assert ids[0] == tok.bos_token_id == 1 and ids[-1] == tok.eos_token_id == 2
    assert tok.mask_token_id == 512 and len(tok) == 513
