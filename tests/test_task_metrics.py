"""Task metrics against hand-computed cases."""

import pytest

from alambic.tasks.metrics import (accuracy, entities, entity_scores, exact_match, korquad_exact_match, korquad_f1,
                                   macro_f1, normalize_answer, normalize_korquad, squad_f1, squad_scores)


def test_accuracy_and_macro_f1_by_hand():
    gold = ["a", "a", "a", "b", "b", "c"]
    pred = ["a", "a", "b", "b", "c", "c"]
    assert accuracy(pred, gold) == pytest.approx(4 / 6)
    # a: tp2 fp0 fn1 -> P1 R2/3 F 0.8; b: tp1 fp1 fn1 -> 0.5; c: tp1 fp1 fn0 -> P.5 R1 F 2/3
    assert macro_f1(pred, gold) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


def test_macro_f1_counts_a_class_only_predicted_as_zero():
    # "x" never in gold but predicted once: its F1 is 0 and it counts in the mean (scikit-learn's behaviour)
    assert macro_f1(["a", "x"], ["a", "a"]) == pytest.approx((2 / 3 + 0.0) / 2)


def test_entities_iob2_spans():
    tags = ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC", "O"]
    assert entities(tags) == {("PER", 0, 1), ("LOC", 3, 3), ("LOC", 4, 5)}


def test_entities_i_without_b_starts_an_entity_and_type_changes_split():
    assert entities(["O", "I-ORG", "I-ORG", "O"]) == {("ORG", 1, 2)}
    assert entities(["I-PER"]) == {("PER", 0, 0)}
    assert entities(["B-PER", "I-LOC", "I-LOC"]) == {("PER", 0, 0), ("LOC", 1, 2)}
    assert entities(["B-PER", "I-PER", "I-PER"]) == {("PER", 0, 2)}


def test_entity_precision_recall_f1_by_hand():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "B-LOC"]]
    # gold: PER(0,1) LOC(3,3) | ORG(0,0); pred: PER(0,1) | ORG(0,0) LOC(1,1) -> tp 2, fp 1, fn 1
    scores = entity_scores(pred, gold)
    assert scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 / 3)
    # a partially matching span counts as wrong
    assert entity_scores([["B-PER", "O"]], [["B-PER", "I-PER"]])["f1"] == 0.0


def test_squad_normalisation_is_the_official_one():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("an apple, a pear") == "apple pear"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words


def test_squad_em_and_f1_by_hand():
    assert exact_match("the Paris", "Paris") == 1.0
    assert exact_match("Paris, France", "Paris") == 0.0
    # prediction "paris france" vs gold "paris": common 1, P 1/2, R 1 -> F1 2/3
    assert squad_f1("Paris, France", "Paris") == pytest.approx(2 / 3)
    assert squad_f1("London", "Paris") == 0.0
    # max over gold answers, in percent
    scores = squad_scores(["Paris, France", "1889"], [["Paris", "Paris, France"], ["in 1889 or so"]])
    assert scores["exact_match"] == pytest.approx(50.0)
    # second: pred "1889" vs gold "in 1889 or so": P 1, R 1/4 -> 0.4
    assert scores["f1"] == pytest.approx(100 * (1.0 + 0.4) / 2)


def test_squad_f1_on_korean_answers():
    assert exact_match("서울", "서울") == 1.0
    assert squad_f1("약 천만 명", "천만 명") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))


def test_korquad_normalisation_and_character_f1_by_hand():
    assert normalize_korquad("《서울》 (특별시)") == "서울 특별시"  # CJK and ASCII brackets to spaces
    assert normalize_korquad("The  Tower!") == "the tower"  # no English articles removed, unlike SQuAD
    assert korquad_exact_match("‘서울’", "서울") == 1.0 and exact_match("‘서울’", "서울") == 0.0
    # "서울에서" vs "서울": characters 서 울 에 서 vs 서 울: common 2, P 2/4, R 1 -> 2/3; SQuAD's word F1 gives 0
    assert korquad_f1("서울에서", "서울") == pytest.approx(2 / 3)
    assert squad_f1("서울에서", "서울") == 0.0
    # spaces do not count: "천만 명" vs "약 천만 명": pred 천 만 명, gold 약 천 만 명 -> P 1, R 3/4 -> 6/7
    assert korquad_f1("천만 명", "약 천만 명") == pytest.approx(6 / 7)
    assert korquad_f1("부산", "서울") == 0.0
    scores = squad_scores(["서울에서", "부산"], [["서울"], ["부산", "대구"]], style="korquad")
    assert scores["exact_match"] == pytest.approx(50.0) and scores["f1"] == pytest.approx(100 * (2 / 3 + 1) / 2)


@pytest.mark.parametrize("seed", range(5))
def test_qa_span_decoding_equals_a_brute_force_search_over_hand_built_logits(seed):
    """The best span is the highest start + end logit with the start at or before the end, both inside the context
    window and at most MAX_ANSWER_TOKENS long; question and [CLS] tokens never answer."""
    import torch

    from alambic.tasks.evaluate import MAX_ANSWER_TOKENS, _best_span
    from alambic.tasks.features import Feature

    g = torch.Generator().manual_seed(seed)
    length, first, last = 48, 6, 46  # context of 41 tokens: longer than the n-best lists and the longest answer
    start, end = torch.randn(length, generator=g), torch.randn(length, generator=g)
    start[0] = end[0] = start[2] = end[3] = 50.0  # [CLS] and question tokens score highest but must never win
    start[30], end[29] = 40.0, 40.0  # the best start and end inside the context, but the end comes first
    start[8], end[8 + MAX_ANSWER_TOKENS] = 30.0, 30.0  # a pair one token longer than an answer may be
    feature = Feature(input_ids=[0] * length, token_type_ids=[0] * length, example=0, context=(first, last))
    expected = max((float(start[s] + end[e]), s, e) for s in range(first, last + 1) for e in range(s, last + 1)
                   if e - s < MAX_ANSWER_TOKENS)
    score, s, e = _best_span(start, end, feature)
    assert (s, e) == expected[1:] and score == pytest.approx(expected[0])

