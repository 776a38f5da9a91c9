"""TinyBERT's data augmentation: substitutes equal a direct masked-LM / embedding computation; copies keep labels,
pairs, tags, punctuation; the command writes data that the task readers load back."""

import csv
import json

import pytest
import torch
import torch.nn.functional as F
import transformers

from alambic.cli import main
from alambic.errors import AlambicError
from alambic.tasks.augment import WORD, AugmentConfig, Substitutes, augment_examples, whole_word_vocabulary
from alambic.tasks.data import ClassificationExample, TokenExample, read_task_data
from tiny import bpe_tokenizer, tiny_bert, wordpiece_tokenizer

SENTENCE = "The cat sat on the mat near distillation tanks."


@pytest.fixture(scope="module")
def tokenizer():
    return wordpiece_tokenizer()


@pytest.fixture(scope="module")
def substitutes(tokenizer):
    return Substitutes(tiny_bert(), tokenizer, k=4)


def spans(text):
    return [m.span() for m in WORD.finditer(text)]


def test_whole_words_are_the_tokens_a_word_becomes_after_a_space(tokenizer):
    for tok in (tokenizer, bpe_tokenizer()):
        ids, words = whole_word_vocabulary(tok)
        assert len(ids) == len(words) > 0
        assert all(w.isalpha() for w in words)
        assert [tok(" " + w, add_special_tokens=False)["input_ids"] for w in words[:200]] == [[i] for i in ids[:200].tolist()]
    ids, words = whole_word_vocabulary(tokenizer)
    assert "cat" in words and not any(w.startswith("#") for w in words)


def test_one_token_words_get_the_masked_lm_predictions(substitutes, tokenizer):
    model = substitutes.model
    encoding = tokenizer(SENTENCE)
    ids = encoding["input_ids"]
    position = ids.index(tokenizer.convert_tokens_to_ids("cat"))
    masked = torch.tensor([ids])
    masked[0, position] = tokenizer.mask_token_id
    with torch.no_grad():
        logits = model(input_ids=masked).logits[0, position]
    vocab_ids, vocab_words = whole_word_vocabulary(tokenizer)
    ranked = [vocab_words[j] for j in logits[vocab_ids].topk(10).indices.tolist()]
    expected = [w for w in ranked if w != "cat"][:4]
    found = substitutes(SENTENCE, spans(SENTENCE))
    assert found[1] == expected  # "cat", the second word


def test_words_of_several_tokens_get_embedding_neighbours(substitutes, tokenizer):
    word = "distillation"
    pieces = tokenizer(word, add_special_tokens=False)["input_ids"]
    assert len(pieces) > 1
    embeddings = substitutes.model.get_input_embeddings().weight.detach()
    vocab_ids, vocab_words = whole_word_vocabulary(tokenizer)
    scores = F.normalize(embeddings[pieces].mean(0), dim=-1) @ F.normalize(embeddings[vocab_ids], dim=-1).T
    expected = [vocab_words[j] for j in scores.topk(5).indices.tolist() if vocab_words[j] != word][:4]
    found = substitutes(SENTENCE, spans(SENTENCE))
    index = [SENTENCE[b:e] for b, e in spans(SENTENCE)].index(word)
    assert found[index] == expected


def test_a_model_without_mlm_head_uses_embeddings_for_every_word(tokenizer):
    bare = transformers.BertModel(tiny_bert().config)
    found = Substitutes(bare, tokenizer, k=3)
    assert not found.uses_mlm
    assert all(len(options) == 3 for options in found(SENTENCE, spans(SENTENCE)))


def test_copies_keep_labels_pairs_punctuation_and_capitals(substitutes):
    examples = [ClassificationExample("Profits rose 76% to $1.13bn, the FIRM said.", "business", "A second text!"),
                ClassificationExample("Arsenal won again.", "sport")]
    out = augment_examples("classification", examples, substitutes, AugmentConfig(copies=3, probability=1.0))
    assert len(out) == 2 * 4 and out[0] is examples[0] and out[4] is examples[1]
    for copy in out[1:4]:
        assert copy.label == "business" and copy.text_pair is not None and copy.text_pair.endswith("!")
        assert "76%" in copy.text and "$1.13bn," in copy.text and copy.text.endswith(" said.") is False
        words = [copy.text[b:e] for b, e in spans(copy.text)]
        assert words[0][0].isupper() and words[-2].isupper()  # "Profits" -> Capitalised, "FIRM" -> UPPER
    assert all(c.label == "sport" and c.text_pair is None and c.text.endswith(".") for c in out[5:])
    assert all(c.text != examples[0].text for c in out[1:4])  # probability 1: every word replaced


def test_probability_zero_copies_the_examples_and_a_seed_repeats_itself(substitutes):
    example = ClassificationExample(SENTENCE, "x")
    same = augment_examples("classification", [example], substitutes, AugmentConfig(copies=2, probability=0.0))
    assert [c.text for c in same] == [SENTENCE] * 3
    first, second = (augment_examples("classification", [example], substitutes, AugmentConfig(copies=5, seed=7))
                     for _ in range(2))
    assert [c.text for c in first] == [c.text for c in second]
    assert len({c.text for c in first}) > 2


def test_ner_words_are_replaced_one_for_one(substitutes):
    example = TokenExample(["John", "lives", "in", "Paris", ",", "France", "."],
                           ["B-PER", "O", "O", "B-LOC", "O", "B-LOC", "O"])
    out = augment_examples("ner", [example], substitutes, AugmentConfig(copies=4, probability=1.0))
    for copy in out[1:]:
        assert copy.tags == example.tags and len(copy.words) == len(example.words)
        assert copy.words[4] == "," and copy.words[6] == "."
        assert all(new != old for new, old in zip(copy.words, example.words) if old.isalpha())


def test_qa_and_bad_settings_are_refused(substitutes):
    with pytest.raises(AlambicError, match="answer span"):
        augment_examples("qa", [], substitutes, AugmentConfig())
    with pytest.raises(AlambicError, match="--probability"):
        augment_examples("classification", [], substitutes, AugmentConfig(probability=1.5))


def test_augment_command_writes_data_the_task_readers_load(tmp_path, capsys):
    tiny_bert().save_pretrained(tmp_path / "mlm")
    wordpiece_tokenizer().save_pretrained(tmp_path / "mlm")
    with (tmp_path / "train.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows([["Shares fell sharply in London.", "business"], ["The team won the cup.", "sport"]])
    (tmp_path / "train.conll").write_text("John B-PER\nlives O\nin O\nParis B-LOC\n\n")
    code = main(["augment", "--task", "classification", "--data", str(tmp_path / "train.csv"), "--model",
                 str(tmp_path / "mlm"), "--out", str(tmp_path / "aug.jsonl"), "--copies", "3"])
    assert code == 0 and "8 examples written" in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "aug.jsonl").read_text().splitlines()]
    assert len(records) == 8 and [r["label"] for r in records] == ["business"] * 4 + ["sport"] * 4
    assert len(read_task_data("classification", tmp_path / "aug.jsonl")) == 8
    code = main(["augment", "--task", "ner", "--data", str(tmp_path / "train.conll"), "--model", str(tmp_path / "mlm"),
                 "--out", str(tmp_path / "aug.conll"), "--copies", "2"])
    assert code == 0
    sentences = read_task_data("ner", tmp_path / "aug.conll")
    assert len(sentences) == 3 and all(s.tags == ["B-PER", "O", "O", "B-LOC"] for s in sentences)
    assert "3 examples written" in capsys.readouterr().out
    code = main(["augment", "--task", "ner", "--data", str(tmp_path / "train.conll"), "--model", str(tmp_path / "mlm"),
                 "--out", str(tmp_path), "--copies", "2"])
    assert code == 2 and "is a folder" in capsys.readouterr().err


def test_words_past_the_model_length_keep_no_substitutes(substitutes):
    text = " ".join(["market"] * 300)  # tiny BERT takes 128 positions
    found = substitutes(text, spans(text))
    assert all(found[:100]) and not any(found[-100:])


def test_a_long_text_shows_the_masked_lm_a_window_around_each_word(tokenizer):
    model = tiny_bert()
    text = " ".join(["the market rose as shares of the firm gained"] * 6)  # 54 words, 56 tokens with specials
    context = 16
    found = Substitutes(model, tokenizer, k=3, context=context)(text, spans(text))
    ids = tokenizer(text)["input_ids"]
    vocab_ids, vocab_words = whole_word_vocabulary(tokenizer)
    for word_index in (0, 30, 53):  # start, middle and end of the text: windows clamped at both ends
        position = word_index + 1  # one token per word, after [CLS]
        inner = ids[1:-1]
        start = min(max(position - 1 - (context - 2) // 2, 0), len(inner) - (context - 2))
        window = [ids[0], *inner[start:start + context - 2], ids[-1]]
        at = position - start
        assert len(window) == context and window[at] == ids[position]
        window[at] = tokenizer.mask_token_id
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([window])).logits[0, at]
        word = text.split()[word_index]
        ranked = [vocab_words[j] for j in logits[vocab_ids].topk(10).indices.tolist()]
        assert found[word_index] == [w for w in ranked if w != word][:3]
