"""The ``alambic eval-chat`` verb: instruct models answer held-out chat prompts, scored without a judge model."""

from __future__ import annotations

import json
from pathlib import Path

from alambic.errors import AlambicError

CHAT_FORMAT = ("chat records (.jsonl/.json/.parquet): {\"messages\": [..., {\"role\": \"assistant\", \"content\": "
               "GOLD}]} or {\"prompt\": ..., \"completion\": GOLD}, optionally with \"options\": [...] holding GOLD")


def add_eval_chat(sub) -> None:
    p = sub.add_parser(
        "eval-chat", help="instruct models on chat prompts: ROUGE-L, accuracy, and agreement with a teacher",
        description="Every model answers the same held-out prompts (greedy by default) and is scored without a judge "
        "model: ROUGE-L F1 against the gold answers; on records with options, accuracy of the generated answer (its "
        "words begin with the gold's, normalised) and of the most likely option (lm-eval style, end-of-turn token "
        "included; also normalised by length in bytes); mean answer length and the share cut off at "
        "--max-new-tokens. With --teacher: ROUGE-L against the teacher's answers, the teacher's per-token NLL of "
        "the model's answers, and the per-token forward KL(teacher || model) on the teacher's answers.")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="causal LMs sharing one tokenizer: model folders, run folders, .gguf files, packaged names, "
                   "`alambic export --format gguf` folders (answered in llama.cpp when installed)")
    p.add_argument("--data", nargs="+", required=True, metavar="FILE", help=CHAT_FORMAT)
    p.add_argument("--teacher", help="a model that answers too, for the teacher-relative metrics (its tokenizer "
                   "renders the prompts)")
    p.add_argument("--names", help="comma-separated labels for the models, in order (default: as given)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per answer at most (default 64)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generation / scoring batch (default 8)")
    p.add_argument("--max-examples", type=int, help="evaluate the first N records only")
    p.add_argument("--temperature", dest="sampling_temperature", type=float, default=0.0,
                   help="sampling temperature, every model and the teacher alike; 0 is greedy decoding (default 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling, with --temperature (default 1: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling, with --temperature (default 0)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--out", metavar="FILE", help="also write the rows as JSON to FILE")
    p.add_argument("--samples", metavar="FILE", help="also write every prompt's gold answer and each model's answer "
                   "(the teacher's too) as JSON lines to FILE: {\"where\", \"messages\", \"gold\", \"answers\": "
                   "{name: text}}")
    p.set_defaults(run=run_eval_chat)


def run_eval_chat(args) -> int:
    from alambic.data.chat import read_chat
    from alambic.evaluation.chat import evaluate_chat

    out, samples_file = (Path(path) if path else None for path in (args.out, args.samples))
    for flag, path, example in (("--out", out, "eval-chat.json"), ("--samples", samples_file, "answers.jsonl")):
        if path is not None and path.is_dir():
            raise AlambicError(f"{flag} {path} is a folder: give a file name (e.g. {path / example})")
    records = read_chat(args.data, need_response=False)
    samples = [] if samples_file is not None else None
    rows = evaluate_chat(args.models, records, teacher=args.teacher,
                         names=args.names.split(",") if args.names else None,
                         max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                         temperature=args.sampling_temperature, top_p=args.top_p, seed=args.seed,
                         max_examples=args.max_examples, samples=samples)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=2) + "\n")
    if samples_file is not None:
        samples_file.parent.mkdir(parents=True, exist_ok=True)
        samples_file.write_text("".join(json.dumps(sample, ensure_ascii=False) + "\n" for sample in samples),
                                encoding="utf-8")
    print(json.dumps(rows, indent=2) if args.json else format_chat_table(rows))
    return 0


def format_chat_table(rows: list[dict]) -> str:
    names = [k for k in rows[0] if k not in ("model", "parameters", "examples", "option_examples")]
    header = ["model", "params (M)", *names, "examples"]
    lines = [[r["model"], f"{r['parameters'] / 1e6:.1f}", *(f"{r[n]:.4f}" for n in names), str(r["examples"])]
             for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]

    def fmt(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines])


__all__ = ["add_eval_chat", "format_chat_table", "run_eval_chat"]
