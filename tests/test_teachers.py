import os

import pytest
import torch
import transformers
from tiny import bpe_tokenizer, tiny_bert, tiny_llama, tiny_qwen2, wordpiece_tokenizer

from alambic import modeling
from alambic.errors import AlambicError
from alambic.teachers import check_same_vocabulary, load_model, load_teacher, resolve_model_path


def _save(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_resolve_local_folder(tmp_path):
    folder = _save(tiny_llama(), bpe_tokenizer(), tmp_path / "llama")
    assert resolve_model_path(str(folder)) == folder


def test_resolve_refuses_what_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(AlambicError, match="is a folder but not a Hugging Face model \\(no config.json\\)"):
        resolve_model_path(tmp_path)
    with pytest.raises(AlambicError, match="is a file but not a .gguf model"):
        resolve_model_path(tmp_path / "notes.txt")
    with pytest.raises(AlambicError, match="no such file or folder: .*missing"):
        resolve_model_path(str(tmp_path / "missing"))


def test_unreadable_models_are_named(tmp_path):
    _save(tiny_llama(), bpe_tokenizer(), tmp_path / "odd")
    (tmp_path / "odd" / "config.json").write_text('{"model_type": "nosuch"}')
    with pytest.raises(AlambicError, match="config.json is not one this transformers can read"):
        load_model(tmp_path / "odd")
    _save(tiny_llama(), bpe_tokenizer(), tmp_path / "llama")
    with pytest.raises(AlambicError, match="\\(llama\\) cannot load as a masked LM"):
        load_model(tmp_path / "llama", kind="masked")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(AlambicError, match="cannot read .*junk.gguf as a causal LM"):
        resolve_model_path(tmp_path / "junk.gguf")


def test_unknown_name_hints_the_packaged_one():
    with pytest.raises(AlambicError) as err:
        resolve_model_path("smolm2")
    assert str(err.value) == (
        "unknown teacher 'smolm2' (did you mean 'smollm2-135m'?); give a local model folder, a .gguf file, "
        "or one of: smollm2-135m, minilm-l6"
    )


def test_load_masked_with_head_and_frozen_teacher(tmp_path):
    bert = tiny_bert()
    folder = _save(bert, wordpiece_tokenizer(), tmp_path / "bert")
    teacher, tokenizer = load_teacher(str(folder))
    assert type(teacher) is transformers.BertForMaskedLM and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    ids = torch.tensor([tokenizer("Shares rose on Monday.")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(teacher(input_ids=ids).logits, bert(input_ids=ids).logits)
    student, _ = load_model(str(folder), for_training=True)
    assert student.training and all(p.requires_grad for p in student.parameters())


def test_encoder_without_mlm_head_loads_bare(tmp_path):
    folder = _save(transformers.BertModel(tiny_bert().config), wordpiece_tokenizer(), tmp_path / "bare")
    model, _ = load_model(folder)
    assert type(model) is transformers.BertModel and not modeling.has_lm_head(model)


def test_causal_without_head_is_refused(tmp_path):
    folder = _save(tiny_qwen2().model, bpe_tokenizer(), tmp_path / "body")  # untied: lm_head.weight is nowhere
    with pytest.raises(AlambicError, match="no trained LM head"):
        load_model(folder)


def test_bad_dtype_is_named(tmp_path):
    folder = _save(tiny_llama(), bpe_tokenizer(), tmp_path / "llama")
    with pytest.raises(AlambicError, match="unknown dtype 'bfloat61' \\(did you mean 'bfloat16'\\?\\)"):
        load_model(folder, dtype="bfloat61")
    model, _ = load_model(folder, dtype="bfloat16")
    assert model.dtype == torch.bfloat16


def test_vocabulary_checks():
    wp, bpe = wordpiece_tokenizer(), bpe_tokenizer()
    bert, llama = tiny_bert().config, tiny_llama().config
    check_same_vocabulary(wp, wp, bert, bert)
    with pytest.raises(AlambicError) as err:
        check_same_vocabulary(wp, bpe, bert, llama)
    assert str(err.value).startswith("student tokenizer (vocab 512) does not match the teacher's (vocab 30522)")
    assert "alambic init-student --teacher" in str(err.value)

    vocab = bpe.get_vocab()  # same size, two ids swapped
    a, b = sorted(vocab, key=vocab.get)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    swapped = transformers.PreTrainedTokenizerFast(
        tokenizer_object=_with_vocab(bpe, vocab), pad_token="<pad>", unk_token="<unk>"
    )
    with pytest.raises(AlambicError, match="maps tokens to other ids"):
        check_same_vocabulary(bpe, swapped, llama, llama)

    with pytest.raises(AlambicError, match="tokenizer has 512 tokens but its embedding only 300 rows"):
        check_same_vocabulary(bpe, bpe, llama, tiny_llama(vocab_size=300).config)
    with pytest.raises(AlambicError, match="teacher logits have 576 columns but the student's 512"):
        check_same_vocabulary(bpe, bpe, tiny_llama(vocab_size=576).config, llama)  # padded teacher embedding


def _with_vocab(tokenizer, vocab):
    import json

    from tokenizers import Tokenizer

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    state["model"]["vocab"] = vocab
    return Tokenizer.from_str(json.dumps(state))


@pytest.mark.real_model
def test_packaged_minilm_is_a_bare_encoder():
    path = resolve_model_path("minilm-l6")
    assert (path / "config.json").is_file()
    model, tokenizer = load_teacher("minilm-l6")
    assert type(model) is transformers.BertModel and not modeling.has_lm_head(model)
    assert modeling.num_layers(model.config) == 6 and len(tokenizer) == 30522


@pytest.mark.real_model
def test_gguf_converts_once_and_builds_a_15_layer_student(capsys):
    from alambic.students import init_student

    first = resolve_model_path("smollm2-135m")
    assert "converting SmolLM2-135M-Instruct.Q4_1.gguf" in capsys.readouterr().out
    stamp = os.stat(first / "model.safetensors").st_mtime_ns
    second = resolve_model_path("smollm2-135m")
    assert second == first and "converting" not in capsys.readouterr().out
    assert os.stat(second / "model.safetensors").st_mtime_ns == stamp

    result = init_student(str(second))  # loads the converted teacher itself
    assert result.teacher_class == "LlamaForCausalLM" and result.teacher_layers == 30
    assert result.layers == [0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27, 29] and modeling.num_layers(result.model.config) == 15
    assert len(result.tokenizer) == 49152 and result.copied_parameters == result.student_parameters
    model = result.model
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
