"""Task data readers, label maps, the held-out split, and their one-line errors."""

import json
from pathlib import Path

import pytest

from alambic.errors import AlambicError
from alambic.tasks.data import (check_labels, holdout_split, label_list, read_conll, read_squad, read_task_data)

DATA = Path(__file__).parent / "data"


def test_csv_jsonl_and_korean_classification():
    topics = read_task_data("classification", DATA / "topics.csv")
    assert len(topics) == 18 and topics[0].label == "business" and topics[0].text_pair is None
    korean = read_task_data("classification", DATA / "sentiment_ko.jsonl")
    assert korean[0].text.startswith("이 영화") and {e.label for e in korean} == {"긍정", "부정"}
    pairs = read_task_data("classification", DATA / "pairs.jsonl")
    assert pairs[0].text_pair == "Someone plays music." and pairs[-1].text_pair == "아무도 먹지 않는다."


def test_label_folders_dedupe_and_replace_bad_bytes():
    examples = read_task_data("classification", DATA / "label_folders")
    texts = [e.text for e in examples]
    assert texts.count("Profits rose at the bank.") == 1  # identical texts kept once
    assert len(examples) == 5
    assert any("\ufffd" in t for t in texts)  # the latin-1 file is read, its bad byte replaced
    assert [e.label for e in examples] == ["business", "business", "sport", "sport", "sport"]


def test_label_map_is_deterministic_and_numeric_aware():
    class E:
        def __init__(self, label):
            self.label = label

    assert label_list("classification", [E("b"), E("a"), E("b")]) == ["a", "b"]
    assert label_list("classification", [E("b"), E("a")]) == label_list("classification", [E("a"), E("b")])
    assert label_list("classification", [E("10"), E("2"), E("1")]) == ["1", "2", "10"]
    ner = read_conll(DATA / "ner.conll")
    assert label_list("ner", ner) == ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    assert label_list("qa", []) == []


def test_conll_reader_sentences_docstart_and_korean():
    sentences = read_conll(DATA / "ner.conll")
    assert len(sentences) == 12
    assert sentences[0].words[:2] == ["John", "Smith"] and sentences[0].tags[:2] == ["B-PER", "I-PER"]
    assert sentences[7].words[0] == "김철수는" and sentences[7].tags[0] == "B-PER"


def test_malformed_conll_line_names_file_and_line():
    with pytest.raises(AlambicError, match=r"ner_bad\.conll:5: expected a token and its tag"):
        read_conll(DATA / "ner_bad.conll")


def test_conll_tag_that_is_not_iob2(tmp_path):
    path = tmp_path / "x.conll"
    path.write_text("John PERSON\n", encoding="utf-8")
    with pytest.raises(AlambicError, match=r"x\.conll:1: tag 'PERSON' is not BIO / IOB2"):
        read_conll(path)


def test_squad_reader_and_misplaced_answer():
    examples = read_squad(DATA / "squad.json")
    assert len(examples) == 11
    assert examples[0].answers == ["Paris, France", "Paris"]
    assert examples[6].context.startswith("서울은")
    with pytest.raises(AlambicError, match=r"answer 'Guido van Rossum' is not at answer_start \d+ \(the context"):
        read_squad(DATA / "squad_bad_start.json")


def test_validation_label_never_seen_in_training():
    train = read_task_data("classification", DATA / "topics.csv")
    held = read_task_data("classification", DATA / "topics_bad_validation.csv")
    with pytest.raises(AlambicError, match="label 'politics' never occurs in the training data"):
        check_labels("classification", held, label_list("classification", train), "topics_bad_validation.csv")


def test_missing_field_is_named(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"sentence": "hi", "label": "a"}) + "\n", encoding="utf-8")
    with pytest.raises(AlambicError, match="no field 'text'.*fields: label, sentence"):
        read_task_data("classification", path)


def test_holdout_is_seeded_and_stratified():
    examples = read_task_data("classification", DATA / "topics.csv")  # 6 per class
    train, held = holdout_split("classification", examples, 0.34, seed=3)
    assert sorted(e.label for e in held) == ["business"] * 2 + ["sport"] * 2 + ["tech"] * 2
    again_train, again_held = holdout_split("classification", examples, 0.34, seed=3)
    assert [e.text for e in again_held] == [e.text for e in held]
    other = holdout_split("classification", examples, 0.34, seed=4)[1]
    assert [e.text for e in other] != [e.text for e in held]
    assert len(train) + len(held) == len(examples) and not {e.text for e in train} & {e.text for e in held}
    # 10% of 6 rounds to 1 per class (at least one held out when a class has two or more)
    assert len(holdout_split("classification", examples, seed=0)[1]) == 3
