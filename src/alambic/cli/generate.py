"""The ``alambic generate`` verb."""

from __future__ import annotations

import sys

MODEL_HELP = "a model folder or run folder, a .gguf file or a packaged teacher (smollm2-135m)"


def add_generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="the teacher answers chat prompts, writing training data for sequence-level distillation",
        description="Sequence-level knowledge distillation: the teacher answers every prompt (a conversation without "
        "its final answer, rendered with the teacher's chat template; a final answer in the file is replaced) and "
        "OUT/data.jsonl gets one {\"messages\": [..., answer]} line per answer, the chat data `alambic distill --data "
        "OUT/data.jsonl` trains on. OUT/manifest.json records the teacher, settings, a hash of the prompts and "
        "counts. Interrupted? Rerun the same command: it continues after the last batch written, and the file ends "
        "exactly as an uninterrupted run's.",
    )
    p.add_argument("--teacher", required=True, help=MODEL_HELP + "; it needs a chat template")
    p.add_argument("--prompts", nargs="+", required=True, metavar="FILE",
                   help="chat prompt files (.jsonl .json .parquet) of {\"messages\": [...]} or {\"prompt\": ...} "
                   "records, folders or globs")
    p.add_argument("--out", required=True, help="folder to write (rerunning the same command continues it)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer, in tokens (default 256)")
    p.add_argument("--temperature", dest="sampling_temperature", metavar="TEMPERATURE", type=float, default=0.7,
                   help="sampling temperature; 0 is greedy decoding (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.95,
                   help="nucleus sampling: draw from the most probable tokens holding this much probability "
                   "(default 0.95; 1 keeps all)")
    p.add_argument("--num-return-sequences", type=int, default=1, help="answers per prompt (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="sequences sampled together (default 8; a batch holds batch-size / "
                   "num-return-sequences prompts)")
    p.add_argument("--max-prompts", type=int, help="answer only the first N prompts (default: all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run_generate)


def run_generate(args) -> int:
    from alambic.workflows.generate import generate

    try:
        generate(args.teacher, args.prompts, args.out, max_new_tokens=args.max_new_tokens,
                 temperature=args.sampling_temperature, top_p=args.top_p,
                 num_return_sequences=args.num_return_sequences, seed=args.seed, batch_size=args.batch_size,
                 max_prompts=args.max_prompts, progress=not args.no_progress)
    except KeyboardInterrupt:
        print("alambic: interrupted (rerun the same command to continue after the last batch written)",
              file=sys.stderr)
        return 130
    return 0
