"""An export folder, and the exported model loaded in the runtime it is for.

An export folder (written by ``alambic export``) holds the exported file(s), the model's ``config.json`` and
tokenizer, and ``alambic-export.json``: the format, the head, the source model's parameter counts and the parity
measured against PyTorch. :func:`load_exported` returns a module called like a transformers model
(``model(input_ids=..., attention_mask=...)`` -> an object with ``.logits`` or ``.start_logits`` / ``.end_logits``),
with ``.config``, ``.runtime``, ``.precision`` and ``.exported`` (True), so evaluation and timing run on it
unchanged (evaluation reads the full logits of an exported model rather than splitting off its head):

- ONNX graphs run in ONNX Runtime (CPU, as many threads as torch uses);
- ``model-int8.pt`` runs in PyTorch with its int8 linear layers;
- a ``.gguf`` file runs in llama.cpp when ``llama-cpp-python`` is installed, else it is read back by transformers
  (dequantised to float32: the quality is the file's, the speed is PyTorch's, and the report says so). On a CPU
  with AMX, llama.cpp loads the weights in plain CPU buffers: its AMX weight buffers crash its matmul there
  (ggml-org/llama.cpp#20824; every q8_0 file, SmolLM2's included, segfaulted with llama-cpp-python 0.3.36).
  Its model also answers chat prompts greedily in llama.cpp (``answer_greedily``, llama.cpp's own key-value cache),
  which is how chat evaluation generates with a model no transformers cache fits.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from alambic.errors import AlambicError
from alambic.modeling import head_auto_class

MANIFEST = "alambic-export.json"


def export_folder(spec) -> Path | None:
    """The export folder ``spec`` names (the folder itself or a file in it), or None when it is not one."""
    path = Path(str(spec)).expanduser()
    folder = path if path.is_dir() else path.parent if path.is_file() else None
    return folder if folder is not None and (folder / MANIFEST).is_file() else None


def resolve_measured_path(spec) -> Path:
    """The folder of a model to evaluate or measure: an export folder as it is, anything else as
    :func:`alambic.teachers.resolve_model_path` resolves it."""
    from alambic.teachers import resolve_model_path

    return export_folder(spec) or resolve_model_path(spec)


def read_manifest(folder: Path) -> dict:
    file = Path(folder) / MANIFEST
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
        missing = [name for name in manifest["files"] if not (Path(folder) / name).is_file()]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise AlambicError(f"{file} is not a readable export manifest ({error}); export the model again") from None
    if missing:
        raise AlambicError(f"{folder} lacks {missing[0]}, which its {MANIFEST} lists; export the model again")
    return manifest


def exported_bytes(folder: Path, manifest: dict) -> int:
    """Bytes of the exported model file(s): what a deployment ships (config and tokenizer files aside)."""
    return sum((Path(folder) / name).stat().st_size for name in manifest["files"])


def _outputs(named: dict[str, np.ndarray]) -> SimpleNamespace:
    return SimpleNamespace(**{name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in named.items()})


class OnnxModel(torch.nn.Module):
    """An ONNX graph in an ONNX Runtime CPU session."""

    runtime, exported = "onnxruntime", True

    def __init__(self, graph: Path, config, outputs: list[str], precision: str):
        import onnxruntime

        super().__init__()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the same share of the machine as PyTorch's rows
        options.log_severity_level = 3
        self.session = onnxruntime.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.outputs, self.config, self.precision = outputs, config, precision

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, **_):
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask if attention_mask is not None
                 else torch.ones_like(input_ids)}
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
        feeds = {name: feeds[name].cpu().numpy().astype(np.int64) for name in self.input_names}
        return _outputs(dict(zip(self.outputs, self.session.run(self.outputs, feeds))))


class LlamaCppModel(torch.nn.Module):
    """A GGUF file in llama.cpp: each row's real tokens are evaluated as one sequence and its logits placed back at
    their positions (padding positions get zeros). An f32 file keeps its keys and values in float32 too: llama.cpp's
    default float16 cache put a float32 export of a student with large activations 0.3% of the logits' scale from
    PyTorch (float32 cache: 3e-6 of it), so the float32 file would not be the exact reference it is exported to be;
    other files run with llama.cpp's default cache, as deployed."""

    runtime, exported = "llama.cpp", True

    def __init__(self, file: Path, config, precision: str, context: int = 2048):
        from llama_cpp import GGML_TYPE_F32, Llama

        super().__init__()
        cache = dict(type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32) if precision == "f32" else {}
        with _plain_weight_buffers_on_amx():
            self.llm = Llama(model_path=str(file), n_ctx=context, n_batch=context, logits_all=True, verbose=False,
                             n_threads=torch.get_num_threads(), **cache)
        self.config, self.precision, self.outputs = config, precision, ["logits"]

    def forward(self, input_ids, attention_mask=None, **_):
        batch, length = input_ids.shape
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        logits = np.zeros((batch, length, self.llm.n_vocab()), dtype=np.float32)
        for row in range(batch):
            positions = mask[row].nonzero().flatten().tolist()
            if not positions:
                continue
            self.llm.reset()
            self.llm.eval(input_ids[row, positions].tolist())
            logits[row, positions] = np.asarray(self.llm.scores[:len(positions)], dtype=np.float32)
        return _outputs({"logits": logits})

    def answer_greedily(self, prompt: list[int], max_new_tokens: int, eos_token_ids: list[int]) -> list[int]:
        """The greedy answer to one prompt, each new token evaluated against the keys and values llama.cpp kept of
        everything before it; the end-of-turn id is included when produced."""
        self.llm.reset()
        self.llm.eval(prompt)
        answer: list[int] = []
        while len(answer) < max_new_tokens:
            answer.append(int(np.argmax(self.llm.scores[self.llm.n_tokens - 1])))
            if answer[-1] in eos_token_ids:
                break
            self.llm.eval(answer[-1:])
        return answer


@contextlib.contextmanager
def _plain_weight_buffers_on_amx():
    """While llama-cpp-python loads a model on a CPU with AMX: ``use_extra_bufts=False`` (no AMX or repacked weight
    buffers). Its ``Llama`` takes no such argument, so the default model parameters it starts from are wrapped for
    the load and restored after."""
    import llama_cpp

    if (b"AMX_INT8 = 1" not in llama_cpp.llama_print_system_info()
            or "use_extra_bufts" not in dict(llama_cpp.llama_model_params._fields_)):
        yield
        return
    bindings = llama_cpp.llama.llama_cpp  # the module whose defaults Llama.__init__ reads
    defaults = bindings.llama_model_default_params

    def plain_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    bindings.llama_model_default_params = plain_buffers
    try:
        yield
    finally:
        bindings.llama_model_default_params = defaults


def gguf_round_trip(folder: Path, manifest: dict) -> torch.nn.Module:
    """A GGUF export read back by transformers (``gguf_file=``, dequantised to float32)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from alambic.teachers import _quiet_transformers

    with _quiet_transformers():
        config = AutoConfig.from_pretrained(folder, gguf_file=manifest["files"][0])
        if config.model_type == "gpt2":  # transformers reads gpt2.context_length into n_ctx only, not n_positions
            config.n_positions = config.n_ctx
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=manifest["files"][0], config=config,
                                                     dtype=torch.float32)
    model.runtime, model.precision = "transformers", f"{manifest['precision']} dequantised to float32"
    model.exported = True
    return model.eval().requires_grad_(False)


def _has_llama_cpp() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:  # not installed, or installed without its dependencies
        return False
    return True


def load_exported(folder: Path, manifest: dict | None = None) -> torch.nn.Module:
    """The model of export folder ``folder`` in its runtime (see the module doc)."""
    from transformers import AutoConfig

    manifest = manifest or read_manifest(folder)
    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    file = folder / manifest["files"][0]
    fmt, precision = manifest["format"], manifest["precision"]
    if fmt.startswith("onnx"):
        return OnnxModel(file, config, manifest["outputs"], precision)
    if fmt == "torch-int8":
        from alambic.export import torch_int8

        model = torch_int8.load(folder, head_auto_class(manifest["head"]))
    elif fmt == "gguf" and _has_llama_cpp():
        from alambic.evaluation.speed import max_positions

        return LlamaCppModel(file, config, precision, context=min(2048, max_positions(config) or 2048))
    elif fmt == "gguf":
        return gguf_round_trip(folder, manifest)
    else:
        raise AlambicError(f"{folder}: unknown export format {fmt!r} in {MANIFEST}; export the model again")
    model.runtime, model.precision, model.exported = "torch", precision, True
    return model.requires_grad_(False)
