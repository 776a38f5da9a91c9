"""The DistilBERT objective equals the triple loss written out directly on full [B, L, V] logits, in value and in
gradients (the fused vocabulary loss computes its gradients by hand); chunking changes neither."""

import pytest
import torch
import torch.nn.functional as F

from alambic.config import DataConfig
from alambic.data.pipeline import training_batches
from alambic.recipes.distilbert import DistilBERTLossConfig, DistilBERTRecipe
from alambic.students import init_student
from tiny import bpe_tokenizer, tiny_bert, tiny_llama, wordpiece_tokenizer


def setup(family, text_dir, **loss):
    teacher, tokenizer, kind = (tiny_bert(), wordpiece_tokenizer(), "masked") if family == "bert" else (
        tiny_llama(), bpe_tokenizer(), "causal")
    student = init_student(teacher, layers=[0, 3]).model.eval()  # eval: no dropout, so both paths see one function
    cfg = DistilBERTLossConfig(**loss)
    masking = cfg if kind == "masked" else None
    batch = training_batches([str(text_dir)], tokenizer, kind, DataConfig(max_length=20, min_tokens=2), masking, 3,
                             seed=0)(1)
    return DistilBERTRecipe(teacher, student, cfg), batch, cfg


def recipe_loss(recipe, batch):
    counts = {k: torch.tensor(float(v)) for k, v in recipe.row_counts(batch).items()}
    return recipe.objective(batch, recipe.teacher_targets(batch), counts)


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("kd_rows", ["tokens", "masked"])
def test_objective_equals_the_triple_loss_written_out(family, kd_rows, text_dir):
    if family == "llama" and kd_rows == "masked":
        pytest.skip("decoders have no masked rows")
    recipe, batch, cfg = setup(family, text_dir, kd_rows=kd_rows)
    loss, terms = recipe_loss(recipe, batch)
    loss.backward()
    fused_grads = {n: p.grad.clone() for n, p in recipe.student.named_parameters() if p.grad is not None}
    recipe.student.zero_grad(set_to_none=True)

    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    with torch.no_grad():
        t_logits = recipe.teacher(input_ids=ids, attention_mask=batch["attention_mask"]).logits
        t_hidden = recipe.teacher.base_model(input_ids=ids, attention_mask=batch["attention_mask"]).last_hidden_state
    s_logits = recipe.student(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    s_hidden = recipe.student.base_model(input_ids=ids, attention_mask=batch["attention_mask"]).last_hidden_state
    labels = torch.full(ids.shape, -100)
    labels.view(-1)[batch["lm_positions"]] = batch["lm_targets"]
    kd_mask = mask if kd_rows == "tokens" else labels != -100
    T = cfg.temperature
    kd = F.kl_div(F.log_softmax(s_logits[kd_mask] / T, -1), F.log_softmax(t_logits[kd_mask] / T, -1),
                  reduction="batchmean", log_target=True) * T * T
    lm = F.cross_entropy(s_logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    cos = F.cosine_embedding_loss(s_hidden[mask], t_hidden[mask], torch.ones(int(mask.sum())))
    torch.testing.assert_close(terms["kd"], kd, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(terms["lm"], lm, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(terms["cos"], cos, rtol=1e-4, atol=1e-6)
    direct = 5 * kd + 2 * lm + 1 * cos
    torch.testing.assert_close(loss.detach(), direct.detach(), rtol=1e-4, atol=1e-6)
    direct.backward()
    direct_grads = {n: p.grad for n, p in recipe.student.named_parameters() if p.grad is not None}
    assert fused_grads.keys() == direct_grads.keys()
    for name, grad in direct_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_chunked_vocabulary_losses_give_the_same_step(family, text_dir):
    grads = {}
    for chunk in (0, 7):
        recipe, batch, _ = setup(family, text_dir, logit_chunk_rows=chunk)
        loss, _ = recipe_loss(recipe, batch)
        loss.backward()
        grads[chunk] = (loss.detach(), {n: p.grad.clone() for n, p in recipe.student.named_parameters() if p.grad is not None})
    torch.testing.assert_close(grads[7][0], grads[0][0])
    for name, grad in grads[0][1].items():
        torch.testing.assert_close(grads[7][1][name], grad, rtol=1e-3, atol=1e-5)
