"""The ``alambic export`` verb."""

from __future__ import annotations

from alambic.export.gguf_file import GGUF_TYPES
from alambic.export.onnx_graph import INT8_MODES
from alambic.workflows.export import FORMATS

MODEL_HELP = "a model folder or run folder (its best model, else its student), a .gguf file or a packaged name"


def add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a model to ONNX (float or int8), PyTorch int8 or GGUF (llama.cpp), checked against PyTorch",
        description="Export a model for the runtime it will be deployed on: onnx (encoders with their task or MLM head, "
        "and decoders, for ONNX Runtime), onnx-int8 (the same graph quantised by ONNX Runtime), torch-int8 (dynamic "
        "int8 linear layers for PyTorch on CPU) or gguf (Llama, Qwen2 and GPT-2 decoders for llama.cpp, f16 / q8_0). "
        "OUT gets the exported file, config.json, the tokenizer and alambic-export.json; the export is loaded back "
        "and compared with PyTorch on real text before the folder appears. `alambic report` measures OUT like any "
        "model.",
    )
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    p.add_argument("--out", required=True, help="folder to create (never overwritten)")
    p.add_argument("--gguf-type", default="f16", choices=GGUF_TYPES,
                   help="--format gguf: weight type of the matrices (default f16; norms stay f32)")
    p.add_argument("--int8", default="dynamic", choices=INT8_MODES,
                   help="--format onnx-int8: dynamic (default, activation scales computed on the fly) or static "
                   "(scales fixed on --calibration-data)")
    p.add_argument("--calibration-data", nargs="+", metavar="PATH",
                   help="text for static int8 calibration and for the parity check (default: built-in news "
                   "sentences): files, folders, globs or packaged corpora")
    p.add_argument("--tokenizer-from", metavar="FILE.gguf",
                   help="--format gguf: copy the tokenizer and chat template from this .gguf (default: a packaged "
                   "GGUF teacher with the same vocabulary, else built from the model's tokenizer.json)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per parity / calibration text (default 128)")
    p.add_argument("--allow-disagreement", action="store_true",
                   help="write the export even when it disagrees with PyTorch beyond its format's bound (float: "
                   "|diff| <= 1e-3 of the outputs' scale, f16 2%%; int8 / q8_0: top-1 >= 90%%, mean KL <= 0.05); "
                   "alambic-export.json then records by how much")
    p.set_defaults(run=run_export)


def run_export(args) -> int:
    from alambic.workflows.export import export

    export(args.model, args.format, args.out, gguf_type=args.gguf_type, int8=args.int8,
           calibration_data=args.calibration_data, tokenizer_from=args.tokenizer_from, max_length=args.max_length,
           allow_disagreement=args.allow_disagreement)
    return 0
