"""Architecture facts alambic needs, in one place, so recipes and student construction stay model-agnostic.

Hugging Face models name the same things differently (``num_hidden_layers`` / ``n_layer`` / ``n_layers``,
``bert.encoder.layer`` / ``transformer.h`` / ``model.layers``); everything that depends on those names lives here.
"""

from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

from alambic.errors import AlambicError

_CONFIG_NAMES = {
    "layers": ("num_hidden_layers", "n_layer", "n_layers", "num_layers"),
    "hidden": ("hidden_size", "n_embd", "dim", "d_model"),
    "ffn": ("intermediate_size", "hidden_dim", "n_inner", "ffn_dim"),
    "heads": ("num_attention_heads", "n_head", "n_heads"),
}
# Where the list of blocks sits inside the base model; anything else falls back to a search by length.
_LAYER_PATHS = ("encoder.layer", "transformer.layer", "layers", "h", "layer", "encoder.layers", "blocks")
# Config fields that make the forward pass transform logits after the head; lm_head() would silently miss them.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _config(config_or_model):
    config = getattr(config_or_model, "config", config_or_model)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _get(config, what: str):
    config = _config(config)
    for name in _CONFIG_NAMES[what]:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def _set(config, what: str, value: int) -> None:
    """Set the attribute the config really stores (not an alias), so ``to_dict()`` and saving see the change."""
    config = _config(config)
    stored = vars(config)
    for name in _CONFIG_NAMES[what]:
        if name in stored:
            setattr(config, name, value)
            return
    setattr(config, _CONFIG_NAMES[what][0], value)


def num_layers(config) -> int:
    value = _get(config, "layers")
    if value is None:
        raise AlambicError(f"{type(_config(config)).__name__} has no layer count alambic knows (num_hidden_layers ...)")
    return int(value)


def set_num_layers(config, n: int) -> None:
    _set(config, "layers", n)


def hidden_size(config) -> int:
    return int(_get(config, "hidden"))


def set_hidden_size(config, n: int) -> None:
    _set(config, "hidden", n)


def intermediate_size(config) -> int:
    """GPT-2 stores ``n_inner=None`` meaning 4 x hidden; callers want the number."""
    value = _get(config, "ffn")
    return int(value) if value is not None else 4 * hidden_size(config)


def set_intermediate_size(config, n: int) -> None:
    _set(config, "ffn", n)


def num_heads(config) -> int:
    return int(_get(config, "heads"))


def set_num_heads(config, n: int) -> None:
    _set(config, "heads", n)


def head_dim(config) -> int:
    """Channels per attention head: the config's own ``head_dim`` (Llama, Qwen2) or hidden / heads."""
    explicit = getattr(_config(config), "head_dim", None)
    return int(explicit) if explicit else hidden_size(config) // num_heads(config)


def num_key_value_heads(config) -> int:
    """Key/value heads (grouped-query attention); the query head count when the model has no grouping."""
    value = getattr(_config(config), "num_key_value_heads", None)
    return int(value) if value else num_heads(config)


def module_name(root: nn.Module, target: nn.Module) -> str:
    """The dotted name of ``target`` inside ``root`` ('' for ``root`` itself)."""
    return next(name for name, module in root.named_modules() if module is target)


def vocab_size(config) -> int:
    return int(_config(config).vocab_size)


def model_kind(config_or_model) -> str:
    """``"causal"`` or ``"masked"``: decides the Auto class, the collator and which positions carry targets.

    The class (or ``architectures``) decides first, because encoder families also have a ``*ForCausalLM`` variant;
    otherwise an encoder family means masked.
    """
    from transformers.models.auto import modeling_auto as auto

    causal = set(auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    masked = set(auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES.values())
    config = _config(config_or_model)
    names = [type(config_or_model).__name__] if isinstance(config_or_model, nn.Module) else []
    names += list(getattr(config, "architectures", None) or [])
    label = names[0] if names else type(config).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise AlambicError(f"{label} is an encoder-decoder model; alambic distils decoder-only and encoder-only ones")
    for name in names:
        if name in causal:
            return "causal"
        if name in masked:
            return "masked"
    if config.model_type in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "masked"
    if config.model_type in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal"
    raise AlambicError(f"{label} is neither a causal nor a masked language model; alambic distils decoder-only "
                       "and encoder-only transformers")


def model_inputs(model: nn.Module, batch: dict) -> dict:
    """The batch's ``input_ids`` and ``attention_mask``, and its ``token_type_ids`` (sentence-pair segments) only for
    models with more than one token type: a student built with one type would index past its table."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if getattr(_config(model), "type_vocab_size", 0) > 1 and batch.get("token_type_ids") is not None:
        inputs["token_type_ids"] = batch["token_type_ids"]
    return inputs


def lm_body(model: nn.Module) -> nn.Module:
    """The base model (``model.bert``, ``model.model`` ...), or the model itself when it is a bare encoder."""
    return model.base_model


def transformer_layers(model: nn.Module) -> nn.ModuleList:
    body, n = lm_body(model), num_layers(model.config)
    for path in _LAYER_PATHS:
        module = body
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    found = [m for m in body.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if len(found) == 1:
        return found[0]
    raise AlambicError(f"cannot find the {n} transformer layers of {type(model).__name__}; alambic does not support it")


def eos_token_ids(tokenizer, model) -> list[int]:
    """Every id that ends an answer, sorted: the tokenizer's end-of-sequence token and the model's (its generation
    config's and its config's; chat models often end a turn with a token other than the tokenizer's EOS)."""
    ids = {tokenizer.eos_token_id}
    for source in (getattr(model, "generation_config", None), getattr(model, "config", model)):
        value = getattr(source, "eos_token_id", None)
        ids.update(value if isinstance(value, (list, tuple)) else [value])
    return sorted(int(i) for i in ids if i is not None)


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s weights sit; the CPU for a model run by another runtime (an export), which has none."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def has_lm_head(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers model with an LM head (not a bare body, nor a model that another runtime
    runs, which has no modules to split)."""
    return getattr(model, "base_model", model) is not model and model.get_output_embeddings() is not None


def lm_head(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The map from hidden rows to logits, so a recipe can project only the rows a loss needs."""
    name = type(model).__name__
    if not has_lm_head(model):
        raise AlambicError(f"{name} has no language-model head: load a masked or causal LM, or give the student one")
    config = _config(model)
    for field in _LOGIT_TRANSFORMS:
        if getattr(config, field, None) not in (None, 1, 1.0):
            raise AlambicError(f"{name} rescales its logits ({field}); alambic's head/body split does not support it")
    if hasattr(model, "vocab_projector") and hasattr(model, "vocab_transform"):  # DistilBERT: four loose modules
        return lambda h: model.vocab_projector(model.vocab_layer_norm(model.activation(model.vocab_transform(h))))
    body = lm_body(model)
    heads = [m for m in model.children() if m is not body and any(True for _ in m.parameters())]
    if len(heads) != 1:
        raise AlambicError(f"cannot tell the LM head of {name} apart from its other parts; alambic does not support it")
    return heads[0]


def split_lm_head(model: nn.Module) -> tuple[Callable[[torch.Tensor], torch.Tensor], nn.Linear]:
    """The LM head as ``(features, projection)`` with ``lm_head(model)(h) == projection(features(h))``: whatever runs
    before the vocabulary projection (BERT's dense + GELU + LayerNorm; nothing for Llama or GPT-2), and the
    projection itself, so a fused loss can run the projection chunk by chunk. Checked once on random rows."""
    head, projection = lm_head(model), model.get_output_embeddings()
    if not isinstance(projection, nn.Linear):
        raise AlambicError(f"the output projection of {type(model).__name__} is a {type(projection).__name__}, not a "
                           "Linear layer; alambic does not support it")
    if head is projection:
        return _identity, projection

    def features(hidden: torch.Tensor) -> torch.Tensor:
        with _bypassed(projection):
            return head(hidden)

    with torch.no_grad():
        weight = projection.weight
        generator = torch.Generator(weight.device).manual_seed(0)  # leaves the global RNG (and resumes) untouched
        probe = torch.randn(2, projection.in_features, generator=generator, device=weight.device).to(weight.dtype)
        if not torch.allclose(projection(features(probe)).float(), head(probe).float(), rtol=1e-2, atol=1e-3):
            raise AlambicError(f"the LM head of {type(model).__name__} does more than a projection after its "
                               "features; alambic's fused vocabulary loss does not support it")
    return features, projection


def _identity(hidden: torch.Tensor) -> torch.Tensor:
    return hidden


@contextmanager
def _bypassed(module: nn.Module):
    """Run ``module`` as the identity (an instance attribute shadows the class's ``forward``)."""
    module.forward = _identity
    try:
        yield
    finally:
        del module.forward


HEAD_AUTO_CLASSES = {
    "causal": "AutoModelForCausalLM", "masked": "AutoModelForMaskedLM", "encoder": "AutoModel",
    "classification": "AutoModelForSequenceClassification", "ner": "AutoModelForTokenClassification",
    "qa": "AutoModelForQuestionAnswering",
}
"""A model's head (a language-model kind, a task, or none) -> the transformers Auto class that builds it."""


def head_auto_class(head: str):
    import transformers

    return getattr(transformers, HEAD_AUTO_CLASSES[head])
