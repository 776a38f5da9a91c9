import copy

import pytest
import torch
import transformers
from tiny import (DECODERS, ENCODERS, bpe_tokenizer, tiny_bert, tiny_distilbert, tiny_gpt2, tiny_llama,
                  wordpiece_tokenizer)

from alambic import modeling
from alambic.errors import AlambicError
from alambic.students import count_parameters, init_student, parse_layer_spec, save_student
from alambic.students.layer_map import layers_record

FAMILIES = {**ENCODERS, **DECODERS}


def _batch(vocab):
    torch.manual_seed(1)
    ids = torch.randint(3, vocab, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return dict(input_ids=ids, attention_mask=mask)


def _logits(model, batch, **extra):
    if modeling.model_kind(model) == "causal":
        extra["use_cache"] = False  # a bypassed teacher keeps its old layer indices, which a cache would trip on
    with torch.no_grad():
        return model(**batch, **extra).logits


def _bypassed(teacher, layers):
    """The teacher itself, running only ``layers``: what a correctly copied student must compute."""
    model = copy.deepcopy(teacher)
    blocks = modeling.transformer_layers(model)
    kept = [blocks[i] for i in layers]
    del blocks[:]
    blocks.extend(kept)
    modeling.set_num_layers(model.config, len(layers))
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in layers]
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_all_layers_reproduce_the_teacher(family):
    teacher = FAMILIES[family]()
    student = init_student(teacher, layers="all").model
    batch = _batch(teacher.config.vocab_size)
    assert torch.equal(_logits(student, batch), _logits(teacher, batch))


@pytest.mark.parametrize("spec", ["every-other", "1,3", "linspace:3"])
@pytest.mark.parametrize("family", FAMILIES)
def test_layer_subset_equals_teacher_with_skipped_layers_bypassed(family, spec):
    teacher = FAMILIES[family]()
    result = init_student(teacher, layers=spec)
    assert modeling.num_layers(result.model.config) == len(result.layers) < 4
    batch = _batch(teacher.config.vocab_size)
    assert torch.equal(_logits(result.model, batch), _logits(_bypassed(teacher, result.layers), batch))


def test_token_types_dropped_without_changing_outputs():
    teacher = tiny_bert()
    result = init_student(teacher, layers="all")
    embeddings = result.model.bert.embeddings.token_type_embeddings.weight
    assert embeddings.shape == (1, 32) and result.model.config.type_vocab_size == 1
    assert torch.equal(embeddings[0], teacher.bert.embeddings.token_type_embeddings.weight[0])
    batch = _batch(teacher.config.vocab_size)
    zeros = torch.zeros_like(batch["input_ids"])
    assert torch.equal(_logits(result.model, batch), _logits(teacher, batch, token_type_ids=zeros))
    assert any("token types dropped" in note for note in result.notes)


def test_task_teachers_keep_their_token_types_so_sentence_pairs_still_differ():
    torch.manual_seed(0)
    teacher = transformers.BertForSequenceClassification(tiny_bert().config).eval()
    batch = _batch(teacher.config.vocab_size)
    segments = torch.zeros_like(batch["input_ids"])
    segments[:, 4:] = 1  # a second segment, as a sentence pair gets
    with torch.no_grad():
        expected = teacher(**batch, token_type_ids=segments).logits
    kept = init_student(teacher, layers="all").model  # auto: a task teacher keeps its types
    assert kept.config.type_vocab_size == 2
    with torch.no_grad():
        torch.testing.assert_close(kept(**batch, token_type_ids=segments).logits, expected)
    dropped = init_student(teacher, layers="all", token_types="drop").model
    assert dropped.config.type_vocab_size == 1
    assert init_student(tiny_bert(), layers="all", token_types="keep").model.config.type_vocab_size == 2
    with pytest.raises(AlambicError, match="token types must be one of"):
        init_student(teacher, token_types="both")


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_student_reloads_with_plain_transformers(family, tmp_path):
    teacher = FAMILIES[family]()
    tokenizer = wordpiece_tokenizer() if teacher.config.vocab_size == 30522 else bpe_tokenizer()
    result = init_student(teacher)
    out = save_student(result.model, tokenizer, tmp_path / "student")
    auto = transformers.AutoModelForCausalLM if family in DECODERS else transformers.AutoModelForMaskedLM
    reloaded = auto.from_pretrained(out).eval()
    assert type(reloaded) is type(result.model)
    assert (out / "model.safetensors").is_file()
    assert not [p.name for p in out.iterdir() if "alambic" in p.name or p.suffix in (".pt", ".bin")]
    assert transformers.AutoTokenizer.from_pretrained(out).get_vocab() == tokenizer.get_vocab()
    batch = _batch(teacher.config.vocab_size)
    assert torch.equal(_logits(reloaded, batch), _logits(result.model, batch))
    tied = teacher.config.tie_word_embeddings
    assert (reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight) == tied
    assert (result.model.get_output_embeddings().weight is result.model.get_input_embeddings().weight) == tied


def test_save_refuses_to_overwrite(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    with pytest.raises(AlambicError, match="already exists and is not empty"):
        save_student(init_student(tiny_llama()).model, bpe_tokenizer(), tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "precious"


def test_student_from_a_spec_keeps_the_teacher_tokenizer(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "teacher")
    bpe_tokenizer().save_pretrained(tmp_path / "teacher")
    result = init_student(str(tmp_path / "teacher"), layers=[0, 3])
    out = save_student(result.model, result.tokenizer, tmp_path / "student")
    assert transformers.AutoConfig.from_pretrained(out).num_hidden_layers == 2
    assert "teacher  LlamaForCausalLM: 4 layers" in result.summary() and "layers kept: 0, 3" in str(result)


@pytest.mark.parametrize(
    "spec, n, expected",
    [
        ("every-other", 12, [0, 2, 4, 7, 9, 11]),  # the first and last layers kept (DistilBERT's choice)
        ("every-other", 5, [0, 2, 4]),
        ("every-other", 6, [0, 3, 5]),
        ("every-other", 30, [0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27, 29]),
        ("even", 12, [0, 2, 4, 6, 8, 10]),
        ("odd", 12, [1, 3, 5, 7, 9, 11]),
        ("linspace:3", 6, [0, 3, 5]),  # 2.5 rounds half up
        ("linspace:6", 12, [0, 2, 4, 7, 9, 11]),  # DistilBERT's choice
        ("linspace:1", 12, [0]),
        ("linspace:12", 12, list(range(12))),
        ("0, 2,4,7,9,11", 12, [0, 2, 4, 7, 9, 11]),
        ([1, 3], 4, [1, 3]),
        ("all", 3, [0, 1, 2]),
    ],
)
def test_layer_specs(spec, n, expected):
    assert parse_layer_spec(spec, n) == expected


def test_every_other_of_30_keeps_15():
    assert len(parse_layer_spec("every-other", 30)) == 15


@pytest.mark.parametrize(
    "spec, message",
    [
        ("0,2,12", "layer 12 is out of range: the teacher has 12 layers, 0-11"),
        ([-1, 2], "layer -1 is out of range"),
        ("0,2,2", "must be strictly increasing, without repeats"),
        ("4,2", "must be strictly increasing"),
        ("", "empty layer spec"),
        ([], "empty layer spec"),
        ("linspace:0", "at least 1 layer"),
        ("linspace:six", "linspace needs a whole number"),
        ("linspace:13", "student deeper than its teacher \\(13 > 12 layers\\)"),
        ("evry-other", "unknown layer spec 'evry-other' \\(did you mean 'every-other'\\?\\)"),
    ],
)
def test_layer_spec_errors(spec, message):
    with pytest.raises(AlambicError, match=message):
        parse_layer_spec(spec, 12)


@pytest.mark.parametrize("build", [tiny_bert, tiny_distilbert, tiny_gpt2, tiny_llama])
def test_narrow_student_has_the_requested_shapes(build):
    result = init_student(build(), layers="every-other", hidden_size=16, intermediate_size=24, num_heads=2,
                          width_init="random")
    config, model = result.model.config, result.model
    assert (modeling.hidden_size(config), modeling.intermediate_size(config), modeling.num_heads(config)) == (16, 24, 2)
    assert model.get_input_embeddings().weight.shape == (config.vocab_size, 16)
    ffn = [p.shape for n, p in model.named_parameters() if p.dim() == 2 and 24 in p.shape]
    assert len(ffn) >= 2 * 2  # in and out projections of each of the 2 layers
    assert _logits(model, _batch(config.vocab_size)).shape == (2, 9, config.vocab_size)
    assert any(note.startswith("freshly initialised (shape differs") for note in result.notes)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_narrow_ffn_only_keeps_attention_and_embeddings():
    teacher = tiny_llama()
    result = init_student(teacher, layers=[0, 2], intermediate_size=16, width_init="random")
    student = result.model
    assert student.model.layers[0].mlp.up_proj.weight.shape == (16, 32)
    assert torch.equal(student.model.layers[1].self_attn.q_proj.weight, teacher.model.layers[2].self_attn.q_proj.weight)
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert "mlp.up_proj" in " ".join(result.notes) and "self_attn" not in " ".join(result.notes)


def test_only_students_with_copied_layers_record_their_source_layers():
    teacher = tiny_llama()
    assert init_student(teacher, layers=[0, 2]).source_layers() == ([0, 2], 4)
    assert init_student(teacher, layers=[0, 2], intermediate_size=16, width_init="random").source_layers() == \
        ([0, 2], 4)  # attention still copied
    fresh = init_student(teacher, layers=[0, 2], hidden_size=16, num_heads=2, width_init="random")
    assert fresh.source_layers() is None and layers_record(fresh.source_layers()) == {}


def test_fewer_heads_keep_the_head_size_and_the_grouping():
    # teacher: 4 heads in 2 key/value groups of 2, head_dim 8: 2 heads keep one whole group
    config = init_student(tiny_llama(), num_heads=2, width_init="random").model.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 1, 8)


def test_narrower_hidden_drops_heads_to_keep_their_size():
    config = init_student(tiny_bert(), hidden_size=16, width_init="random").model.config  # 4 heads of 8
    assert (config.hidden_size, config.num_attention_heads) == (16, 2)


def test_width_must_divide_into_heads():
    with pytest.raises(AlambicError, match="hidden size 30 is not divisible by 4 attention heads: give --num-heads 3, "
                                           r"or a hidden size that is a multiple of the teacher's head size \(8\)"):
        init_student(tiny_bert(), hidden_size=30, width_init="random")


def test_a_narrower_llama_without_heads_keeps_the_head_size_and_heads_times_size_equals_hidden():
    # SmolLM2's case (576 wide, 9 heads of 64 -> 384 wide): the config's own head_dim once kept all 9 heads, and
    # the config refused 384 / 9; now 6 heads of 64 (and 2 key/value groups of 3, as the teacher's 3 of 3)
    teacher = tiny_llama(hidden_size=72, num_attention_heads=9, num_key_value_heads=3, head_dim=8)
    config = init_student(teacher, hidden_size=48, width_init="random").model.config
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (48, 6, 2, 8)
    with pytest.raises(AlambicError, match="hidden size 48 is not divisible by 9 attention heads: give --num-heads 6, "
                                           r"which keeps the teacher's head size \(8\)"):
        init_student(teacher, hidden_size=48, num_heads=9, width_init="random")


@pytest.mark.parametrize("shape, said", [
    (dict(hidden_size=64), "hidden size 64 > 32"), (dict(intermediate_size=100), "FFN size 100 > 64"),
    (dict(num_heads=8), "attention heads 8 > 4"),
])
def test_a_student_wider_than_its_teacher_is_refused_unless_asked_for(shape, said):
    with pytest.raises(AlambicError, match=f"the student would be wider than its teacher \\({said}\\).*--allow-wider"):
        init_student(tiny_llama(), width_init="random", **shape)
    wide = init_student(tiny_llama(), width_init="random", allow_wider=True, **shape).model.config
    assert all(getattr(wide, name) == value for name, value in shape.items() if name != "num_heads")


def test_bare_encoder_teacher_gives_masked_lm_with_fresh_head():
    teacher = transformers.BertModel(tiny_bert().config)  # like MiniLM: encoder + pooler, no MLM head
    result = init_student(teacher)
    student = result.model
    assert type(student) is transformers.BertForMaskedLM
    assert torch.equal(student.bert.embeddings.word_embeddings.weight, teacher.embeddings.word_embeddings.weight)
    assert student.cls.predictions.decoder.weight is student.bert.embeddings.word_embeddings.weight
    notes = " ".join(result.notes)
    assert "BertModel has no LM head" in notes and "cls.predictions.transform.dense" in notes and "pooler" in notes


def test_count_parameters_counts_tied_weights_once():
    model = tiny_llama()
    untied = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert count_parameters(model) == untied - 512 * 32


def test_student_is_float32_whatever_the_teacher_dtype():
    teacher = tiny_llama().to(torch.bfloat16)
    teacher.config.dtype = torch.bfloat16
    student = init_student(teacher).model
    assert student.dtype == torch.float32 and student.config.dtype == torch.float32


def test_seed_makes_fresh_parts_reproducible():
    a = init_student(tiny_bert(), hidden_size=16, seed=3, width_init="random").model
    b = init_student(tiny_bert(), hidden_size=16, seed=3, width_init="random").model
    c = init_student(tiny_bert(), hidden_size=16, seed=4, width_init="random").model
    assert torch.equal(a.bert.encoder.layer[0].output.dense.weight, b.bert.encoder.layer[0].output.dense.weight)
    assert not torch.equal(a.bert.encoder.layer[0].output.dense.weight, c.bert.encoder.layer[0].output.dense.weight)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_other_keeps_the_teachers_first_and_last_layers_in_every_family(family):
    depth = {"gpt2": "n_layer", "distilbert": "n_layers"}.get(family, "num_hidden_layers")
    teacher = FAMILIES[family](**{depth: 5})
    result = init_student(teacher, layers="every-other")
    assert result.layers == [0, 2, 4]
    last_t, last_s = modeling.transformer_layers(teacher)[4], modeling.transformer_layers(result.model)[2]
    for (name, t), (_, s) in zip(last_t.state_dict().items(), last_s.state_dict().items()):
        assert torch.equal(t, s), name
