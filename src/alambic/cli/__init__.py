"""The ``alambic`` command: thin verbs over the Python API.

A mistake the user can fix prints one ``alambic: error: ...`` line and exits 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap

from alambic import __version__
from alambic.config import MIXED_PRECISION_HELP, MIXED_PRECISIONS, TOKEN_TYPES
from alambic.environment import env_switch, is_main_process, require_one_process
from alambic.errors import AlambicError
from alambic.ranges import ABOVE_ZERO, FRACTION, NON_NEGATIVE, POSITIVE, Range, check_value
from alambic.cli.budget import add_budget_options, budget_from_args
from alambic.cli.chat_eval import add_eval_chat
from alambic.cli.export import add_export
from alambic.cli.generate import add_generate
from alambic.cli.parser import Parser, parse_command_line
from alambic.cli.report import add_plot_run, add_plot_temperature, add_report
from alambic.cli.tasks import add_augment, add_distill_task, add_eval_task, add_finetune

TEACHER_HELP = "a local Hugging Face model folder, a .gguf file, or a packaged teacher (smollm2-135m, minilm-l6)"
DATA_HELP = "text files, folders, globs (.txt .jsonl .json .csv .parquet) or packaged corpora (bbc-news, bbc-news:train, bbc-news:heldout, kolaw)"


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


# --- init-student -------------------------------------------------------------------------------------------------

def add_init_student(sub) -> None:
    p = sub.add_parser(
        "init-student",
        help="build a shallower (or narrower) student from a teacher, copying its layers",
        description="Build a student from a teacher: a subset of its layers (copied), embeddings, norms and LM head "
        "(or task head) copied; pooler dropped; token-type embeddings dropped unless the teacher is a fine-tuned task "
        "model (--token-types). Writes a plain Hugging Face model folder.",
    )
    p.add_argument("--teacher", required=True, help=TEACHER_HELP)
    p.add_argument("--out", required=True, help="folder to write the student to")
    p.add_argument("--layers", default="default",
                   help="default (auto:influence for a decoder given --calibration-data, else every-other), "
                   "every-other (ceil(N/2) evenly spaced, first and last kept), even (0,2,4,...), odd (1,3,...), "
                   "linspace:K, a list such as 0,2,4,7,9,11, or auto[:greedy|influence] to choose layers by "
                   "measuring on --calibration-data")
    width = p.add_argument_group(
        "narrower students",
        "Narrower widths are sliced out of the teacher: the channels, heads (key/value groups) and FFN neurons with "
        "the largest activations on --calibration-data are kept in every matrix that reads or writes them "
        "(Minitron); --width-init random starts them fresh instead.")
    width.add_argument("--hidden-size", type=int, help="narrower hidden width")
    width.add_argument("--intermediate-size", type=int, help="narrower feed-forward width")
    width.add_argument("--num-heads", type=int,
                       help="fewer attention heads (default: the teacher's head size is kept, so a narrower hidden "
                       "width has fewer heads: hidden / head size)")
    width.add_argument("--allow-wider", action="store_true",
                       help="allow a width above the teacher's (refused otherwise: it cannot be copied)")
    width.add_argument("--width-init", choices=("importance", "random"), default="importance",
                       help="importance (default): slice the teacher by measured importance; random: fresh weights")
    p.add_argument("--seed", type=int, default=0, help="seed of any fresh initialisation (and of calibration masks)")
    p.add_argument("--token-types", choices=TOKEN_TYPES, default="auto",
                   help="BERT-style segment embeddings: drop (DistilBERT, type 0 only), keep (sentence-pair tasks, "
                   "QA), auto (default): keep for a fine-tuned task teacher, drop otherwise")
    auto = p.add_argument_group(
        "measuring the teacher (--layers auto, narrower widths)",
        "auto:greedy (what `auto` alone means): drop, one at a time, the layer whose removal raises the calibration "
        "loss least; auto:influence (what --layers default picks for a decoder): keep the layers that change the "
        "hidden state most (one forward pass). The loss is next-token "
        "cross-entropy (decoders), masked-LM cross-entropy (encoders), or the distance to the teacher's final hidden "
        "states (encoders without an MLM head).")
    auto.add_argument("--calibration-data", nargs="+", metavar="PATH",
                      help="calibration text for layer selection and width pruning: " + DATA_HELP)
    auto.add_argument("--depth", type=int, help="layers the student keeps (default: ceil(N/2), the every-other count)")
    auto.add_argument("--budget", type=float, metavar="SECONDS",
                      help="time limit of the greedy search; the remaining removals then follow the influence ranking")
    auto.add_argument("--calibration-tokens", type=int, default=4096,
                      help="tokens of calibration text measured (default 4096)")
    auto.add_argument("--max-length", type=int, default=128, help="tokens per calibration sequence (default 128)")
    add_budget_options(p, "--layers, --depth, --hidden-size, --intermediate-size, --num-heads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar during a shape search")
    p.set_defaults(run=run_init_student)


def _shape_flags(args) -> list[str]:
    """The shape options init-student was given (the budget's alternative)."""
    flags = [f"--{name.replace('_', '-')}" for name in ("depth", "hidden_size", "intermediate_size", "num_heads")
             if getattr(args, name) is not None]
    return (["--layers"] if args.layers.strip().lower() != "default" else []) + flags


def _run_shape_search(args, budget) -> int:
    from transformers import AutoConfig, AutoTokenizer

    from alambic.data.sources import describe_sources
    from alambic.modeling import model_kind
    from alambic.search import SEARCH_FILE, search_shape
    from alambic.students import save_student
    from alambic.students import selection as sel
    from alambic.students.layer_map import layers_record
    from alambic.teachers import load_teacher, resolve_model_path

    if not args.calibration_data:
        raise AlambicError("a shape search ranks the shapes that meet the budget on calibration text: add "
                           "--calibration-data PATH (a few thousand tokens of your text, e.g. bbc-news:train)")
    path = resolve_model_path(args.teacher)
    describe_sources(args.calibration_data)
    calibration = sel.calibration_batches(
        args.calibration_data, AutoTokenizer.from_pretrained(path), model_kind(AutoConfig.from_pretrained(path)),
        max_tokens=args.calibration_tokens, max_length=args.max_length, seed=args.seed)
    teacher, tokenizer = load_teacher(args.teacher)
    search, built = search_shape(teacher, budget, calibration, max_seconds=args.budget_seconds,
                                 timing_cache=args.timing_cache, search_steps=args.search_steps, seed=args.seed, token_types=args.token_types,
                                 log=lambda line: print(line, flush=True), progress=not args.no_progress)
    print("\n".join(search.table()))
    print(search.summary())
    print(built.summary())
    save_student(built.model, tokenizer, args.out, card=built.model_card(args.teacher),
                 files={SEARCH_FILE: search.to_json(), **layers_record(built.source_layers())})
    print(f"student written to {args.out}")
    return 0


def run_init_student(args) -> int:
    from transformers import AutoConfig

    from alambic.modeling import model_kind, num_layers
    from alambic.students import init_student, parse_layer_spec, save_student
    from alambic.students import selection as sel
    from alambic.students.layer_map import layers_record
    from alambic.teachers import load_teacher, resolve_model_path

    budget = budget_from_args(args, _shape_flags(args))
    if budget is not None:
        return _run_shape_search(args, budget)
    path = resolve_model_path(args.teacher)
    config = AutoConfig.from_pretrained(path)
    n = num_layers(config)
    if args.layers.strip().lower() == sel.DEFAULT_SPEC:
        args.layers = sel.default_layers(model_kind(config), calibration_at_hand=bool(args.calibration_data))
    method = sel.parse_auto_spec(args.layers)
    calibration = None
    narrower = any(v is not None for v in (args.hidden_size, args.intermediate_size, args.num_heads))
    measured = method is not None or (narrower and args.width_init == "importance")
    if method is None:
        used = [flag for flag, value in (("--depth", args.depth), ("--budget", args.budget)) if value is not None]
        if args.calibration_data is not None and not measured:
            used.append("--calibration-data")
        if used:
            verb = "apply" if len(used) > 1 else "applies"
            raise AlambicError(f"{', '.join(used)} only {verb} to --layers auto[:METHOD]"
                               f"{' or a narrower student' if '--calibration-data' in used else ''}; "
                               f"add --layers auto or drop {used[0]}")
        parse_layer_spec(args.layers, n)
    else:
        sel.check_depth(args.depth, n)
        sel.check_budget(args.budget)
    if measured:
        if not args.calibration_data:
            what = "--layers auto" if method is not None else "a narrower student (sliced by importance)"
            raise AlambicError(f"{what} needs calibration text: add --calibration-data PATH (a few thousand tokens "
                               "of your text, e.g. bbc-news:train)"
                               + ("" if method is not None else ", or --width-init random for fresh weights"))
        from transformers import AutoTokenizer

        from alambic.data.sources import describe_sources

        describe_sources(args.calibration_data)
        calibration = sel.calibration_batches(
            args.calibration_data, AutoTokenizer.from_pretrained(path), model_kind(config),
            max_tokens=args.calibration_tokens, max_length=args.max_length, seed=args.seed)
    teacher, tokenizer = load_teacher(args.teacher)
    built = init_student(teacher, layers=args.layers, hidden_size=args.hidden_size,
                         intermediate_size=args.intermediate_size, num_heads=args.num_heads, seed=args.seed,
                         depth=args.depth, calibration_data=calibration, selection_budget=args.budget,
                         tokenizer=tokenizer, log=lambda line: print(line, flush=True), token_types=args.token_types,
                         width_init=args.width_init, allow_wider=args.allow_wider)
    if built.selection is not None:
        built.selection.calibration = ", ".join(args.calibration_data)
    print(built.summary())
    save_student(built.model, tokenizer, args.out, card=built.model_card(args.teacher),
                 files=layers_record(built.source_layers()))
    print(f"student written to {args.out}")
    return 0


# --- distill ------------------------------------------------------------------------------------------------------

def add_distill(sub) -> None:
    from alambic.config import config_help, loss_config_class
    from alambic.recipes import RECIPES

    def listing(rows):
        return "\n".join(f"  {name} (default {default})\n      {doc}" for name, default, doc in rows)

    options = listing(config_help())
    for recipe in RECIPES:
        options += f"\n\nloss options of --recipe {recipe}:\n" + listing(config_help(loss_config_class(recipe), "loss."))
    p = sub.add_parser(
        "distill",
        help="distillation on raw text or chat data (DistilBERT / DistilGPT2, TinyBERT, MiniLM, chat models, GKD)",
        description="Distil a teacher into a student on raw text, or on chat data (.jsonl / .json / .parquet records "
        "with messages, or prompt and completion: rendered with the teacher's chat template, loss on the assistant "
        "tokens only; on_policy.lmbda > 0 has the student write some answers itself, as GKD). "
        "Options come from defaults, then --config FILE.yaml, "
        "then the flags below, then --set KEY=VALUE overrides; all are checked before any model loads.",
        epilog="every option (YAML keys, or --set KEY=VALUE):\n" + options,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML file of options (see configs/ for examples)")
    p.add_argument("--teacher", help=TEACHER_HELP)
    p.add_argument("--teacher-logits", metavar="CACHE",
                   help="train on a teacher cache from `alambic cache-teacher` instead of running the teacher")
    p.add_argument("--data", nargs="+", help="training text or chat records: " + DATA_HELP)
    p.add_argument("--max-length", type=int, help="tokens per training sequence (data.max_length)")
    p.add_argument("--eval-data", nargs="+", help="held-out text evaluated before and after training")
    p.add_argument("--out", help="run folder (checkpoints, metrics.jsonl, exported student in OUT/student)")
    p.add_argument("--student", help="an existing student model folder to train instead of building one from the teacher")
    p.add_argument("--layers", help="teacher layers the built student keeps: default (auto:influence on the training "
                   "data for decoders, every-other for encoders), every-other, even, odd, linspace:K, 0,2,4,... or "
                   "auto[:greedy|influence]")
    p.add_argument("--target-speedup", type=float, metavar="X",
                   help="a budget instead of a shape (student.target_speedup): the search picks the student that runs "
                   "X times faster than the teacher; also --set student.target_latency_ms / target_params, "
                   "student.budget_* for the conditions")
    p.add_argument("--recipe", help="distillation method: distilbert (default), tinybert, minilm")
    p.add_argument("--layer-map", help="tinybert/minilm: student:teacher layer pairs (0 = embeddings), auto, uniform, "
                   "last or copied (each student layer from the teacher layer it was copied from)")
    p.add_argument("--max-steps", type=int, help="optimiser steps")
    p.add_argument("--batch-size", type=int, help="sequences per micro-batch per process")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimiser step")
    p.add_argument("--lr", type=float, help="peak learning rate (training.lr; default 5e-4, and for a decoder student of "
                   "the distilbert recipe 1e-3 on raw text, 3e-4 on chat data)")
    p.add_argument("--mixed-precision", choices=MIXED_PRECISIONS, help=MIXED_PRECISION_HELP)
    p.add_argument("--divergence", help="soft-target divergence (loss.divergence): forward_kl (default), reverse_kl, "
                   "jsd, skew_kl, skew_reverse_kl, tvd")
    p.add_argument("--divergence-param", type=float, help="its parameter in [0, 1] (loss.divergence_param): jsd's "
                   "beta (default 0.5), the skew divergences' alpha (default 0.1)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any option by its dotted name, e.g. --set loss.temperature=4 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (metrics still go to metrics.jsonl)")
    p.set_defaults(run=run_distill)


FLAG_TO_OPTION = {
    "teacher": "teacher", "teacher_logits": "teacher_logits", "data": "data.train", "eval_data": "data.eval", "out": "out", "student": "student.init",
    "layers": "student.layers", "target_speedup": "student.target_speedup", "recipe": "recipe", "layer_map": "loss.layer_map", "max_steps": "training.max_steps",
    "batch_size": "training.batch_size", "grad_accum": "training.grad_accum", "lr": "training.lr",
    "mixed_precision": "training.mixed_precision", "max_length": "data.max_length", "divergence": "loss.divergence", "divergence_param": "loss.divergence_param",
}


def distill_config_from_args(args):
    from alambic.config import load_config, parse_override

    overrides = []
    for flag, option in FLAG_TO_OPTION.items():
        value = getattr(args, flag)
        if value is not None:
            for part in reversed(option.split(".")):
                value = {part: value}
            overrides.append(value)
    overrides += [parse_override(text) for text in args.overrides]
    return load_config(args.config, overrides)


def run_distill(args) -> int:
    import yaml

    from alambic.workflows.distill import distill, planned_config

    cfg = distill_config_from_args(args)
    if args.print_config:
        print(yaml.safe_dump(planned_config(cfg).to_dict(), sort_keys=False), end="")
        return 0

    result = distill(cfg, resume=args.resume, progress=not args.no_progress)
    evals = {k: v for k, v in result.metrics.items() if k.startswith("eval/")}
    if evals and is_main_process():
        print("held-out after training: " + ", ".join(f"{k[5:]} {v:.4g}" for k, v in evals.items()))
    return 0


# --- cache-teacher ------------------------------------------------------------------------------------------------

def add_cache_teacher(sub) -> None:
    p = sub.add_parser(
        "cache-teacher",
        help="run a teacher once over a corpus and store its top-k outputs, for distill --teacher-logits",
        description="Run the teacher once over the sequences `alambic distill` would train on and store, per token, "
        "its top-k log-probabilities at --temperature and the log of the remaining mass (shards in the compact format 2 "
        "by default, --cache-format 1 for float16, with a manifest: teacher, tokenizer and data fingerprints, "
        "max_length, k, temperature). `alambic distill "
        "--teacher-logits OUT` then trains without the teacher. Encoders get static masks, drawn once and stored. "
        "Resumable (rerun the same command), and under torchrun each process writes its share of the shards.",
    )
    p.add_argument("--teacher", required=True, help=TEACHER_HELP)
    p.add_argument("--data", nargs="+", required=True, help="training text: " + DATA_HELP)
    p.add_argument("--out", required=True, help="cache folder (a rerun with the same settings continues it)")
    p.add_argument("--top-k", type=int, default=32, help="teacher classes kept per token (default 32)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="temperature of the stored distribution; distill's loss.temperature must match (default 1: "
                   "at 2, SmolLM2's top 32 hold 21%% of the softened probability, at 1 82%%; docs/offline.md)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per sequence, as data.max_length (default 128)")
    p.add_argument("--hidden-states", action="store_true",
                   help="also store the last hidden states (fp16), for the cosine term")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per teacher forward (default 8)")
    p.add_argument("--mlm-probability", type=float, default=0.15, help="encoders: share of tokens masked (default 0.15)")
    p.add_argument("--seed", type=int, default=0, help="encoders: seed of the static masks (default 0)")
    p.add_argument("--shard-examples", type=int, default=512, help="sequences per shard file (default 512)")
    p.add_argument("--cache-format", type=int, default=2,
                   help="2 (default): compact, 195 bytes per token at --top-k 128 (log-probabilities in 6 bits); "
                   "1: float16 log-probabilities, 520 bytes per token at k = 128")
    p.add_argument("--text-field", default="text", help="field or column with the text in .jsonl/.csv/.parquet")
    p.add_argument("--split-documents", choices=("file", "line", "blank-line"), default="file",
                   help="how text files split into documents, as data.split_documents (default file)")
    p.set_defaults(run=run_cache_teacher)


def run_cache_teacher(args) -> int:
    from alambic.workflows.cache_teacher import cache_teacher

    cache_teacher(args.teacher, args.data, args.out, top_k=args.top_k, temperature=args.temperature,
                  max_length=args.max_length, hidden_states=args.hidden_states, batch_size=args.batch_size,
                  mlm_probability=args.mlm_probability, seed=args.seed, shard_examples=args.shard_examples,
                  text_field=args.text_field, split_documents=args.split_documents, format_version=args.cache_format)
    return 0


# --- eval-lm ------------------------------------------------------------------------------------------------------

def add_eval_lm(sub) -> None:
    p = sub.add_parser(
        "eval-lm",
        help="held-out perplexity (decoders) or masked-token accuracy and perplexity (encoders) of models",
        description="Evaluate each model on the same held-out text: perplexity for decoders, masked-token accuracy and "
        "perplexity for encoders (same masks for every model), with parameters and size on disk.",
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help=TEACHER_HELP)
    p.add_argument("--data", nargs="+", required=True, help=DATA_HELP)
    p.add_argument("--max-length", type=int, default=256, help="tokens per evaluated sequence (default 256)")
    p.add_argument("--max-tokens", type=int, default=32768, help="cap on evaluated tokens (default 32768)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--text-field", default="text", help="field or column with the text in .jsonl/.csv/.parquet")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=run_eval_lm)


def run_eval_lm(args) -> int:
    from alambic.config import DataConfig
    from alambic.data.pipeline import heldout_batches
    from alambic.data.sources import describe_sources
    from alambic.evaluation.lm import evaluate_lm, weights_size_bytes
    from alambic.modeling import model_kind
    from alambic.students import count_parameters
    from alambic.teachers import load_model, resolve_model_path

    describe_sources(args.data)
    paths = [resolve_model_path(m) for m in args.models]
    data_cfg = DataConfig(train=list(args.data), text_field=args.text_field, max_length=args.max_length,
                          eval_max_tokens=args.max_tokens)
    rows = []
    for spec, path in zip(args.models, paths):
        model, tokenizer = load_model(spec)
        batches = heldout_batches(args.data, tokenizer, model_kind(model), data_cfg, args.batch_size)
        metrics = evaluate_lm(model, batches)
        rows.append({"model": spec, "kind": model_kind(model), "parameters": count_parameters(model),
                     "size_mb": weights_size_bytes(path) / 1e6, **metrics})
        del model
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(format_lm_table(rows))
    return 0


def format_lm_table(rows: list[dict]) -> str:
    header = ["model", "params (M)", "size (MB)", "perplexity", "masked acc", "tokens"]
    lines = [[r["model"], f"{r['parameters'] / 1e6:.1f}", f"{r['size_mb']:.0f}", f"{r['perplexity']:.2f}",
              f"{r['masked_accuracy']:.3f}" if "masked_accuracy" in r else "-", str(r["tokens"])] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines])


# --- entry point --------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="alambic",
        description="Make transformer language models smaller and faster by knowledge distillation.",
        epilog=textwrap.dedent("""\
            examples:
              alambic init-student --teacher smollm2-135m --out student --layers every-other
              alambic distill --teacher smollm2-135m --data bbc-news:train --out runs/smol --max-steps 200
              alambic eval-lm smollm2-135m runs/smol/student --data bbc-news:heldout"""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"alambic {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error (also "
                        "ALAMBIC_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_init_student(sub)
    add_distill(sub)
    add_cache_teacher(sub)
    add_eval_lm(sub)
    add_report(sub)
    add_plot_run(sub)
    add_plot_temperature(sub)
    add_finetune(sub)
    add_distill_task(sub)
    add_eval_task(sub)
    add_eval_chat(sub)
    add_augment(sub)
    add_export(sub)
    add_generate(sub)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors a user's files and paths cause inside the libraries (a folder that vanished, a file cut short, a
    corrupt weight file), shown as one line; anything else is a bug and keeps its traceback."""
    from safetensors import SafetensorError

    return (OSError, json.JSONDecodeError, UnicodeDecodeError, SafetensorError)


FLAG_RANGES = {
    # sizes and counts
    "hidden_size": POSITIVE, "intermediate_size": POSITIVE, "num_heads": POSITIVE, "depth": POSITIVE,
    "max_steps": POSITIVE, "batch_size": POSITIVE, "grad_accum": POSITIVE, "eval_batch_size": POSITIVE,
    "max_tokens": POSITIVE, "repeats": POSITIVE, "threads": POSITIVE, "top_k": POSITIVE, "copies": POSITIVE,
    "candidates": POSITIVE, "trm_steps": POSITIVE, "doc_stride": POSITIVE, "shard_examples": POSITIVE,
    "max_new_tokens": POSITIVE, "num_return_sequences": POSITIVE, "max_examples": POSITIVE,
    "chat_max_new_tokens": POSITIVE, "chat_max_examples": POSITIVE,
    "max_length": Range(8), "context": Range(8), "calibration_tokens": Range(256),
    "max_repeats": POSITIVE, "budget_batch_size": POSITIVE, "budget_seq_len": POSITIVE, "budget_threads": POSITIVE,
    "target_params": POSITIVE, "cache_format": Range(1, 2),
    # budgets: a student faster than its teacher, a positive latency or time limit
    "target_speedup": Range(1, low_open=True), "target_latency": ABOVE_ZERO, "budget_seconds": ABOVE_ZERO,
    # switches where 0 means off, seeds, seconds
    "warmup": NON_NEGATIVE, "eval_every": NON_NEGATIVE, "patience": NON_NEGATIVE, "seed": NON_NEGATIVE,
    "budget": NON_NEGATIVE, "search_steps": NON_NEGATIVE, "alpha_kd": NON_NEGATIVE, "alpha_ce": NON_NEGATIVE, "sampling_temperature": NON_NEGATIVE,
    # rates and shares
    "lr": ABOVE_ZERO, "trm_lr": ABOVE_ZERO, "temperature": ABOVE_ZERO, "warmup_ratio": FRACTION,
    "probability": Range(0, 1, low_open=True), "mlm_probability": Range(0, 1, low_open=True),
    "divergence_param": Range(0, 1), "max_prompts": POSITIVE,
    "top_p": Range(0, 1, low_open=True), "tolerance": Range(0, 1, low_open=True, high_open=True),
}
"""The range of every numeric flag of every verb, by argparse destination (tests check that none is missing)."""
FLAG_SPELLINGS = {"sampling_temperature": "--temperature"}
"""Flags whose destination is not their spelling (generate's --temperature allows 0, other verbs' do not)."""


def check_flags(args: argparse.Namespace) -> None:
    """One line for the first numeric flag outside its range, before a verb runs."""
    for dest, allowed in FLAG_RANGES.items():
        check_value(FLAG_SPELLINGS.get(dest, f"--{dest.replace('_', '-')}"), getattr(args, dest, None), allowed)


def main(argv: list[str] | None = None) -> int:
    args = parse_command_line(build_parser(), argv)
    _quiet_libraries()
    debug = args.debug
    try:
        debug = debug or bool(env_switch("ALAMBIC_DEBUG"))
        check_flags(args)
        require_one_process(args.command)
        return args.run(args)
    except AlambicError as exc:
        if debug:
            raise
        print(f"alambic: error: {exc}", file=sys.stderr)
        return 2
    except _user_errors() as exc:
        if debug:
            raise
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"alambic: error: {type(exc).__name__}: {detail} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("alambic: interrupted (a run continues from its last checkpoint with --resume)", file=sys.stderr)
        return 130
