"""ONNX graphs of encoders (with their task or MLM head) and decoders, and their int8 quantisation.

The graph is traced by torch's exporter (``torch.onnx.export(dynamo=True)``) with the batch and sequence dimensions
dynamic. Inputs are ``input_ids``, ``attention_mask`` and, for models with several token types whose tokenizer
returns them, ``token_type_ids`` (int64); outputs are named as the transformers output fields: ``logits`` (LM, classification, NER),
``start_logits`` / ``end_logits`` (QA) or ``last_hidden_state`` (an encoder without head). Decoders are exported
without a KV cache: the graph scores whole sequences (perplexity, prefill, reranking), it does not generate token by
token.

int8 (ONNX Runtime): ``dynamic`` stores int8 weights (embeddings included) and quantises activations on the fly
(no data needed); ``static`` quantises the matrix products with activation scales fixed on calibration batches (QDQ
format, per-channel weights), and so needs calibration text; embeddings stay float32.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch

from alambic import modeling
from alambic.errors import AlambicError

GRAPH = "model.onnx"
OUTPUTS = {"causal": ("logits",), "masked": ("logits",), "classification": ("logits",), "ner": ("logits",),
           "qa": ("start_logits", "end_logits"), "encoder": ("last_hidden_state",)}
"""The graph's outputs for each head (see :func:`alambic.workflows.export.model_head`)."""
INT8_MODES = ("dynamic", "static")
TESTED_FAMILIES = ("BERT", "RoBERTa", "DistilBERT", "Llama", "Qwen2", "GPT-2")


def input_names(config, tokenizer_inputs=None) -> list[str]:
    """The graph's inputs: ``token_type_ids`` only for a model with several token types whose tokenizer returns
    them (``tokenizer_inputs``: its ``model_input_names``; None: assume it does), so that the saved tokenizer's
    output feeds the graph as it is; without the input the model reads type 0, as transformers does."""
    names = ["input_ids", "attention_mask"]
    types = getattr(modeling._config(config), "type_vocab_size", 0) > 1
    if types and (tokenizer_inputs is None or "token_type_ids" in tokenizer_inputs):
        names.append("token_type_ids")
    return names


class _Signature(torch.nn.Module):
    """Named tensors in, a tuple of the head's outputs back: the graph's signature."""

    def __init__(self, model: torch.nn.Module, outputs: tuple[str, ...], causal: bool):
        super().__init__()
        self.model, self.outputs, self.causal = model, outputs, causal

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        if self.causal:
            kwargs["use_cache"] = False
        output = self.model(**kwargs)
        return tuple(output[name] for name in self.outputs)


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter prints its progress and torchvision's absence; alambic prints one line of its own."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch._export", "torch.export", "onnxscript")]
    loggers.append(logging.getLogger())  # ONNX Runtime's quantiser warns on the root logger
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_graph(model: torch.nn.Module, head: str, example: dict, path: Path) -> None:
    """Trace ``model`` on the ``example`` batch (its ``input_names``) and write the graph, weights inline, to
    ``path``."""
    names = list(example)  # the inputs encode() chose for this model and tokenizer
    args = tuple(example[name] for name in names)
    dynamic = {name: {0: "batch", 1: "sequence"} for name in names}
    signature = _Signature(model.eval(), OUTPUTS[head], causal=head == "causal")
    try:
        with _quiet_exporter(), torch.no_grad():
            torch.onnx.export(signature, args, str(path), input_names=names, output_names=list(OUTPUTS[head]),
                              dynamic_shapes=dynamic, dynamo=True, external_data=False, verbose=False)
    except Exception as error:  # the exporter's own errors are pages long; the first line names the cause
        cause = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise AlambicError(f"torch's ONNX exporter cannot trace this {model.config.model_type} model ({cause}); "
                           f"ONNX export is tested on the {', '.join(TESTED_FAMILIES)} families: use --format "
                           "torch-int8, or --debug for the exporter's traceback") from error


class _Calibration:
    """ONNX Runtime's CalibrationDataReader protocol over tokenised batches."""

    def __init__(self, batches: list[dict]):
        self._batches = iter(batches)

    def get_next(self):
        return next(self._batches, None)


def quantize_int8(source: Path, target: Path, mode: str, calibration: list[dict] | None = None) -> None:
    """int8 ``target`` from the float graph ``source``; ``static`` reads ``calibration`` batches (numpy feeds)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        if mode == "dynamic":
            quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
        else:
            # Matrix products only, uint8 activations with a zero point, scales from the 99.999th percentile:
            # quantising every op (embeddings, norms, residual adds) cost 15 points of BBC accuracy, symmetric
            # int8 activations most of the parity (docs/benchmarks.md)
            quantize_static(str(source), str(target), _Calibration(calibration or []),
                            quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul", "Gemm"],
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                            calibrate_method=CalibrationMethod.Percentile)
