"""The task verbs of the ``alambic`` command: finetune, distill-task, eval-task (docs/tasks.md)."""

from __future__ import annotations

import json

from alambic.cli.budget import add_budget_options, budget_from_args
from alambic.config import DECODER_TASK_FORMATS, MIXED_PRECISION_HELP, MIXED_PRECISIONS
from alambic.environment import is_main_process
from alambic.errors import AlambicError

TASK_CHOICES = ("classification", "ner", "qa")
FORMATS = ("classification: .csv/.tsv/.jsonl/.json records (text, optional text_pair, label) or a folder of "
           "<label>/*.txt; ner: CoNLL columns (token ... BIO tag); qa: SQuAD JSON")
DECODER_FORMATS = ("; chat: .jsonl/.json/.parquet records with messages, or prompt and completion; lm: raw text "
                   "(files, folders, globs, or a packaged corpus such as bbc-news:train)")


def _record_fields(g) -> None:
    g.add_argument("--text-field", default="text", help="classification and lm records: field of the text")
    g.add_argument("--pair-field", default="text_pair", help="classification records: field of the optional pair")
    g.add_argument("--label-field", default="label", help="classification records: field of the label")


def _data_options(p) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--max-length", type=int, help="tokens per sequence (QA: per context window); default 128, "
                   "512 for --task chat and lm")
    g.add_argument("--doc-stride", type=int, default=32, help="QA: tokens of overlap between context windows")
    _record_fields(g)
    g.add_argument("--eval-batch-size", type=int, default=32, help="examples per evaluation batch")
    g.add_argument("--qa-metric", choices=("squad", "korquad"), default="squad",
                   help="QA exact match / F1: SQuAD v1.1 (word F1) or KorQuAD 1.0 (character F1, for Korean)")


def _training_options(p) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--max-steps", type=int, default=500, help="optimiser steps (per stage for distill-task)")
    g.add_argument("--batch-size", type=int, help="examples per micro-batch (default 16, 8 for --task chat and lm)")
    g.add_argument("--grad-accum", type=int, default=1)
    g.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    g.add_argument("--mixed-precision", choices=MIXED_PRECISIONS, help=MIXED_PRECISION_HELP)
    g.add_argument("--warmup-ratio", type=float, default=0.1)
    g.add_argument("--eval-every", type=int, default=50, help="steps between validations (best model kept in OUT/best)")
    g.add_argument("--patience", type=int, default=0,
                   help="stop after this many validations without improvement (0: never)")
    g.add_argument("--seed", type=int, default=42, help="seed of the held-out split (classification, ner, qa; "
                   "chat and lm hold out by content hash), shuffling and fresh weights")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _common(p, tasks=TASK_CHOICES, formats=FORMATS) -> None:
    p.add_argument("--task", required=True, choices=tasks)
    p.add_argument("--train", required=True, metavar="FILE", help=formats)
    p.add_argument("--validation", metavar="FILE",
                   help="validation data (default: a seeded, stratified 10%% of --train is held out; chat / lm: a "
                   "stable 10%% of the conversations / documents by content hash)")
    p.add_argument("--out", required=True, help="run folder; the best model is written to OUT/best")


def _training_config(args):
    from alambic.tasks.workflow import task_training_config

    return task_training_config(args.task, max_steps=args.max_steps, batch_size=args.batch_size,
                                grad_accum=args.grad_accum, lr=args.lr, warmup_ratio=args.warmup_ratio,
                                eval_every=args.eval_every, early_stopping_patience=args.patience, seed=args.seed,
                                mixed_precision=args.mixed_precision)


def _data(args):
    from alambic.tasks.workflow import DataOptions

    return DataOptions(max_length=args.max_length or 128, doc_stride=args.doc_stride, text_field=args.text_field,
                       pair_field=args.pair_field, label_field=args.label_field, eval_batch_size=args.eval_batch_size,
                       qa_metric=args.qa_metric)


# --- finetune -----------------------------------------------------------------------------------------------------

def add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a model on a task (classification, NER, extractive QA, chat, "
                       "raw text)",
                       description="Fine-tune an encoder on labelled task data, e.g. to make a task teacher. A model "
                       "without a task head (such as the packaged minilm-l6) gets a fresh one. The best model by "
                       "validation metric (accuracy / entity F1 / SQuAD F1) is kept in OUT/best with its labels. "
                       "--task chat fine-tunes a decoder (e.g. smollm2-135m) on chat data (.jsonl / .json / .parquet "
                       "records with messages, or prompt and completion), with the loss on the assistant tokens only; "
                       "--task lm fine-tunes a decoder on raw text (the files or packaged corpora distill reads), to "
                       "adapt a teacher to the student's text before distilling. For both the model with the lowest "
                       "validation perplexity is kept in OUT/best.")
    _common(p, TASK_CHOICES + tuple(DECODER_TASK_FORMATS), FORMATS + DECODER_FORMATS)
    p.add_argument("--model", required=True, help="a model folder or packaged model (minilm-l6; smollm2-135m for "
                   "--task chat or lm)")
    _data_options(p)
    _training_options(p)
    p.set_defaults(run=run_finetune)


def run_finetune(args) -> int:
    from alambic.workflows.finetune import finetune

    cfg, data = _training_config(args), _data(args)
    if args.task in DECODER_TASK_FORMATS:
        from alambic.workflows.finetune import finetune_decoder

        summary = finetune_decoder(args.task, args.model, args.train, args.out, validation=args.validation,
                                   training=cfg, max_length=args.max_length or 512, text_field=args.text_field,
                                   resume=args.resume, progress=not args.no_progress)
        answers = " of the answers" if args.task == "chat" else ""
        if is_main_process():  # under torchrun, said once
            print(f"best validation perplexity{answers}: {summary['best_validation_perplexity']:.4f}; model in "
                  f"{summary['best_model']}")
        return 0
    summary = finetune(args.task, args.model, args.train, args.out, validation=args.validation, training=cfg,
                       data=data, resume=args.resume, progress=not args.no_progress)
    if is_main_process():
        print(f"best validation {cfg.best_metric}: {summary[f'best_validation_{cfg.best_metric}']:.4f}; "
              f"model in {summary['best_model']}")
    return 0


# --- distill-task -------------------------------------------------------------------------------------------------

def add_distill_task(sub) -> None:
    p = sub.add_parser("distill-task", help="distil a fine-tuned teacher into a task student (pred, trm+pred, joint)",
                       description="Task distillation: L = alpha_ce * CE(labels) + alpha_kd * L_kd(teacher) on the "
                       "prediction layer (KL x T^2 or logit MSE; QA: mean of start and end over context tokens; NER: "
                       "first sub-words), optionally after (trm,pred) or with (joint) TinyBERT's intermediate-layer "
                       "losses. Teacher logits are cached on disk and reused by later epochs, stages and students.")
    _common(p)
    p.add_argument("--unlabelled", nargs="+", metavar="FILE", default=[],
                   help="transfer set: in-domain examples without labels (same formats, or .txt with one example per "
                   "line; labels in them are ignored), trained on the teacher's soft targets only. --train may also "
                   "mix labelled and unlabelled examples")
    p.add_argument("--teacher", required=True, help="a fine-tuned task model (e.g. OUT/best of alambic finetune)")
    s = p.add_argument_group("student (one of)")
    s.add_argument("--student", help="a student folder: built by init-student from the teacher (head copied), or any "
                   "pre-trained / general-distilled model with the teacher's tokenizer (fresh head)")
    s.add_argument("--student-layers", help="build the student from the teacher: layers to copy (linspace:3, 0,2,4)")
    s.add_argument("--hidden-size", type=int, help="with --student-layers: narrower width (sliced from the teacher "
                   "by importance measured on the training text)")
    s.add_argument("--intermediate-size", type=int, help="with --student-layers: narrower feed-forward")
    s.add_argument("--num-heads", type=int, help="with --student-layers: attention heads (default: the teacher's "
                   "head size kept)")
    s.add_argument("--width-init", choices=("importance", "random"), default="importance",
                   help="narrower widths: importance (default; Minitron) or random (fresh weights)")
    add_budget_options(p, "--student, --student-layers, --hidden-size, --intermediate-size, --num-heads")
    l = p.add_argument_group("loss")  # noqa: E741
    l.add_argument("--stages", default="pred", help="pred (default), trm,pred (intermediate layers then prediction) "
                   "or joint")
    l.add_argument("--keep-stages", action="store_true",
                   help="keep every stage's checkpoints and best model (default: an earlier stage keeps only the "
                   "student the next one starts from)")
    l.add_argument("--pred-loss", choices=("kl", "mse"), default="kl", help="kl: soft targets x T^2; mse: on logits")
    l.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the kl loss (default 1)")
    l.add_argument("--divergence", default="forward_kl", help="divergence of the kl loss: forward_kl (default), "
                   "reverse_kl, jsd, skew_kl, skew_reverse_kl, tvd")
    l.add_argument("--divergence-param", type=float, help="its parameter in [0, 1]: jsd's beta (default 0.5), the "
                   "skew divergences' alpha (default 0.1)")
    l.add_argument("--alpha-kd", type=float, default=1.0, help="weight of the soft-target loss (default 1)")
    l.add_argument("--alpha-ce", type=float, default=1.0,
                   help="weight of the hard-label cross-entropy, on labelled examples (default 1; 0: soft targets "
                   "only)")
    l.add_argument("--layer-map", default="auto",
                   help="trm / joint: auto (default: copied for a student copied from the teacher, else uniform), "
                   "uniform, copied (each student layer from the teacher layer it was copied from) or "
                   "student:teacher pairs (0 = embeddings)")
    l.add_argument("--trm-steps", type=int, help="steps of the trm stage (default --max-steps)")
    l.add_argument("--trm-lr", type=float, help="learning rate of the trm stage (default --lr)")
    l.add_argument("--no-teacher-cache", action="store_true", help="run the teacher on every batch")
    _data_options(p)
    _training_options(p)
    p.set_defaults(run=run_distill_task)


def run_distill_task(args) -> int:
    from alambic.workflows.distill_task import distill_task, parse_stages
    from alambic.recipes.task import TaskLossConfig
    from alambic.recipes.tinybert import TinyBERTLossConfig

    parse_stages(args.stages)
    shape = [f"--{name.replace('_', '-')}" for name in ("student", "student_layers", "hidden_size",
                                                         "intermediate_size", "num_heads")
             if getattr(args, name) is not None]
    budget = budget_from_args(args, shape)
    loss = TaskLossConfig(args.pred_loss, args.temperature, args.alpha_kd, args.alpha_ce, args.divergence,
                          args.divergence_param).validate()
    cfg = _training_config(args)
    summary = distill_task(
        args.task, args.teacher, args.train, args.out, student=args.student, student_layers=args.student_layers,
        hidden_size=args.hidden_size, intermediate_size=args.intermediate_size, num_heads=args.num_heads,
        validation=args.validation, stages=args.stages, loss=loss,
        intermediate=TinyBERTLossConfig(layer_map=args.layer_map), training=cfg, trm_steps=args.trm_steps,
        trm_lr=args.trm_lr, data=_data(args), teacher_cache=not args.no_teacher_cache, unlabelled=args.unlabelled,
        width_init=args.width_init, resume=args.resume, progress=not args.no_progress, keep_stages=args.keep_stages,
        budget=budget, search_seconds=args.budget_seconds, timing_cache=args.timing_cache,
        search_steps=args.search_steps)
    value = summary[f"best_validation_{cfg.best_metric}"]
    shown = "n/a" if value is None else f"{value:.4f}"
    print(f"best validation {cfg.best_metric}: {shown}; student in {summary['best_model']}")
    return 0


# --- augment ------------------------------------------------------------------------------------------------------

def add_augment(sub) -> None:
    p = sub.add_parser("augment", help="TinyBERT data augmentation: task data with words replaced by model substitutes",
                       description="Write each example followed by N copies in which every word is replaced, with "
                       "probability P, by one of its K best substitutes: the masked-LM predictions of --model for "
                       "one-token words, nearest neighbours in its embedding space otherwise (TinyBERT, Jiao et al. "
                       "2020). Train distill-task on the output. Classification and NER; not QA.")
    p.add_argument("--task", required=True, choices=("classification", "ner"))
    p.add_argument("--data", required=True, metavar="FILE", help=FORMATS)
    p.add_argument("--model", required=True, metavar="MODEL",
                   help="a masked LM (HF folder or packaged name); a model without MLM head (e.g. minilm-l6) gives "
                   "embedding neighbours only")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="output: JSONL records (classification) or a CoNLL file (NER)")
    p.add_argument("--copies", type=int, default=20, help="augmented copies per example, N (default 20)")
    p.add_argument("--probability", type=float, default=0.4, help="chance a word is replaced, p_t (default 0.4)")
    p.add_argument("--candidates", type=int, default=15, help="substitutes per word, K (default 15)")
    p.add_argument("--context", type=int, default=128,
                   help="tokens the masked LM sees around each word of a longer text (default 128)")
    p.add_argument("--seed", type=int, default=0)
    _record_fields(p)
    p.set_defaults(run=run_augment)


def run_augment(args) -> int:
    from pathlib import Path

    import torch
    from tqdm.auto import tqdm

    from alambic.tasks.augment import AugmentConfig, Substitutes, augment_examples, write_examples
    from alambic.tasks.data import read_task_data
    from alambic.teachers import load_model

    cfg = AugmentConfig(copies=args.copies, probability=args.probability, candidates=args.candidates, seed=args.seed,
                        context=args.context)
    cfg.validate()
    out = Path(args.out)
    if out.is_dir():
        raise AlambicError(f"--out {out} is a folder: give a file name (e.g. {out / 'augmented.jsonl'})")
    examples = read_task_data(args.task, args.data, text_field=args.text_field, pair_field=args.pair_field,
                              label_field=args.label_field)
    model, tokenizer = load_model(args.model)
    if torch.cuda.is_available():
        model = model.cuda()
    substitutes = Substitutes(model, tokenizer, cfg.candidates, cfg.batch_size, cfg.context)
    source = "masked-LM predictions and embedding neighbours" if substitutes.uses_mlm else "embedding neighbours only"
    print(f"{len(examples)} examples, {cfg.copies} copies each, substitutes from {source} of {args.model}")
    with tqdm(total=len(examples), unit="example", desc="augment") as bar:
        augmented = augment_examples(args.task, examples, substitutes, cfg, progress=lambda n: bar.update(1))
    write_examples(args.task, augmented, out)
    print(f"{len(augmented)} examples written to {out}")
    return 0


# --- eval-task ----------------------------------------------------------------------------------------------------

def add_eval_task(sub) -> None:
    p = sub.add_parser("eval-task", help="task metrics of models: accuracy / macro-F1, entity F1, SQuAD EM / F1",
                       description="Evaluate task models on the same data: accuracy and macro-F1 (classification), "
                       "entity-level precision / recall / F1 (NER, IOB2), exact match and F1 (SQuAD, percent).")
    p.add_argument("models", nargs="+", metavar="MODEL", help="fine-tuned task models (folders, or run folders)")
    p.add_argument("--task", required=True, choices=TASK_CHOICES)
    p.add_argument("--data", required=True, metavar="FILE", help=FORMATS)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _data_options(p)
    p.set_defaults(run=run_eval_task)


def run_eval_task(args) -> int:
    from alambic.tasks.workflow import evaluate_models

    rows = evaluate_models(args.task, args.models, args.data, _data(args))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    names = [k for k in rows[0] if k not in ("model", "parameters", "examples")]
    header = ["model", "params (M)", *names, "examples"]
    lines = [[r["model"], f"{r['parameters'] / 1e6:.1f}", *(f"{r[n]:.4f}" for n in names), str(r["examples"])]
             for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    for cells in [header, ["-" * w for w in widths], *lines]:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))))
    return 0


__all__ = ["AlambicError", "add_augment", "add_distill_task", "add_eval_task", "add_finetune"]
