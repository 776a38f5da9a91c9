"""``alambic export``: a model (or run) folder to the file its runtime loads, checked against PyTorch on real text.

Every format writes the same folder layout (see :mod:`alambic.export.runtime`): the exported file(s), the model's
``config.json`` and tokenizer, and ``alambic-export.json``. The folder is written atomically, and only once the
exported model has been loaded back in its runtime and its outputs compared with PyTorch's on the parity texts
(``--calibration-data``, else :data:`SAMPLE_TEXTS`; static int8 is checked on texts it was not calibrated on): the
largest absolute difference on real (non-pad) positions, the share of positions whose top prediction agrees and the
mean KL are printed and kept in the manifest. An export outside its format's bound (:data:`FLOAT_BOUND`) is refused.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import torch

from alambic import __version__, modeling
from alambic.cache import atomic_directory
from alambic.errors import AlambicError, did_you_mean
from alambic.export import onnx_graph, torch_int8
from alambic.export.gguf_file import GGUF_TYPES, check_gguf_model, check_gguf_tokenizer, gguf_token_list, write_gguf
from alambic.export.runtime import MANIFEST, gguf_round_trip, load_exported

FORMATS = ("onnx", "onnx-int8", "torch-int8", "gguf")
SAMPLE_TEXTS = (
    "The central bank raised interest rates by a quarter of a point on Tuesday, saying that inflation had stayed "
    "above its target for longer than expected.",
    "Shares in the carmaker fell 4% after it cut its sales forecast for the year.",
    "The striker scored twice in the second half as the home side came from behind to win 3-2.",
    "Researchers say the new chip uses a tenth of the power of its predecessor while running the same software.",
    "Ministers will publish the bill next month, and MPs are expected to vote on it before the summer recess.",
    "The film, shot over six weeks in Glasgow, opens in cinemas across the country on Friday.",
)
"""Parity texts when no --calibration-data is given: short news sentences of different lengths (so padding is
exercised)."""
PARITY_TEXTS = 16
CALIBRATION_TEXTS = 32
FLOAT_BOUND = {"max_relative_diff": 1e-3}
HALF_BOUND = {"max_relative_diff": 2e-2, "min_top1_agreement": 0.98}
INT8_BOUND = {"min_top1_agreement": 0.9, "max_mean_kl": 0.05}
"""What an export must meet against PyTorch on the parity texts, by precision: float32 graphs agree to round-off
(|diff| <= 1e-3 of the largest output, or of 1 for outputs below 1), f16 weights to 2%, with the same top prediction
almost everywhere; int8 and q8_0 change outputs by design, so they are held to their predictions: >= 90% top-1
agreement and a mean KL(PyTorch || export) <= 0.05 nats over the rows of each output's softmax. Top-1 agreement is
counted on the rows whose top prediction is clear (:data:`CLEAR_MARGIN`): where two outputs tie, which one wins is
noise in any precision, and the KL bound already covers those rows."""
ENCODER_INT8_BOUND = {"max_relative_diff": 0.1}
"""int8 hidden states (an encoder exported without head): within 10% of the largest output."""
CLEAR_MARGIN = 1.0
"""A row's top prediction is clear when its top output exceeds the runner-up by this much (in logits: e times as
probable)."""


def check_request(fmt: str, out: Path, *, gguf_type: str, int8: str, calibration_data) -> None:
    """Everything that needs no model: the format, its options, the output folder."""
    if fmt not in FORMATS:
        raise AlambicError(f"unknown export format {fmt!r}{did_you_mean(fmt, FORMATS)}; use one of: "
                           f"{', '.join(FORMATS)}")
    if gguf_type != "f16" and fmt != "gguf":
        raise AlambicError(f"--gguf-type only applies to --format gguf; drop it for --format {fmt}")
    if gguf_type not in GGUF_TYPES:
        raise AlambicError(f"unknown GGUF type {gguf_type!r}; use one of: {', '.join(GGUF_TYPES)}")
    if int8 != "dynamic" and fmt != "onnx-int8":
        raise AlambicError(f"--int8 only applies to --format onnx-int8; drop it for --format {fmt}")
    if int8 not in onnx_graph.INT8_MODES:
        raise AlambicError(f"unknown --int8 mode {int8!r}; use one of: {', '.join(onnx_graph.INT8_MODES)}")
    if fmt == "onnx-int8" and int8 == "static" and not calibration_data:
        raise AlambicError("--int8 static fixes activation scales on calibration text: add --calibration-data PATH "
                           "(a few dozen documents of your data), or use --int8 dynamic, which needs none")
    if out.exists():
        raise AlambicError(f"--out {out} already exists; remove it or choose another folder (an export never "
                           "overwrites)")
    if fmt.startswith("onnx"):
        import importlib.util

        if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnxscript") is None:
            raise AlambicError(f"--format {fmt} needs ONNX Runtime and torch's ONNX exporter: "
                               "pip install 'alambic[onnx]'")


def model_head(model: torch.nn.Module) -> str:
    """What the exported graph outputs: a task (classification, ner, qa), an LM (causal, masked), or the hidden
    states of an encoder without head."""
    from alambic.tasks.models import head_task

    task = head_task(model)
    if task is not None:
        return task
    return modeling.model_kind(model) if modeling.has_lm_head(model) else "encoder"


def _load(spec):
    from transformers import AutoConfig

    from alambic.tasks.models import head_task, load_task_model
    from alambic.teachers import load_model, resolve_model_path

    path = resolve_model_path(spec)
    config = AutoConfig.from_pretrained(path)
    task = head_task(config)
    if task is not None:
        model, tokenizer, _ = load_task_model(spec, task, need_head=True)
        return path, model.eval().requires_grad_(False), tokenizer
    model, tokenizer = load_model(spec)
    return path, model, tokenizer


def _texts(calibration_data, count: int) -> list[str]:
    if not calibration_data:
        return list(SAMPLE_TEXTS)
    from alambic.data.sources import read_documents

    texts = read_documents(list(calibration_data), split_documents="blank-line")[:count]  # paragraphs: many texts
    if not texts:
        raise AlambicError(f"--calibration-data {' '.join(calibration_data)} holds no text")
    return texts


def encode(tokenizer, model, texts: list[str], max_length: int, full_length: bool = False) -> dict:
    """A right-padded batch of ``texts`` with the inputs the graph takes; ``full_length`` pads to ``max_length``
    (static calibration collects activation histograms of one shape)."""
    pad = tokenizer.pad_token is None
    side = tokenizer.padding_side
    if pad:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    try:
        batch = tokenizer(texts, padding="max_length" if full_length else True, truncation=True,
                          max_length=max_length, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
        if pad:
            tokenizer.pad_token = None
    batch = dict(batch)
    return {name: batch[name] for name in onnx_graph.input_names(model.config, tokenizer.model_input_names)
            if name in batch}


def _outputs(model, batch: dict, head: str) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        output = model(**batch)
    return {name: getattr(output, name).float() for name in onnx_graph.OUTPUTS[head]}


def parity(reference: dict[str, torch.Tensor], exported: dict[str, torch.Tensor], mask: torch.Tensor) -> dict:
    """The largest |difference| over real positions, the reference's largest |value|, and the share of real rows
    whose top prediction (argmax over the last dimension; over positions for QA) agrees."""
    worst, scale, agree, rows, kl_sum, clear, clear_agree = 0.0, 0.0, 0, 0, 0.0, 0, 0
    finite = True
    for name, ref in reference.items():
        got = exported[name].float()
        finite &= bool(torch.isfinite(got[mask.bool()] if got.shape[:2] == mask.shape else got).all())
        if ref.dim() == 1 + mask.dim() and ref.shape[:2] == mask.shape:  # per token: keep real positions
            ref, got = ref[mask.bool()], got[mask.bool()]
        elif ref.shape == mask.shape:  # QA start / end logits: pads are not candidates
            ref, got = ref.masked_fill(~mask.bool(), -1e4), got.masked_fill(~mask.bool(), -1e4)
        worst = max(worst, float((ref - got).abs().max()))
        scale = max(scale, float(ref.abs().max()))
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        rows += ref.argmax(-1).numel()
        log_p, log_q = ref.float().log_softmax(-1), got.log_softmax(-1)
        kl_sum += float((log_p.exp() * (log_p - log_q)).sum(-1).sum())
        top2 = ref.topk(min(2, ref.shape[-1]), dim=-1).values
        decided = (top2[..., 0] - top2[..., -1]) >= CLEAR_MARGIN
        clear += int(decided.sum())
        clear_agree += int(((ref.argmax(-1) == got.argmax(-1)) & decided).sum())
    return {"max_abs_diff": worst, "max_abs_reference": scale, "top1_agreement": agree / max(rows, 1),
            "clear_rows": clear, "clear_top1_agreement": clear_agree / clear if clear else 1.0,
            "mean_kl": kl_sum / max(rows, 1), "rows": rows, "finite": finite}


def parity_bound(manifest: dict) -> dict:
    """The bound an export is held to (see :data:`FLOAT_BOUND`)."""
    if manifest["format"] in ("onnx-int8", "torch-int8") or manifest.get("gguf_type") == "q8_0":
        # hidden states have no softmax or top prediction: an encoder without head is held to their difference
        return ENCODER_INT8_BOUND if manifest["head"] == "encoder" else INT8_BOUND
    return HALF_BOUND if manifest.get("gguf_type") == "f16" else FLOAT_BOUND


def parity_failures(result: dict, bound: dict) -> list[str]:
    """How ``result`` (from :func:`parity`) misses ``bound``, in words; empty when it meets it."""
    failures = []
    if not result.get("finite", True):
        return ["outputs that are not finite (NaN or infinite)"]
    relative = result["max_abs_diff"] / max(1.0, result["max_abs_reference"])
    if relative > bound.get("max_relative_diff", float("inf")):
        failures.append(f"max |diff| {result['max_abs_diff']:.3g} is {relative:.2g} of the outputs' scale "
                        f"(bound {bound['max_relative_diff']:g})")
    if result["clear_top1_agreement"] < bound.get("min_top1_agreement", 0.0):
        failures.append(f"top-1 agreement {100 * result['clear_top1_agreement']:.1f}% on the {result['clear_rows']} "
                        f"rows with a clear top prediction (bound {100 * bound['min_top1_agreement']:g}%)")
    if result["mean_kl"] > bound.get("max_mean_kl", float("inf")):
        failures.append(f"mean KL {result['mean_kl']:.3g} (bound {bound['max_mean_kl']:g})")
    return failures


def _tokenizer_source(model, tokenizer, tokenizer_from) -> Path | None:
    """The .gguf whose tokenizer fields the GGUF export copies: ``--tokenizer-from``, else a packaged GGUF teacher
    with exactly the model's vocabulary, else None (built from the tokenizer)."""
    from alambic.teachers import PACKAGED_TEACHERS, _packaged_path

    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    tokens = [t for t, _ in vocab]
    if tokenizer_from is not None:
        path = _packaged_path(tokenizer_from) if tokenizer_from in PACKAGED_TEACHERS else Path(tokenizer_from)
        if not path.is_file() or path.suffix.lower() != ".gguf":
            raise AlambicError(f"--tokenizer-from {tokenizer_from} is not a .gguf file; give the teacher's .gguf")
        if gguf_token_list(path)[:len(tokens)] != tokens:
            raise AlambicError(f"--tokenizer-from {path}: its vocabulary is not the model's; give the .gguf of the "
                               "teacher the student was distilled from")
        return path
    for name, (_, relative, _) in PACKAGED_TEACHERS.items():
        if relative.endswith(".gguf"):
            try:
                path = _packaged_path(name)
            except AlambicError:
                continue
            if gguf_token_list(path)[:len(tokens)] == tokens:
                return path
    return None


def export(model_spec, fmt: str, out, *, gguf_type: str = "f16", int8: str = "dynamic", calibration_data=None,
           tokenizer_from=None, max_length: int = 128, allow_disagreement: bool = False, log=print) -> dict:
    """Export ``model_spec`` (a model folder, run folder, .gguf or packaged name) as ``fmt`` into the new folder
    ``out``; returns the manifest written there. An export outside its parity bound (:func:`parity_bound`) is not
    written unless ``allow_disagreement``, and is then marked in the manifest."""
    out = Path(out)
    check_request(fmt, out, gguf_type=gguf_type, int8=int8, calibration_data=calibration_data)
    from transformers import AutoConfig

    from alambic.evaluation.report import parameter_counts
    from alambic.teachers import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(model_spec))
    if fmt == "gguf":
        check_gguf_model(config)  # an encoder is refused before its weights load
    texts = _texts(calibration_data, PARITY_TEXTS + CALIBRATION_TEXTS)
    calibration_texts, parity_texts = [], texts[:PARITY_TEXTS]
    if fmt == "onnx-int8" and int8 == "static":
        # checked on texts it was not calibrated on: the last ones (else the built-in sentences)
        calibration_texts = texts[:CALIBRATION_TEXTS]
        parity_texts = texts[CALIBRATION_TEXTS:CALIBRATION_TEXTS + PARITY_TEXTS] or list(SAMPLE_TEXTS)
    path, model, tokenizer = _load(model_spec)
    source = None
    if fmt == "gguf":
        source = _tokenizer_source(model, tokenizer, tokenizer_from)
        if source is None:
            check_gguf_tokenizer(tokenizer)
    head = model_head(model)
    batch = encode(tokenizer, model, parity_texts, max_length)
    reference = _outputs(model, batch, head)
    manifest = {"format": fmt, "head": head, "source": str(model_spec), "source_path": str(path),
                "architecture": type(model).__name__, "parameters": parameter_counts(model),
                "outputs": list(onnx_graph.OUTPUTS[head]), "max_length": max_length, "alambic": __version__,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    log(f"exporting {path} ({type(model).__name__}, head: {head}) as {fmt}")
    with atomic_directory(out) as tmp:
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if fmt.startswith("onnx"):
            onnx_graph.export_graph(model, head, batch, tmp / onnx_graph.GRAPH)
            manifest.update(files=[onnx_graph.GRAPH], precision="float32", runtime="onnxruntime")
            if fmt == "onnx-int8":
                float_graph = tmp / "model-float32.onnx"
                (tmp / onnx_graph.GRAPH).rename(float_graph)
                calibration = None
                if int8 == "static":
                    calibration = [{k: v.numpy() for k, v in encode(tokenizer, model, calibration_texts[i:i + 8],
                                                                    max_length, full_length=True).items()}
                                   for i in range(0, len(calibration_texts), 8)]
                onnx_graph.quantize_int8(float_graph, tmp / onnx_graph.GRAPH, int8, calibration)
                float_graph.unlink()
                manifest.update(precision=f"int8 {int8}", int8=int8,
                                calibration=list(calibration_data or []) if int8 == "static" else None)
        elif fmt == "torch-int8":
            torch_int8.save(torch_int8.quantize(model), tmp)
            manifest.update(files=[torch_int8.WEIGHTS], precision="int8 dynamic", runtime="torch")
        else:
            name = f"model-{gguf_type}.gguf"
            write_gguf(model, tokenizer, tmp / name, gguf_type, tokenizer_source=source,
                       name=Path(str(model_spec)).name)
            manifest.update(files=[name], precision=gguf_type, gguf_type=gguf_type,
                            tokenizer_from=str(source) if source else "the model's tokenizer.json",
                            runtime="llama.cpp")
        manifest["parity"] = _check_parity(tmp, manifest, reference, batch, head, log)
        manifest["parity_bound"] = parity_bound(manifest)
        failures = [f"{failure} in {result['runtime']}" for result in manifest["parity"]
                    for failure in parity_failures(result, manifest["parity_bound"])]
        if failures and not allow_disagreement:
            raise AlambicError(f"the {fmt} export disagrees with PyTorch beyond its bound ({'; '.join(failures)}), "
                               f"so {out} was not written; --allow-disagreement writes it anyway, marked in {MANIFEST}")
        if failures:
            manifest["parity_outside_bound"] = failures
            log(f"warning: written although outside its parity bound: {'; '.join(failures)}")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    log(f"written to {out}")
    return manifest


def _check_parity(folder: Path, manifest: dict, reference, batch, head: str, log) -> list[dict]:
    """Load the export back in each runtime that can run it here and compare with PyTorch."""
    loaded = [load_exported(folder, manifest)]
    if manifest["format"] == "gguf" and loaded[0].runtime != "transformers":  # the transformers round trip too
        loaded.append(gguf_round_trip(folder, manifest))
    results = []
    for model in loaded:
        exported = _outputs(model, batch, head)
        result = {"runtime": model.runtime, **parity(reference, exported, batch["attention_mask"]),
                  "texts": len(batch["input_ids"]), "tokens": int(batch["attention_mask"].sum())}
        log(f"parity with PyTorch ({model.runtime}, {result['tokens']} tokens of {result['texts']} texts): max |diff| "
            f"{result['max_abs_diff']:.3g} (outputs up to {result['max_abs_reference']:.3g}), top-1 agreement "
            f"{100 * result['top1_agreement']:.1f}%, mean KL {result['mean_kl']:.2g}")
        results.append(result)
    return results
