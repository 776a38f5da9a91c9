"""Text in, batches out: sources -> cached token ids -> examples -> batch lists -> collated batches."""

from alambic.data.batching import length_grouped_batches, sequential_batches
from alambic.data.collate import CausalLMCollator, MaskedLMCollator, smoothed_token_weights
from alambic.data.sources import (PACKAGED_CORPORA, describe_sources, hold_out_documents, is_heldout,
                                  list_packaged_corpora, read_documents)
from alambic.data.tokenized import (EncoderChunks, PackedBlocks, TokenizedCorpus, build_or_load, encoder_chunks,
                                    packed_blocks, special_wrapping, tokenizer_fingerprint)

__all__ = [
    "PACKAGED_CORPORA", "CausalLMCollator", "EncoderChunks", "MaskedLMCollator", "PackedBlocks", "TokenizedCorpus",
    "build_or_load", "describe_sources", "encoder_chunks", "hold_out_documents", "is_heldout", "length_grouped_batches",
    "list_packaged_corpora", "packed_blocks", "read_documents", "sequential_batches", "smoothed_token_weights",
    "special_wrapping", "tokenizer_fingerprint",
]
