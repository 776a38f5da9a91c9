"""Token features: first-sub-word NER labels, the QA context mask and answer positions, teacher-logit cache rows."""

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from alambic.errors import AlambicError
from alambic.tasks.cache import TeacherLogitCache, join_rows, split_rows
from alambic.tasks.data import ClassificationExample, label_list, read_conll, read_squad, read_task_data
from alambic.tasks.features import TaskBatches, collate, encode
from tiny import bpe_tokenizer, wordpiece_tokenizer

DATA = Path(__file__).parent / "data"


def test_ner_labels_only_the_first_sub_word_of_each_word():
    tokenizer = wordpiece_tokenizer()
    sentences = read_conll(DATA / "ner.conll")
    labels = label_list("ner", sentences)
    features = encode("ner", sentences, tokenizer, labels, max_length=128)
    for sentence, feature in zip(sentences, features):
        word_ids = tokenizer(sentence.words, is_split_into_words=True).word_ids()
        expected = [t for t, w in enumerate(word_ids) if w is not None and (t == 0 or word_ids[t - 1] != w)]
        assert feature.first_subwords == expected
        assert feature.words == list(range(len(sentence.words)))
        assert [labels[i] for i in feature.label_ids] == sentence.tags
    # Korean words split into several pieces: only the first is labelled
    korean = features[7]
    word_ids = tokenizer(sentences[7].words, is_split_into_words=True).word_ids()
    assert len(word_ids) - 2 > len(korean.first_subwords)
    batch = collate("ner", features[:3], [0, 1, 2], tokenizer.pad_token_id)
    length = batch["input_ids"].shape[1]
    assert batch["label_positions"].tolist() == [b * length + t for b in range(3) for t in features[b].first_subwords]
    assert batch["label_counts"].tolist() == [len(f.first_subwords) for f in features[:3]]


def test_ner_truncation_keeps_the_words_that_fit():
    tokenizer = wordpiece_tokenizer()
    sentences = read_conll(DATA / "ner.conll")
    features = encode("ner", sentences[:1], tokenizer, label_list("ner", sentences), max_length=16)
    assert len(features[0].input_ids) <= 16 and features[0].words == list(range(len(features[0].words)))


def test_qa_context_mask_covers_context_tokens_only_and_answers_map_back():
    for tokenizer in (wordpiece_tokenizer(),):
        examples = read_squad(DATA / "squad.json")
        features = encode("qa", examples, tokenizer, [], max_length=96, doc_stride=16, training=True)
        batch = collate("qa", features, list(range(len(features))), tokenizer.pad_token_id)
        for b, feature in enumerate(features):
            encoding = tokenizer(examples[feature.example].question, examples[feature.example].context)
            sequence = encoding.sequence_ids()
            mask = batch["context_mask"][b].tolist()
            valid = [t for t, m in enumerate(mask) if m]
            # only context tokens: question, [CLS]/[SEP] and padding are masked
            assert all(sequence[t] == 1 for t in valid)
            assert not any(mask[len(feature.input_ids):])
            assert not mask[0]
            # the answer positions reproduce the answer text from the context offsets
            context = examples[feature.example].context
            text = context[feature.offsets[feature.start][0]:feature.offsets[feature.end][1]]
            assert text == examples[feature.example].answers[0]
            assert mask[feature.start] and mask[feature.end]


def test_qa_long_context_becomes_overlapping_windows(tmp_path):
    tokenizer = wordpiece_tokenizer()
    examples = read_squad(DATA / "squad.json")[:3]
    long = [type(e)(e.id, e.question, e.context * 4, e.answers, e.starts) for e in examples]
    features = encode("qa", long, tokenizer, [], max_length=48, doc_stride=8)
    assert len(features) > len(long)
    assert all(f.start == -1 or f.context[0] <= f.start <= f.end <= f.context[1] for f in features)
    training = encode("qa", long, tokenizer, [], max_length=48, doc_stride=8, training=True)
    assert all(f.start >= 0 for f in training)  # windows without the answer are not trained on


def test_classification_pairs_and_korean_with_a_bpe_tokenizer():
    tokenizer = bpe_tokenizer()
    pairs = read_task_data("classification", DATA / "pairs.jsonl")
    features = encode("classification", pairs, tokenizer, label_list("classification", pairs), max_length=64)
    assert [f.label for f in features] == [1, 1, 1, 0, 0, 0, 1, 0]  # contradiction=0, entailment=1
    korean = read_task_data("classification", DATA / "sentiment_ko.jsonl")
    features = encode("classification", korean, tokenizer, label_list("classification", korean), max_length=64)
    assert all(len(f.input_ids) > 3 for f in features)


def test_batches_are_seeded_and_cover_each_epoch():
    tokenizer = wordpiece_tokenizer()
    examples = read_task_data("classification", DATA / "topics.csv")
    features = encode("classification", examples, tokenizer, label_list("classification", examples))
    batches = TaskBatches("classification", features, tokenizer, batch_size=4, seed=1)
    epoch = [batches(i)["feature_ids"].tolist() for i in range(batches.per_epoch)]
    assert sorted(i for ids in epoch for i in ids) == list(range(len(features)))
    again = TaskBatches("classification", features, tokenizer, batch_size=4, seed=1)
    later = batches.per_epoch + 1
    assert again(later)["feature_ids"].tolist() == batches(later)["feature_ids"].tolist()


def test_cache_rows_round_trip_for_every_task(tmp_path):
    tokenizer = wordpiece_tokenizer()
    sentences = read_conll(DATA / "ner.conll")[:3]
    features = encode("ner", sentences, tokenizer, label_list("ner", sentences))
    batch = collate("ner", features, [0, 1, 2], 0)
    rows = torch.randn(len(batch["label_positions"]), 7)
    assert torch.equal(join_rows("ner", split_rows("ner", rows, batch), batch), rows)
    qa = encode("qa", read_squad(DATA / "squad.json")[:3], tokenizer, [], max_length=96, doc_stride=16)
    batch = collate("qa", qa, [0, 1, 2], 0)
    rows = torch.randn(2 * 3, batch["input_ids"].shape[1])
    rows = rows * batch["attention_mask"].repeat(2, 1)  # padding comes back as 0
    assert torch.equal(join_rows("qa", split_rows("qa", rows, batch), batch), rows)
    cache = TeacherLogitCache("qa", "k", folder=tmp_path, flush_every=1)
    assert cache.get(batch, "cpu") is None
    cache.put(batch, rows)
    reloaded = TeacherLogitCache("qa", "k", folder=tmp_path)
    assert torch.equal(reloaded.get(batch, "cpu"), rows) and reloaded.hits == 1


def test_a_task_example_the_tokenizer_cannot_encode_is_named():
    tok = Tokenizer(models.WordLevel({"[PAD]": 0, "[CLS]": 1, "[SEP]": 2, "good": 3, "news": 4}))  # no unknown
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]")
    examples = [ClassificationExample("good news", "a"), ClassificationExample("good olé news", "b")]
    with pytest.raises(AlambicError) as error:
        encode("classification", examples, tokenizer, ["a", "b"], max_length=16)
    assert str(error.value).startswith("the tokenizer cannot encode example 2 ('good olé news'...)")
    assert "this tokenizer has no unknown token" in str(error.value)
