"""logit_mse, and the task objective against direct computations (QA context masking, NER rows, the hard loss)."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

from alambic.losses import logit_mse, soft_target_kl
from alambic.recipes.task import TaskLossConfig, TaskRecipe
from alambic.tasks.cache import TeacherLogitCache
from alambic.tasks.data import label_list, read_conll, read_squad
from alambic.tasks.features import collate, encode
from tiny import wordpiece_tokenizer

DATA = Path(__file__).parent / "data"


def test_logit_mse_matches_mse_loss_and_masks_columns():
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    assert logit_mse(s, t) == pytest.approx(F.mse_loss(s, t).item(), rel=1e-6)
    assert logit_mse(s, t, num_items=10) == pytest.approx(F.mse_loss(s, t).item() / 2, rel=1e-6)
    mask = torch.tensor([[1, 1, 0, 0]] * 5, dtype=torch.bool)
    assert logit_mse(s, t, mask=mask) == pytest.approx(F.mse_loss(s[:, :2], t[:, :2]).item(), rel=1e-6)
    assert logit_mse(t, t) == 0
    with pytest.raises(ValueError, match="same classes"):
        logit_mse(s, t[:, :3])


def _tiny(cls, **kw):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=128, **kw)
    return cls(config).eval()


def test_qa_prediction_loss_is_the_mean_of_start_and_end_over_context_tokens():
    tokenizer = wordpiece_tokenizer()
    features = encode("qa", read_squad(DATA / "squad.json")[:4], tokenizer, [], max_length=96, doc_stride=16,
                      training=True)
    batch = collate("qa", features, list(range(len(features))), 0)
    teacher = _tiny(transformers.BertForQuestionAnswering)
    torch.manual_seed(1)
    student = _tiny(transformers.BertForQuestionAnswering)
    for p in student.parameters():
        p.data += 0.05 * torch.randn_like(p)
    recipe = TaskRecipe(teacher, student, "qa", TaskLossConfig("kl", temperature=2.0, alpha_kd=1.0, alpha_ce=0.5))
    targets = recipe.teacher_targets(batch)
    loss, terms = recipe.objective(batch, targets, recipe.row_counts(batch))

    out_s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    token_type_ids=batch["token_type_ids"])
    out_t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    token_type_ids=batch["token_type_ids"])
    kd = ce = 0.0
    for b, f in enumerate(features):
        lo, hi = f.context[0], f.context[1] + 1  # context tokens only
        for zs, zt, gold in ((out_s.start_logits, out_t.start_logits, f.start),
                             (out_s.end_logits, out_t.end_logits, f.end)):
            p_t = F.softmax(zt[b, lo:hi] / 2, -1)
            kd += (p_t * (p_t.log() - F.log_softmax(zs[b, lo:hi] / 2, -1))).sum() * 4
            ce += -F.log_softmax(zs[b, lo:hi], -1)[gold - lo]
    n = len(features)
    # (L_start + L_end) / 2 with each averaged over examples = sum over 2n rows / 2n
    assert terms["kd"].item() == pytest.approx((kd / (2 * n)).item(), rel=1e-4)
    assert terms["hard"].item() == pytest.approx((ce / (2 * n)).item(), rel=1e-4)
    assert loss.item() == pytest.approx(0.5 * terms["hard"].item() + terms["kd"].item(), rel=1e-5)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


def _ner_setup():
    """Four CoNLL sentences as features and one batch, their label list, and a tiny token-classification teacher."""
    sentences = read_conll(DATA / "ner.conll")
    labels = label_list("ner", sentences)
    features = encode("ner", sentences[:4], wordpiece_tokenizer(), labels)
    batch = collate("ner", features, [0, 1, 2, 3], 0)
    return features, batch, labels, _tiny(transformers.BertForTokenClassification, num_labels=len(labels))


def test_ner_rows_are_first_sub_words_and_mse_matches():
    features, batch, labels, teacher = _ner_setup()
    torch.manual_seed(2)
    student = _tiny(transformers.BertForTokenClassification, num_labels=len(labels))
    recipe = TaskRecipe(teacher, student, "ner", TaskLossConfig("mse", alpha_kd=1.0, alpha_ce=0.0))
    loss, terms = recipe.objective(batch, recipe.teacher_targets(batch), recipe.row_counts(batch))
    zs = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 token_type_ids=batch["token_type_ids"]).logits
    zt = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 token_type_ids=batch["token_type_ids"]).logits
    rows = [(b, t) for b, f in enumerate(features) for t in f.first_subwords]
    expected = sum(F.mse_loss(zs[b, t], zt[b, t]) for b, t in rows) / len(rows)
    assert recipe.row_counts(batch) == {"rows": len(rows), "hard_rows": len(rows)}
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_teacher_logit_cache_runs_the_teacher_once(tmp_path):
    features, batch, labels, teacher = _ner_setup()
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    cache = TeacherLogitCache("ner", "key", folder=tmp_path)
    recipe = TaskRecipe(teacher, _tiny(transformers.BertForTokenClassification, num_labels=len(labels)), "ner",
                        TaskLossConfig(), cache=cache)
    first = recipe.teacher_targets(batch)["logits"]
    second = recipe.teacher_targets(batch)["logits"]
    assert len(calls) == 1 and torch.allclose(first, second)
    kl = soft_target_kl(second, first)
    assert kl.item() == pytest.approx(0.0, abs=1e-6)


def _mixed_classification_batch():
    """Six examples, the 2nd and 5th without a label (a transfer set mixed into the training data)."""
    from alambic.tasks.data import ClassificationExample

    texts = ["the markets fell", "a new film opens", "the minister resigned", "the team won the cup",
             "a faster chip", "shares rose again"]
    labels = ["a", None, "b", "a", None, "b"]
    examples = [ClassificationExample(t, y) for t, y in zip(texts, labels)]
    features = encode("classification", examples, wordpiece_tokenizer(), ["a", "b"], max_length=32)
    return features, collate("classification", features, list(range(6)), 0)


def test_mixed_batch_normalises_each_term_by_its_own_rows():
    features, batch = _mixed_classification_batch()
    assert batch["hard_rows"].tolist() == [0, 2, 3, 5]
    teacher = _tiny(transformers.BertForSequenceClassification, num_labels=2)
    torch.manual_seed(1)
    student = _tiny(transformers.BertForSequenceClassification, num_labels=2)
    for p in student.parameters():
        p.data += 0.05 * torch.randn_like(p)
    recipe = TaskRecipe(teacher, student, "classification", TaskLossConfig("kl", 2.0, alpha_kd=0.7, alpha_ce=0.3))
    counts = recipe.row_counts(batch)
    assert counts == {"rows": 6, "hard_rows": 4}
    loss, terms = recipe.objective(batch, recipe.teacher_targets(batch), counts)

    zs = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad():
        zt = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    kd = 4 * F.kl_div((zs / 2).log_softmax(-1), (zt / 2).log_softmax(-1), log_target=True, reduction="sum") / 6
    gold = torch.tensor([0, 1, 0, 1])
    hard = F.cross_entropy(zs[[0, 2, 3, 5]], gold, reduction="sum") / 4
    expected = 0.7 * kd + 0.3 * hard
    torch.testing.assert_close(terms["kd"], kd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["hard"], hard, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    grad = torch.autograd.grad(loss, student.classifier.weight, retain_graph=True)[0]
    torch.testing.assert_close(grad, torch.autograd.grad(expected, student.classifier.weight)[0], rtol=1e-4,
                               atol=1e-6)


def test_accumulated_micro_batches_normalise_by_the_global_row_counts():
    """Split the mixed batch in two micro-batches whose labelled shares differ: with the global counts (what the
    engine passes), the sum of the micro-batch losses equals the loss of the whole batch."""
    features, batch = _mixed_classification_batch()
    teacher = _tiny(transformers.BertForSequenceClassification, num_labels=2)
    student = _tiny(transformers.BertForSequenceClassification, num_labels=2)
    recipe = TaskRecipe(teacher, student, "classification", TaskLossConfig("kl", 2.0, alpha_kd=1.0, alpha_ce=1.0))
    whole, _ = recipe.objective(batch, recipe.teacher_targets(batch), recipe.row_counts(batch))
    parts = [collate("classification", features[:2], [0, 1], 0), collate("classification", features[2:], [2, 3, 4, 5], 0)]
    counts = {k: sum(recipe.row_counts(p)[k] for p in parts) for k in ("rows", "hard_rows")}
    split = sum(recipe.objective(p, recipe.teacher_targets(p), counts)[0] for p in parts)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6)


def test_unlabelled_ner_and_qa_rows_get_no_hard_loss():
    from alambic.tasks.data import QAExample, TokenExample

    tokenizer = wordpiece_tokenizer()
    sentences = [TokenExample(["John", "lives", "in", "Paris"], ["B-PER", "O", "O", "B-LOC"]),
                 TokenExample(["Mary", "left"], None)]
    features = encode("ner", sentences, tokenizer, ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"], max_length=32)
    batch = collate("ner", features, [0, 1], 0)
    assert batch["hard_rows"].tolist() == [0, 1, 2, 3] and batch["label_ids"][4:].tolist() == [-1, -1]
    context = "Paris is the capital of France. " * 6
    questions = [QAExample("1", "What is the capital?", context, ["Paris"], [0]),
                 QAExample("2", "Which country?", context)]
    features = encode("qa", questions, tokenizer, [], max_length=32, doc_stride=8, training=True)
    unlabelled = [f for f in features if not f.labelled]
    assert len(unlabelled) > 1  # every window of an unlabelled question is kept
    batch = collate("qa", features, list(range(len(features))), 0)
    labelled = [b for b, f in enumerate(features) if f.labelled]
    assert batch["hard_rows"].tolist() == labelled + [len(features) + b for b in labelled]
