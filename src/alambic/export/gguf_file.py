"""Write a decoder as a GGUF file, the format llama.cpp (and Ollama, LM Studio ...) run.

Weights are mapped to GGUF's tensor names with the ``gguf`` package's own name tables; the layouts follow
llama.cpp's ``convert_hf_to_gguf.py``: Llama's query and key rows are interleaved for its rotary kernel, GPT-2's
``Conv1D`` matrices are transposed to ``(out, in)``. Norms and biases stay float32; every other matrix is stored as
``f32``, ``f16`` or ``q8_0`` (blocks of 32 weights sharing one scale; a matrix whose rows are not a multiple of 32
falls back to f16, as llama.cpp does). A tied output embedding is stored once.

The tokenizer is carried over: copied field by field from the GGUF the teacher came from (so its pre-tokenizer name
and chat template survive), or built from the model's byte-level BPE ``tokenizer.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from alambic import modeling
from alambic.errors import AlambicError

GGUF_TYPES = ("f16", "q8_0", "f32")
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "gpt2": "gpt2"}
"""transformers ``model_type`` -> GGUF architecture name (the decoders this writer maps, tensor by tensor)."""
_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


def check_gguf_model(config) -> str:
    """The GGUF architecture name of ``config``, or one line saying what GGUF export takes."""
    model_type = modeling._config(config).model_type
    if modeling.model_kind(config) != "causal":
        raise AlambicError(f"GGUF is a format for decoders (llama.cpp); this model is a {model_type} encoder: "
                           "export it with --format onnx or onnx-int8")
    if model_type not in ARCHITECTURES:
        raise AlambicError(f"GGUF export takes {', '.join(sorted(ARCHITECTURES))} decoders, not {model_type}: "
                           "use --format onnx for this model")
    heads, size, hidden = modeling.num_heads(config), modeling.head_dim(config), modeling.hidden_size(config)
    if model_type == "qwen2" and heads * size != hidden:
        # llama.cpp's qwen2 graph shapes the query projection hidden x hidden, whatever the file's key_length says
        fix = (f"build the student with --num-heads {hidden // size} (or leave --num-heads out)" if hidden % size == 0
               else f"build the student with a hidden size that is a multiple of {size}")
        raise AlambicError(f"llama.cpp runs qwen2 models whose heads x head size equals the hidden size; this one "
                           f"has {heads} x {size} != {hidden}: {fix}, or export it with --format onnx")
    return ARCHITECTURES[model_type]


def _rope_theta(config) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(theta)


def _add_hyperparameters(writer, config, arch: str) -> None:
    writer.add_block_count(modeling.num_layers(config))
    writer.add_embedding_length(modeling.hidden_size(config))
    writer.add_head_count(modeling.num_heads(config))
    if arch == "gpt2":
        writer.add_context_length(config.n_positions)
        writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        return
    writer.add_context_length(config.max_position_embeddings)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count_kv(modeling.num_key_value_heads(config))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    # llama.cpp takes the head size as n_embd / n_head unless told; a width-pruned student keeps its teacher's
    # head size with fewer heads, so the two differ and the file must say it.
    writer.add_key_length(modeling.head_dim(config))
    writer.add_value_length(modeling.head_dim(config))
    writer.add_rope_dimension_count(modeling.head_dim(config))
    writer.add_vocab_size(modeling.vocab_size(config))


def _interleave_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """HF Llama keeps each head's rotary halves apart; llama.cpp wants their rows interleaved."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def _tensors(model, arch: str):
    """(GGUF name, float32 array) for every weight, in the layout llama.cpp reads."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], modeling.num_layers(config))
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue
        if hf_name.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")):
            continue  # buffers, not weights
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise AlambicError(f"no GGUF name for the tensor {hf_name} of this {config.model_type} model; "
                               "export it with --format onnx")
        data = tensor.detach().float().cpu().numpy()
        if arch == "llama" and name.endswith("attn_q.weight"):
            data = _interleave_rotary(data, modeling.num_heads(config))
        elif arch == "llama" and name.endswith("attn_k.weight"):
            data = _interleave_rotary(data, modeling.num_key_value_heads(config))
        elif arch == "gpt2" and hf_name.endswith(_CONV1D):
            data = data.T
        yield name, np.ascontiguousarray(data)


def _add_tensor(writer, name: str, data: np.ndarray, gguf_type: str) -> None:
    import gguf

    if data.ndim == 1 or gguf_type == "f32":
        writer.add_tensor(name, data.astype(np.float32))
    elif gguf_type == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        qtype = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    else:
        writer.add_tensor(name, data.astype(np.float16))


# --- the tokenizer ------------------------------------------------------------------------------------------------

def gguf_token_list(path: Path) -> list[str]:
    import gguf

    field = gguf.GGUFReader(path).fields.get("tokenizer.ggml.tokens")
    return list(field.contents()) if field is not None else []


def _copy_tokenizer_fields(writer, source: Path) -> None:
    import gguf

    for key, field in gguf.GGUFReader(source).fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub_type)


def check_gguf_tokenizer(tokenizer) -> dict:
    """The tokenizer's model section (``tokenizer.json``), or one line naming its type when GGUF cannot carry it
    (checked before the export encodes any text: such a tokenizer may not even encode the parity texts)."""
    state = json.loads(tokenizer.backend_tokenizer.to_str()) if getattr(tokenizer, "is_fast", False) else {}
    model = state.get("model", {})
    if model.get("type") != "BPE":
        raise AlambicError("GGUF export builds byte-level BPE vocabularies only; this tokenizer is "
                           f"{model.get('type', type(tokenizer).__name__)}: give the teacher's .gguf with "
                           "--tokenizer-from FILE.gguf to carry its vocabulary over, or export with --format onnx")
    return model


def _bpe_tokenizer_fields(writer, tokenizer, rows: int) -> None:
    """llama.cpp's byte-level BPE vocabulary ("gpt2" model) from a fast tokenizer, as convert_hf_to_gguf writes it."""
    import gguf

    model = check_gguf_tokenizer(tokenizer)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    special = set(tokenizer.all_special_ids)
    added = set(tokenizer.get_added_vocab().values())
    tokens, types = [], []
    for i in range(rows):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        types.append(gguf.TokenType.CONTROL if i in special else
                     gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for token_id, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                          ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(tokenizer, token_id, None)
        if value is not None:
            add(value)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


# --- the file -----------------------------------------------------------------------------------------------------

def write_gguf(model: torch.nn.Module, tokenizer, path: Path, gguf_type: str = "f16", *,
               tokenizer_source: Path | None = None, name: str = "alambic student") -> None:
    """Write ``model`` (a Llama, Qwen2 or GPT-2 causal LM) to ``path``. ``tokenizer_source``: a .gguf whose
    tokenizer fields are copied (its token list must be the model's); else the vocabulary is built from
    ``tokenizer``."""
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise AlambicError(f"unknown GGUF type {gguf_type!r}; use one of: {', '.join(GGUF_TYPES)}")
    arch = check_gguf_model(model.config)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    _add_hyperparameters(writer, model.config, arch)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if tokenizer_source is not None:
        _copy_tokenizer_fields(writer, tokenizer_source)
    else:
        _bpe_tokenizer_fields(writer, tokenizer, modeling.vocab_size(model.config))
    for tensor_name, data in _tensors(model, arch):
        _add_tensor(writer, tensor_name, data, gguf_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
