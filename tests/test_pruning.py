"""Width pruning: narrower students sliced out of the teacher by measured importance (Minitron)."""

import pytest
import torch
import torch.nn.functional as F
import transformers

from alambic import modeling
from alambic.data.collate import pad_rows
from alambic.errors import AlambicError
from alambic.students import init_student
from alambic.students.pruning import measure_importance
from tiny import DECODERS, ENCODERS, bpe_tokenizer, sample_texts, tiny_bert, tiny_gpt2, tiny_llama, wordpiece_tokenizer


def text_batches(model, n_batches=3, length=48):
    """Real BBC text, tokenised by the tokenizer of the model's family, in the batch contract."""
    wordpiece = model.config.vocab_size == 30522
    tokenizer = wordpiece_tokenizer() if wordpiece else bpe_tokenizer()
    texts = [t[:800] for t in sample_texts(4 * n_batches)]
    batches = []
    for i in range(n_batches):
        encoded = tokenizer(texts[4 * i: 4 * i + 4], truncation=True, max_length=length)["input_ids"]
        ids, mask = pad_rows([[x % model.config.vocab_size for x in seq] for seq in encoded], tokenizer.pad_token_id or 0)
        batches.append({"input_ids": ids, "attention_mask": mask,
                        "token_positions": mask.reshape(-1).nonzero().squeeze(1)})
    return batches


@torch.no_grad()
def kl_to_teacher(teacher, student, batches):
    total = 0.0
    for batch in batches:
        mask = batch["attention_mask"].bool()
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[mask]
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[mask]
        total += F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="batchmean").item()
    return total / len(batches)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_ffn_only_narrowing_keeps_exact_teacher_rows_and_stays_closer_than_random(family):
    teacher = {"bert": tiny_bert, "llama": tiny_llama}[family]()
    batches = text_batches(teacher)
    pruned = init_student(teacher, layers=[0, 1, 2, 3], intermediate_size=24, calibration_data=batches)
    random = init_student(teacher, layers=[0, 1, 2, 3], intermediate_size=24, width_init="random")
    importance = measure_importance(teacher, batches)
    t_layers, s_layers = modeling.transformer_layers(teacher), modeling.transformer_layers(pruned.model)
    for i in range(4):
        kept = sorted(sorted(range(64), key=lambda j: -float(importance.ffn[i][j]))[:24])
        if family == "bert":
            t_in, s_in = t_layers[i].intermediate.dense, s_layers[i].intermediate.dense
            t_out, s_out = t_layers[i].output.dense, s_layers[i].output.dense
        else:
            t_in, s_in = t_layers[i].mlp.up_proj, s_layers[i].mlp.up_proj
            t_out, s_out = t_layers[i].mlp.down_proj, s_layers[i].mlp.down_proj
            assert torch.equal(s_layers[i].mlp.gate_proj.weight, t_layers[i].mlp.gate_proj.weight[kept])
        assert torch.equal(s_in.weight, t_in.weight[kept])  # the FFN's rows are exactly the kept teacher rows
        assert torch.equal(s_out.weight, t_out.weight[:, kept])
    assert pruned.copied_parameters == pruned.student_parameters
    assert kl_to_teacher(teacher, pruned.model, batches) < kl_to_teacher(teacher, random.model, batches)


@pytest.mark.parametrize("family", sorted({**ENCODERS, **DECODERS}))
def test_every_family_is_sliced_whole_and_stays_closer_than_random(family):
    build = {**ENCODERS, **DECODERS}[family]
    teacher = build()
    batches = text_batches(teacher)
    shape = dict(layers=[0, 2, 3], hidden_size=16, intermediate_size=24)
    pruned = init_student(teacher, calibration_data=batches, **shape)
    random = init_student(teacher, width_init="random", **shape)
    assert pruned.copied_parameters == pruned.student_parameters, pruned.notes
    assert any("sliced from the teacher: hidden channels: 16 of 32" in note for note in pruned.notes)
    assert kl_to_teacher(teacher, pruned.model, batches) < kl_to_teacher(teacher, random.model, batches)


def test_a_dead_neuron_head_and_channel_are_the_ones_dropped():
    teacher = tiny_bert()
    layer = teacher.bert.encoder.layer[1]
    with torch.no_grad():
        layer.intermediate.dense.weight[5].zero_()
        layer.intermediate.dense.bias[5] = -10.0  # GELU(-10) ~ 0: neuron 5 never fires
        layer.attention.self.value.weight[8:16].zero_()  # head 1 (of 4, size 8) writes nothing
        layer.attention.self.value.bias[8:16].zero_()
    importance = measure_importance(teacher, text_batches(teacher))
    assert int(importance.ffn[1].argmin()) == 5
    assert int(importance.heads[1].argmin()) == 1
    student = init_student(teacher, layers=[0, 1], hidden_size=24, num_heads=3, intermediate_size=63,
                           calibration_data=text_batches(teacher))
    assert student.pruning.heads[1] == [0, 2, 3]
    assert 5 not in student.pruning.ffn[1]
    # the norms' weights gate the hidden channels: a channel all norms zero is measured as unimportant
    with torch.no_grad():
        for module in teacher.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight[7] = 0.0
                module.bias[7] = 0.0
    assert int(measure_importance(teacher, text_batches(teacher)).hidden.argmin()) == 7


def test_grouped_query_attention_keeps_whole_key_value_groups():
    teacher = tiny_llama()  # 4 query heads in 2 key/value groups, head_dim 8
    result = init_student(teacher, layers=[0, 1], num_heads=2, calibration_data=text_batches(teacher))
    config, plan = result.model.config, result.pruning
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 1, 8)
    for i in (0, 1):
        (group,) = plan.kv_heads[i]
        assert plan.heads[i] == [2 * group, 2 * group + 1]
        t_attn, s_attn = teacher.model.layers[i].self_attn, result.model.model.layers[i].self_attn
        assert torch.equal(s_attn.k_proj.weight, t_attn.k_proj.weight[8 * group: 8 * group + 8])
        assert torch.equal(s_attn.q_proj.weight, t_attn.q_proj.weight[16 * group: 16 * group + 16])
        assert torch.equal(s_attn.o_proj.weight, t_attn.o_proj.weight[:, 16 * group: 16 * group + 16])


def test_gpt2_fused_projection_is_sliced_per_head_in_each_third():
    teacher = tiny_gpt2()  # 4 heads of 8, Conv1D weights stored (in, out)
    result = init_student(teacher, layers=[0], num_heads=2, hidden_size=16, calibration_data=text_batches(teacher))
    heads, channels = result.pruning.heads[0], result.pruning.hidden
    rows = [h * 8 + j for h in heads for j in range(8)]
    columns = rows + [32 + r for r in rows] + [64 + r for r in rows]
    expected = teacher.transformer.h[0].attn.c_attn.weight[channels][:, columns]
    assert torch.equal(result.model.transformer.h[0].attn.c_attn.weight, expected)
    assert torch.equal(result.model.transformer.wte.weight, teacher.transformer.wte.weight[:, channels])


def test_task_teacher_keeps_its_head_sliced_and_the_card_says_what_was_kept():
    base = tiny_bert()
    teacher = transformers.BertForSequenceClassification(base.config)
    result = init_student(teacher, layers=[0, 3], hidden_size=16, calibration_data=text_batches(base))
    assert result.model.classifier.weight.shape == (2, 16)
    assert torch.equal(result.model.classifier.weight, teacher.classifier.weight[:, result.pruning.hidden])
    card = result.model_card("my-teacher")
    assert "## Width pruning" in card and "hidden channels: 16 of 32" in card and "attention heads: 2 of 4" in card


def test_narrowing_without_calibration_text_says_what_to_give():
    with pytest.raises(AlambicError, match="sliced out of the teacher by measured importance: give calibration text"):
        init_student(tiny_bert(), hidden_size=16)


def test_init_student_cli_slices_a_narrow_student_and_refuses_without_calibration(tmp_path, capsys):
    from alambic.cli import main

    teacher = tmp_path / "teacher"
    tiny_bert().save_pretrained(teacher)
    wordpiece_tokenizer().save_pretrained(teacher)
    text = tmp_path / "calibration.txt"
    text.write_text("\n\n".join(sample_texts(6)), encoding="utf-8")
    capsys.readouterr()
    assert main(["init-student", "--teacher", str(teacher), "--out", str(tmp_path / "s"), "--hidden-size", "16"]) == 2
    message = capsys.readouterr().err.strip()
    assert "needs calibration text: add --calibration-data PATH" in message and "\n" not in message
    assert main(["init-student", "--teacher", str(teacher), "--out", str(tmp_path / "s"), "--layers", "0,3",
                 "--hidden-size", "16", "--intermediate-size", "32", "--calibration-data", str(text)]) == 0
    assert "100.0% of the student's parameters copied" in capsys.readouterr().out
    card = (tmp_path / "s" / "README.md").read_text()
    assert "## Width pruning" in card and "FFN neurons: 32 of 64" in card
    student = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "s")
    assert (student.config.hidden_size, student.config.num_attention_heads) == (16, 2)


def test_only_dimensions_that_carry_hidden_channels_are_sliced():
    # gpt2-medium's coincidence: as many positions as channels (here 32 and 32). The position table keeps every
    # position (rows) and loses channels (columns) only; it is copied, not left fresh.
    teacher = tiny_gpt2(n_positions=32)
    student = init_student(teacher, layers=[0, 1], hidden_size=16, calibration_data=text_batches(teacher, n_batches=6, length=16))
    plan = student.pruning
    wpe = student.model.transformer.wpe.weight
    assert wpe.shape == (32, 16)
    assert torch.equal(wpe, teacher.transformer.wpe.weight[:, plan.hidden])
    assert "wpe" not in " ".join(student.notes)
    # a Llama whose heads keep their size while the width shrinks: the query projection's rows are its heads'
    # channels (4 x 8 = 32 = the teacher's width), not hidden channels, and stay whole; its columns are sliced
    teacher = tiny_llama()
    built = init_student(teacher, layers=[0, 1], hidden_size=16, num_heads=4, intermediate_size=64,
                         calibration_data=text_batches(teacher))
    q = built.model.model.layers[0].self_attn.q_proj.weight
    assert q.shape == (32, 16)
    assert torch.equal(q, teacher.model.layers[0].self_attn.q_proj.weight[:, built.pruning.hidden])
