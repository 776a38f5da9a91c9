import os
from collections import Counter

import numpy as np
import pytest
from test_data_support import roberta_style_tokenizer
from tiny import bpe_tokenizer, sample_texts, wordpiece_tokenizer
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from alambic.cache import cache_dir
from alambic.data import build_or_load, encoder_chunks, packed_blocks, read_documents
from alambic.errors import AlambicError


@pytest.fixture
def news(tmp_path):
    folder = tmp_path / "news"
    folder.mkdir()
    for i, text in enumerate(sample_texts(6)):
        (folder / f"{i}.txt").write_text(text)
    return folder


def direct_ids(tokenizer, documents):
    return [tokenizer(d, add_special_tokens=False)["input_ids"] for d in documents]


def test_tokens_match_direct_tokenisation_and_are_memory_mapped(news):
    tok = wordpiece_tokenizer()
    corpus = build_or_load([str(news)], tok)
    expected = direct_ids(tok, read_documents([str(news)]))
    assert isinstance(corpus.tokens, np.memmap) and corpus.tokens.dtype == np.uint16
    assert corpus.offsets.dtype == np.int64 and len(corpus) == 6
    assert [corpus.document(i).tolist() for i in range(len(corpus))] == expected
    counts = corpus.token_counts()
    assert counts.shape == (len(tok),) and counts.sum() == corpus.num_tokens
    assert {i: c for i, c in enumerate(counts) if c} == Counter(t for doc in expected for t in doc)


def test_second_call_loads_the_cache_without_tokenising(news):
    tok = wordpiece_tokenizer()
    first = build_or_load([str(news)], tok)
    stamp = (first.path / "tokens.bin").stat().st_mtime_ns
    second = build_or_load([str(news)], tok)
    assert (first.from_cache, second.from_cache) == (False, True)
    assert second.path == first.path and (second.path / "tokens.bin").stat().st_mtime_ns == stamp
    assert np.array_equal(first.tokens, second.tokens)


def test_cache_is_invalidated_by_a_changed_file_tokenizer_or_option(news):
    wp = wordpiece_tokenizer()
    first = build_or_load([str(news)], wp)
    changed = news / "0.txt"
    changed.write_text(changed.read_text() + " An extra closing sentence.")
    os.utime(changed, ns=(1_000_000_000, 1_000_000_000))  # a different mtime even on coarse-clock filesystems
    again = build_or_load([str(news)], wp)
    assert not again.from_cache and again.path != first.path and again.num_tokens > first.num_tokens
    assert not build_or_load([str(news)], bpe_tokenizer()).from_cache
    assert not build_or_load([str(news)], wp, split_documents="line").from_cache


def test_large_vocabulary_is_stored_as_uint32(tmp_path):
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, 70_000)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    (tmp_path / "a.txt").write_text("w69999 w5 w65536 nope")
    corpus = build_or_load([str(tmp_path / "a.txt")], tok)
    assert corpus.tokens.dtype == np.uint32 and corpus.tokens.tolist() == [69999, 5, 65536, 0]


def test_failed_build_leaves_no_cache_entry(tmp_path):
    (tmp_path / "ctrl.txt").write_text("\x00\x01\x02")  # not blank, but BERT's cleaner drops every character
    before = set(cache_dir("tokens").iterdir())
    with pytest.raises(AlambicError, match="tokenises to no tokens"):
        build_or_load([str(tmp_path / "ctrl.txt")], wordpiece_tokenizer())
    assert set(cache_dir("tokens").iterdir()) == before


@pytest.mark.parametrize("make_tok", [wordpiece_tokenizer, roberta_style_tokenizer], ids=["bert", "roberta"])
def test_encoder_chunks_fit_and_carry_the_tokenizers_special_tokens(news, make_tok):
    tok = make_tok()
    corpus = build_or_load([str(news)], tok)
    chunks = encoder_chunks(corpus, tok, max_length=64, min_tokens=1)
    first, last = tok("x")["input_ids"][0], tok("x")["input_ids"][-1]
    assert (first, last) in {(101, 102), (1, 2)}
    rebuilt = []
    for i in range(len(chunks)):
        item = chunks[i]
        assert len(item) <= 64 and len(item) == chunks.lengths[i]
        assert item[0] == first and item[-1] == last and not np.isin(item[1:-1], tok.all_special_ids).any()
        rebuilt += item[1:-1].tolist()
    assert rebuilt == corpus.tokens.tolist()  # chunks cover every token once, in order
    assert (chunks.lengths == 64).sum() >= len(chunks) - len(corpus)  # only each document's last chunk is short


def test_short_chunks_are_dropped_and_chunks_never_cross_documents(tmp_path):
    tok = wordpiece_tokenizer()
    (tmp_path / "a.txt").write_text("one two three four five six seven eight nine ten eleven twelve")
    (tmp_path / "b.txt").write_text("tiny doc")
    corpus = build_or_load([str(tmp_path)], tok)
    chunks = encoder_chunks(corpus, tok, max_length=10)  # 8 content tokens per chunk, min_tokens 8
    assert [c.tolist() for c in (chunks[i] for i in range(len(chunks)))] == [[101] + corpus.document(0)[:8].tolist()
                                                                          + [102]]
    assert len(encoder_chunks(corpus, tok, max_length=10, min_tokens=2)) == 3
    with pytest.raises(AlambicError, match="a max length of 2 tokens leaves no room"):
        encoder_chunks(corpus, tok, max_length=2)
    with pytest.raises(AlambicError, match="no chunk of the data has 50 tokens"):
        encoder_chunks(corpus, tok, max_length=64, min_tokens=50)


def test_packed_blocks_join_documents_with_bos_and_eos(news):
    tok = bpe_tokenizer()
    corpus = build_or_load([str(news)], tok)
    stream = []
    for i in range(len(corpus)):
        stream += [tok.bos_token_id] + corpus.document(i).tolist() + [tok.eos_token_id]
    blocks = packed_blocks(corpus, tok, 100)
    assert len(blocks) == len(stream) // 100 and (blocks.lengths == 100).all()
    got = np.concatenate([blocks[i] for i in range(len(blocks))])
    assert got.tolist() == stream[: len(blocks) * 100]  # the short tail is dropped
    with pytest.raises(IndexError):
        blocks[len(blocks)]


def test_packed_blocks_without_bos_use_eos_only(tmp_path):
    backend = Tokenizer.from_str(bpe_tokenizer().backend_tokenizer.to_str())
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>")
    (tmp_path / "a.txt").write_text("Shares rose on Monday.")
    (tmp_path / "b.txt").write_text("Markets fell.")
    corpus = build_or_load([str(tmp_path)], tok)
    block = packed_blocks(corpus, tok, corpus.num_tokens + 1)[0]
    assert block.tolist() == corpus.document(0).tolist() + [2] + corpus.document(1).tolist()
    with pytest.raises(AlambicError, match=rf"the data has {corpus.num_tokens + 2} tokens, fewer than one block of "
                                           "1000: add text or lower --max-length \\(data.max_length\\)"):
        packed_blocks(corpus, tok, 1000)


def test_korean_kolaw_corpus_tokenises_and_round_trips():
    tok = bpe_tokenizer()  # byte-level: any script tokenises without unknown tokens
    corpus = build_or_load(["kolaw"], tok)
    documents = read_documents(["kolaw"])
    assert len(corpus) == len(documents) == 11 and corpus.num_tokens > 60_000
    assert tok.decode(corpus.document(0).tolist()) == documents[0]
    wp = build_or_load(["kolaw"], wordpiece_tokenizer())
    assert (np.asarray(wp.tokens) != wordpiece_tokenizer().unk_token_id).mean() > 0.9


def test_a_tokenizer_without_an_unknown_token_that_cannot_encode_names_the_document(tmp_path):
    vocab = {"the": 0, "news": 1, "today": 2, "[PAD]": 3}
    tok = Tokenizer(models.WordLevel(vocab))  # no unknown token: an unknown word cannot be encoded
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]")
    (tmp_path / "a.txt").write_text("the news today\n\nthe news of ünïcode\n")
    with pytest.raises(AlambicError) as error:
        build_or_load([str(tmp_path / "a.txt")], tokenizer, split_documents="blank-line")
    message = str(error.value)
    assert message.startswith("the tokenizer cannot encode document 2 ('the news of ünïcode") and "\n" not in message
    assert "this tokenizer has no unknown token" in message


def test_text_mostly_outside_the_vocabulary_gets_a_warning_with_the_share(tmp_path, capsys):
    (tmp_path / "am.txt").write_text("ሰላም ለዓለም ሰላም the world " * 20)  # Ge'ez script: outside the vocabulary
    corpus = build_or_load([str(tmp_path / "am.txt")], wordpiece_tokenizer())
    err = capsys.readouterr().err
    unk = wordpiece_tokenizer().unk_token_id
    share = float(np.mean(np.asarray(corpus.tokens) == unk))
    assert share > 0.5
    assert f"warning: {100 * share:.0f}% of the tokens of {tmp_path / 'am.txt'} are the tokenizer's unknown token '[UNK]'" in err
    build_or_load([str(tmp_path / "am.txt")], wordpiece_tokenizer())  # from the cache: warned again
    assert "warning:" in capsys.readouterr().err
    (tmp_path / "en.txt").write_text(sample_texts(1)[0])
    build_or_load([str(tmp_path / "en.txt")], wordpiece_tokenizer())
    assert capsys.readouterr().err == ""
