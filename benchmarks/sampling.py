"""Tokens per second of :func:`alambic.sampling.sample` against transformers' ``model.generate``.

Both decode greedily the same left-padded batch of BBC News prompts (cut to lengths spread between half of and
``--prompt-tokens``, so padding is exercised) for exactly ``--new-tokens`` tokens each (no end-of-sequence stop:
``sample`` is given no EOS id, ``generate`` ``min_new_tokens``), with the same model. Runs are interleaved (one of
each per repeat, after one warm-up each) and the medians are compared; that both wrote the same tokens is checked.

    python benchmarks/sampling.py                              # SmolLM2-135M, batch 8, 64 + 32 tokens
    python benchmarks/sampling.py --model runs/smol/student --batch 32 --new-tokens 128 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def prompts_of(tokenizer, batch: int, tokens: int) -> list[list[int]]:
    from alambic.data.sources import read_documents

    documents = read_documents(["bbc-news:heldout"])
    lengths = [tokens - (i * tokens) // (2 * batch) for i in range(batch)]  # tokens down to about tokens / 2
    prompts = []
    for i, length in enumerate(lengths):
        ids = tokenizer(documents[i % len(documents)], add_special_tokens=False)["input_ids"]
        prompts.append(ids[:length])
    return prompts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="model folder, run folder, .gguf or packaged name")
    parser.add_argument("--batch", type=int, default=8, help="prompts decoded together")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="longest prompt (the others down to half)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens written per prompt")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (medians compared)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args()

    import torch
    import transformers

    from alambic.sampling import left_pad, sample
    from alambic.teachers import load_model

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    model.to(device)
    prompts = prompts_of(tokenizer, args.batch, args.prompt_tokens)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask = left_pad(prompts, pad, device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run_sample():
        return sample(model, prompts, max_new_tokens=args.new_tokens, temperature=0, eos_token_ids=None,
                      pad_token_id=pad)

    def run_generate():
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=args.new_tokens,
                                 min_new_tokens=args.new_tokens, pad_token_id=pad)
        return out[:, ids.shape[1]:].tolist()

    runs = {"alambic sample": run_sample, "transformers generate": run_generate}
    times = {name: [] for name in runs}
    outputs = {name: fn() for name, fn in runs.items()}  # warm-up
    for _ in range(args.repeats):
        for name, fn in runs.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)

    from alambic.evaluation.speed import cpu_name

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"model: {args.model} ({type(model).__name__}, {args.dtype}) on {device.type}: {where}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"batch {args.batch}, prompt lengths {[len(p) for p in prompts]}, {args.new_tokens} new tokens each, "
          f"{args.repeats} interleaved repeats")
    tokens = args.batch * args.new_tokens
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, median in medians.items():
        print(f"  {name:22s} median {median:7.3f} s  {tokens / median:9.1f} tokens/s  "
              f"(runs: {', '.join(f'{t:.3f}' for t in times[name])})")
    print(f"speed-up of sample over generate: {medians['transformers generate'] / medians['alambic sample']:.2f}x; "
          f"same tokens: {outputs['alambic sample'] == outputs['transformers generate']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
