"""The report verbs of the ``alambic`` command: ``report``, ``plot-run`` and ``plot-temperature``."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from alambic.errors import AlambicError

MODEL_HELP = "a local Hugging Face model folder, a .gguf file, or a packaged teacher (smollm2-135m, minilm-l6)"
DATA_HELP = "text files, folders, globs (.txt .jsonl .json .csv .parquet) or packaged corpora (bbc-news:heldout ...)"


def _numbers(flag: str, text: str, kind=int) -> list:
    try:
        values = [kind(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        example = "64,128" if kind is int else "1,2,3,6"
        raise AlambicError(f"{flag} {text!r} is not a comma-separated list of numbers such as {example}") from None
    if not values:
        raise AlambicError(f"{flag} is empty: give numbers such as {'64,128' if kind is int else '1,2,3,6'}")
    return values


# --- report -------------------------------------------------------------------------------------------------------

def add_report(sub) -> None:
    p = sub.add_parser(
        "report",
        help="measure size, FLOPs, speed and quality of a teacher and its students; report.md, report.json, plots",
        description="Measure each model: parameters (total and without embeddings), size on disk, FLOPs per token "
        "(formula checked against a counted forward), latency (batch 1) and throughput (--batch-size) at each "
        "--seq-lens with warm-up and repeats (CPU fp32 always, GPU bf16 when present), and quality (--lm-data: "
        "held-out perplexity or masked-token accuracy; --task: a task metric; --chat-data: the chat metrics of "
        "`alambic eval-chat`, the first model being the teacher). The first model is the reference: "
        "every other one gets its size ratio, speed-up, speed-up against the FLOP ratio, and quality retained. "
        "Files are written only once everything is measured, each atomically.",
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help=MODEL_HELP + "; the first is the reference")
    p.add_argument("--out", required=True, help="folder for report.md, report.json, quality_vs_speed.png, speed.png")
    quality = p.add_argument_group("quality (--lm-data or --task)")
    quality.add_argument("--lm-data", nargs="+", metavar="PATH", help="held-out text: " + DATA_HELP)
    quality.add_argument("--task", help="classification, ner or qa: the main metric of `alambic eval-task` "
                         "(accuracy, entity F1, SQuAD F1) of fine-tuned task models")
    quality.add_argument("--data", nargs="+", metavar="FILE",
                         help="the --task's evaluation data (as eval-task reads it)")
    quality.add_argument("--max-length", type=int,
                         help="tokens per evaluated sequence (default: the largest --seq-lens)")
    quality.add_argument("--max-tokens", type=int, default=8192, help="cap on held-out tokens evaluated (default 8192)")
    quality.add_argument("--eval-batch-size", type=int, default=8,
                         help="sequences (or chat prompts) per evaluation batch (default 8)")
    quality.add_argument("--text-field", default="text", help="field or column with the text in .jsonl/.csv/.parquet")
    quality.add_argument("--qa-metric", choices=("squad", "korquad"), default="squad",
                         help="--task qa: SQuAD v1.1 F1 over words, or KorQuAD 1.0 F1 over characters (Korean)")
    chat = p.add_argument_group("chat quality (instruct models; alone or with --lm-data)")
    chat.add_argument("--chat-data", nargs="+", metavar="FILE",
                      help="held-out chat records with gold answers, as `alambic eval-chat --data` reads them: every "
                      "PyTorch model answers greedily; accuracy, option accuracy, ROUGE-L, and teacher NLL and "
                      "forward KL against the first model (the teacher)")
    chat.add_argument("--chat-max-new-tokens", type=int, default=64,
                      help="tokens per answer at most (eval-chat's --max-new-tokens; default 64)")
    chat.add_argument("--chat-max-examples", type=int, help="evaluate the first N chat records only")
    timing = p.add_argument_group("speed")
    timing.add_argument("--seq-lens", default="64,128,256", help="sequence lengths timed (default 64,128,256)")
    timing.add_argument("--batch-size", type=int, default=8, help="batch of the throughput measurement (default 8)")
    timing.add_argument("--warmup", type=int, default=2, help="untimed rounds before timing (default 2)")
    timing.add_argument("--repeats", type=int, default=5,
                        help="timed rounds at least; each round runs every model once, interleaved (default 5)")
    timing.add_argument("--max-repeats", type=int, default=60,
                        help="timed rounds at most: rounds go on until each speed-up is known within --tolerance "
                        "(default 60)")
    timing.add_argument("--tolerance", type=float, default=0.02,
                        help="relative half-width of each speed-up's ~95%% interval at which timing stops "
                        "(default 0.02: +-2%%)")
    timing.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; recorded either way)")
    timing.add_argument("--devices", help="cpu and/or cuda, comma-separated (default: cpu, plus cuda when present)")
    p.add_argument("--names", help="comma-separated labels for the models, in order (default: as given)")
    p.add_argument("--card", action="append", default=[], metavar="STUDENT_DIR",
                   help="also write the report's figures into STUDENT_DIR/README.md (one of the MODELs; repeatable)")
    p.add_argument("--no-plots", action="store_true", help="write report.md and report.json only")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(run=run_report)


def _command(args) -> str:
    parts = ["alambic", "report", *args.models, "--out", args.out]
    if args.lm_data:
        parts += ["--lm-data", *args.lm_data]
    if args.task:
        parts += ["--task", args.task, "--data", *(args.data or [])]
        if args.qa_metric != "squad":
            parts += ["--qa-metric", args.qa_metric]
    if args.chat_data:
        parts += ["--chat-data", *args.chat_data, "--chat-max-new-tokens", str(args.chat_max_new_tokens)]
        if args.chat_max_examples is not None:
            parts += ["--chat-max-examples", str(args.chat_max_examples)]
    for flag, value in (("--max-length", args.max_length), ("--max-tokens", args.max_tokens),
                        ("--eval-batch-size", args.eval_batch_size),
                        ("--seq-lens", args.seq_lens), ("--batch-size", args.batch_size), ("--warmup", args.warmup),
                        ("--repeats", args.repeats), ("--max-repeats", args.max_repeats),
                        ("--tolerance", args.tolerance), ("--threads", args.threads), ("--devices", args.devices),
                        ("--names", args.names)):
        if value is not None:
            parts += [flag, str(value)]
    for card in args.card:
        parts += ["--card", card]
    return shlex.join(str(p) for p in parts)


def _card_indices(models: list[str], cards: list[str]) -> list[tuple[str, int]]:
    from alambic.export.runtime import resolve_measured_path

    resolved = [resolve_measured_path(m).resolve() for m in models]
    out = []
    for card in cards:
        path = Path(card)
        if not path.is_dir():
            raise AlambicError(f"--card {card}: no such folder; give the folder of one of the reported models")
        if path.resolve() not in resolved:
            raise AlambicError(f"--card {card} is not one of the reported models: add it to the MODEL list "
                               "(it must be measured to get the figures)")
        out.append((card, resolved.index(path.resolve())))
    return out


def run_report(args) -> int:
    from alambic.evaluation.report import ReportSettings, build_report, check_out_dir, render_markdown, write_report

    settings = ReportSettings(
        seq_lens=_numbers("--seq-lens", args.seq_lens), batch_size=args.batch_size, warmup=args.warmup,
        repeats=args.repeats, max_repeats=args.max_repeats, tolerance=args.tolerance, threads=args.threads,
        devices=[d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else None,
        lm_data=list(args.lm_data or []), max_length=args.max_length, max_tokens=args.max_tokens,
        eval_batch_size=args.eval_batch_size, text_field=args.text_field, task=args.task, data=list(args.data or []),
        qa_metric=args.qa_metric, chat_data=list(args.chat_data or []),
        chat_max_new_tokens=args.chat_max_new_tokens, chat_max_examples=args.chat_max_examples,
        names=[n.strip() for n in args.names.split(",")] if args.names else None)
    check_out_dir(args.out)
    cards = _card_indices(args.models, args.card)
    log = None if args.quiet else (lambda line: print(f"report: {line}", file=sys.stderr, flush=True))
    try:
        report = build_report(args.models, settings, log=log, command=_command(args))
        written = write_report(report, args.out, plots=not args.no_plots)
        from alambic.evaluation.model_card import add_report_to_card

        for card, index in cards:
            written.append(add_report_to_card(card, report, index, str(Path(args.out) / "report.md")))
    except KeyboardInterrupt:
        print(f"alambic: report interrupted; nothing was written to {args.out} (files are written only once every "
              "model is measured)", file=sys.stderr)
        return 130
    text = render_markdown(report)
    print(text.split("\n## Speed", 1)[0].rstrip())
    print("\nwritten: " + ", ".join(str(p) for p in written))
    return 0


# --- plot-run -----------------------------------------------------------------------------------------------------

def add_plot_run(sub) -> None:
    p = sub.add_parser(
        "plot-run",
        help="training curves of a distillation run, one panel per loss term (from RUN_DIR/metrics.jsonl)",
        description="Plot every logged figure of a run against the step: the total loss, each loss term (with its "
        "weight from the run's config.yaml), learning rate, throughput, gradient norm and held-out metrics.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by `alambic distill --out RUN_DIR`")
    p.add_argument("--out", help="PNG file to write (default RUN_DIR/training_curves.png)")
    p.set_defaults(run=run_plot_run)


def run_plot_run(args) -> int:
    from alambic.evaluation.plots import plot_run

    path, notes = plot_run(args.run_dir, args.out)
    for note in notes:
        print(f"alambic: note: {note}", file=sys.stderr)
    print(f"written: {path}")
    return 0


# --- plot-temperature ---------------------------------------------------------------------------------------------

def add_plot_temperature(sub) -> None:
    p = sub.add_parser(
        "plot-temperature",
        help="a teacher's top-k next-token (or masked-word) probabilities softened by each temperature, as bars",
        description="softmax(z / T) of the model's logits for the token after --text (decoders) or for its last "
        "word, masked (encoders), at the --top-k tokens most likely at T = 1 (softmax over those top-k logits, or "
        "over the whole vocabulary with --whole-vocabulary): one panel per temperature. "
        "Higher T flattens the distribution: the soft targets of knowledge distillation.",
    )
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--text", required=True, help="the context (decoders: what comes next; encoders: its last word)")
    p.add_argument("--temperatures", default="1,2,3,6", help="comma-separated temperatures (default 1,2,3,6)")
    p.add_argument("--top-k", type=int, default=10, help="tokens shown (default 10)")
    p.add_argument("--whole-vocabulary", action="store_true",
                   help="show softmax(z / T) over the whole vocabulary at the top-k tokens, instead of the softmax "
                   "over the top-k logits only (the default, as seed 003's figure)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.set_defaults(run=run_plot_temperature)


def run_plot_temperature(args) -> int:
    from alambic.evaluation.plots import plot_temperature, softened_distribution
    from alambic.teachers import load_teacher

    temperatures = _numbers("--temperatures", args.temperatures, float)
    if not args.text.strip():
        raise AlambicError("--text is empty: give the context whose next (or last, masked) word to look at")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise AlambicError(f"--out {out} must be a .png file")
    model, tokenizer = load_teacher(args.model)
    table = softened_distribution(model, tokenizer, args.text, temperatures, top_k=args.top_k,
                                  renormalise=not args.whole_vocabulary)
    plot_temperature(table, out, title=f"{args.model}: {table['target']} after {table['context'][-60:]!r}")
    width = max(len(t) for t in table["tokens"])
    print(f"{table['target']} of {table['context']!r}")
    print("token".ljust(width) + "".join(f"  T={t:<6g}" for t in temperatures))
    for i, token in enumerate(table["tokens"]):
        print(token.ljust(width) + "".join(f"  {table['probabilities'][t][i]:<8.4f}" for t in temperatures))
    print("top-k mass".ljust(width) + "".join(f"  {table['top_k_mass'][t]:<8.4f}" for t in temperatures)
          + "  (share of the whole-vocabulary probability)")
    print(f"written: {out}")
    return 0
