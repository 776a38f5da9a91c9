"""What each deployment format costs and buys: a student exported to ONNX / ONNX int8 / PyTorch int8 / GGUF, then
measured with the teacher and the PyTorch student by `alambic report` (size on disk, batch-1 latency, throughput and
quality on the same data, each in the runtime the file is for). One run, one machine: every ratio is against the
teacher measured in the same run.

    # the BBC classification student of `make demo`
    python benchmarks/export_formats.py --teacher runs/demo/teacher/best --student runs/demo/student/best \
        --formats onnx onnx-int8 onnx-int8:static torch-int8 --calibration-data bbc-news:train \
        --task classification --data bbc-news:heldout --max-length 64 --seq-lens 128 --out runs/export-bbc
    # the SmolLM2 15-layer student of `make demo-lm`
    python benchmarks/export_formats.py --teacher smollm2-135m --student runs/demo-lm/student \
        --formats gguf:f16 gguf:q8_0 --lm-data bbc-news:heldout --max-length 256 --seq-lens 128 --generate 64 \
        --out runs/export-lm

Exports are written to OUT/<format> (kept, and reused by a rerun); the report to OUT/report; the table is printed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from alambic.evaluation.report import ReportSettings, build_report, write_report  # noqa: E402
from alambic.workflows.export import export  # noqa: E402


def export_all(student: str, formats: list[str], out: Path, calibration) -> list[str]:
    folders = []
    for spec in formats:
        fmt, _, option = spec.partition(":")  # gguf:q8_0 (GGUF type), onnx-int8:static (int8 mode)
        folder = out / spec.replace(":", "-")
        if not (folder / "alambic-export.json").is_file():
            export(student, fmt, folder, gguf_type=option if fmt == "gguf" else "f16",
                   int8=option if fmt == "onnx-int8" and option else "dynamic", calibration_data=calibration)
        folders.append(str(folder))
    return folders


def table(report: dict) -> str:
    seq = max(report["settings"]["seq_lens"])
    batch = report["settings"]["batch_size"]
    header = ["model", "runtime", "size on disk (MB)", f"latency b=1 x {seq} (ms)", f"tokens/s b={batch} x {seq}",
              "quality", "retained", "speed-up b=1 vs teacher"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in report["models"]:
        speed = {(s["batch_size"], s["seq_len"]): s for s in m["speed"]}
        lat, thr = speed.get((1, seq)), speed.get((batch, seq))
        ratio = next((s["speedup"] for s in m["ratios"]["speed"] if s["batch_size"] == 1 and s["seq_len"] == seq),
                     None)
        q = m["quality"]
        retained = m["ratios"]["quality_retention_pct"]
        lines.append("| " + " | ".join([
            m["name"], m["runtime"], f"{m['disk_bytes'] / 1e6:.1f}", f"{lat['ms_per_batch']:.1f}" if lat else "-",
            f"{thr['tokens_per_s']:,.0f}" if thr else "-",
            f"{q['metric']} {q['value']:.4g}" if q.get("value") is not None else "-",
            f"{retained:.1f}%" if retained is not None else "-", f"{ratio:.2f}x" if ratio else "-"]) + " |")
    return "\n".join(lines)


PROMPT = "The central bank raised interest rates on Tuesday, and analysts said"


def decode_tokens_per_s(spec: str, new_tokens: int, repeats: int = 3) -> tuple[float, str]:
    """Greedy generation of ``new_tokens`` after a short prompt, batch 1, with a KV cache: llama.cpp for a GGUF export
    (when llama-cpp-python is installed), else transformers' ``generate``. The median over ``repeats`` runs."""
    import statistics
    import time

    import torch

    from alambic.export.runtime import export_folder, read_manifest
    from alambic.teachers import load_model

    folder = export_folder(spec)
    manifest = read_manifest(folder) if folder else None
    times = []
    if manifest and manifest["format"] == "gguf":
        from llama_cpp import Llama

        llm = Llama(model_path=str(folder / manifest["files"][0]), n_ctx=512, n_threads=torch.get_num_threads(),
                    verbose=False)
        prompt = llm.tokenize(PROMPT.encode(), add_bos=False)
        for _ in range(repeats + 1):  # the first run warms up
            llm.reset()
            start = time.perf_counter()
            for i, _token in enumerate(llm.generate(prompt, top_k=1, reset=True)):
                if i + 1 == new_tokens:
                    break
            times.append(time.perf_counter() - start)
        return new_tokens / statistics.median(times[1:]), "llama.cpp"
    model, tokenizer = load_model(spec)
    ids = tokenizer(PROMPT, return_tensors="pt")
    with torch.inference_mode():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            model.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=tokenizer.eos_token_id)
            times.append(time.perf_counter() - start)
    return new_tokens / statistics.median(times[1:]), "transformers generate, fp32"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--student", required=True)
    p.add_argument("--formats", nargs="+", required=True,
                   help="onnx, onnx-int8, onnx-int8:static, torch-int8, gguf:f16, gguf:q8_0 ...")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--task")
    p.add_argument("--data", nargs="+", default=[])
    p.add_argument("--lm-data", nargs="+", default=[])
    p.add_argument("--calibration-data", nargs="+", help="parity (and static int8) text; default: built-in")
    p.add_argument("--max-length", type=int)
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--seq-lens", default="128")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--generate", type=int, default=0, metavar="N",
                   help="decoders: also time greedy generation of N tokens at batch 1 (prompt included in the time)")
    args = p.parse_args()
    folders = export_all(args.student, args.formats, args.out, args.calibration_data)
    names = ["teacher", "student (PyTorch)"] + [Path(f).name for f in folders]
    settings = ReportSettings(seq_lens=[int(s) for s in args.seq_lens.split(",")], batch_size=args.batch_size,
                              repeats=args.repeats, task=args.task, data=args.data, lm_data=args.lm_data,
                              max_length=args.max_length, max_tokens=args.max_tokens, names=names)
    report = build_report([args.teacher, args.student, *folders], settings,
                          command="python " + " ".join([sys.argv[0], *sys.argv[1:]]))
    write_report(report, args.out / "report")
    print(f"\n{report['machine']['cpu']}, {report['machine']['torch_threads']} threads\n")
    print(table(report))
    if args.generate:
        print(f"\n| model | greedy generation, batch 1, {args.generate} new tokens (tokens/s) | runtime |\n|---|---:|---|")
        for name, spec in zip(names, [args.teacher, args.student, *folders]):
            speed, runtime = decode_tokens_per_s(spec, args.generate)
            print(f"| {name} | {speed:.1f} | {runtime} |")


if __name__ == "__main__":
    main()
