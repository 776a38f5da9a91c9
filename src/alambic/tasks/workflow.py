"""What fine-tuning and task distillation share: reading and splitting the data, features, the training defaults,
and the validation callback that keeps the best model."""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

from alambic.cache import atomic_write_text
from alambic.config import DECODER_TASK_FORMATS, TrainingConfig
from alambic.engine.checkpoint import latest_checkpoint
from alambic.errors import AlambicError
from alambic.ranges import POSITIVE, PROBABILITY, Range, check_ranges
from alambic.tasks.data import check_labels, check_task, holdout_split, label_list, read_task_data
from alambic.tasks.data import unlabelled as unlabelled_example
from alambic.tasks.evaluate import MAIN_METRIC, evaluate_task
from alambic.tasks.features import encode


@dataclass
class DataOptions:
    """How task files are read and tokenised."""

    max_length: int = 128
    doc_stride: int = 32
    text_field: str = "text"
    pair_field: str = "text_pair"
    label_field: str = "label"
    holdout_fraction: float = 0.1
    eval_batch_size: int = 32
    qa_metric: str = "squad"
    """QA exact match / F1: squad (SQuAD v1.1, word F1) or korquad (KorQuAD 1.0, character F1)."""

    RANGES: typing.ClassVar[dict] = {"max_length": Range(8), "doc_stride": POSITIVE, "holdout_fraction": PROBABILITY,
                                     "eval_batch_size": POSITIVE}


@dataclass
class TaskData:
    task: str
    labels: list[str]
    train_examples: list
    validation_examples: list
    train_features: list = field(default_factory=list)
    validation_features: list = field(default_factory=list)
    held_out: bool = False

    def describe(self) -> str:
        source = "held out from train (seeded, stratified)" if self.held_out else "from --validation"
        kinds = f", {len(self.labels)} labels" if self.labels else ""
        missing = sum(not e.labelled for e in self.train_examples)
        mix = f": {len(self.train_examples) - missing} labelled, {missing} unlabelled (soft targets only)" \
            if missing else ""
        return (f"{self.task}: {len(self.train_examples)} training examples ({len(self.train_features)} features)"
                f"{mix}, {len(self.validation_examples)} validation examples {source}{kinds}")


def read_examples(task: str, path, options: DataOptions, *, allow_unlabelled: bool = False) -> list:
    return read_task_data(task, path, text_field=options.text_field, pair_field=options.pair_field,
                          label_field=options.label_field, allow_unlabelled=allow_unlabelled)


def prepare_task_data(task: str, train, validation, tokenizer, options: DataOptions, *, seed: int,
                      labels: list[str] | None = None, labels_from: str = "", unlabelled=(),
                      allow_unlabelled: bool = False) -> TaskData:
    """Read ``train`` (and ``validation``, else hold out ``options.holdout_fraction`` of train's labelled examples
    with ``seed``), check the labels and tokenise. ``labels``: a fixed label set (a teacher's), which the data must
    fit. ``unlabelled``: transfer-set files whose examples are trained on without their labels, if they have any;
    ``allow_unlabelled``: ``train`` may mix labelled and unlabelled examples (task distillation)."""
    check_ranges(options)
    check_task(task)
    examples = read_examples(task, train, options, allow_unlabelled=allow_unlabelled or bool(unlabelled))
    transfer = []
    for path in unlabelled:
        part = [unlabelled_example(e) for e in read_examples(task, path, options, allow_unlabelled=True)]
        check_encodable(part, path, tokenizer, task)
        transfer += part
    if labels is None:
        labels = label_list(task, examples)
    else:
        check_labels(task, examples, labels, str(train), labels_from)
    if validation:
        held = read_examples(task, validation, options)
        check_labels(task, held, labels, str(validation), labels_from or "the training data")
        train_examples, held_out = examples, False
    else:
        train_examples, held = holdout_split(task, examples, options.holdout_fraction, seed)
        held_out = True
    data = TaskData(task, list(labels), train_examples + transfer, held, held_out=held_out)
    data.train_features = encode(task, data.train_examples, tokenizer, labels, max_length=options.max_length,
                                 doc_stride=options.doc_stride, training=True)
    data.validation_features = encode(task, held, tokenizer, labels, max_length=options.max_length,
                                      doc_stride=options.doc_stride)
    return data


MAX_UNKNOWN_SHARE = 0.5
"""A transfer set with at least this share of unknown tokens is refused (DistilBERT's reference dropped sequences
that were >= 50% unknown): the teacher's soft targets on [UNK] carry nothing of the text."""


def check_encodable(examples: list, path, tokenizer, task: str, sample: int = 200) -> None:
    """Refuse a transfer set the tokenizer cannot represent (e.g. a script its vocabulary lacks)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or not examples:
        return
    texts = [e.text if task == "classification" else " ".join(e.words) if task == "ner" else e.context
             for e in examples[:sample]]
    ids = [i for encoded in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in encoded]
    share = sum(i == unk for i in ids) / max(len(ids), 1)
    if share >= MAX_UNKNOWN_SHARE:
        raise AlambicError(f"{path}: {100 * share:.0f}% of its tokens are unknown ({tokenizer.unk_token}) to the "
                           "teacher's tokenizer, so the teacher cannot read it: give a transfer set in a language and "
                           "script the tokenizer covers")


def task_training_config(task: str, **overrides) -> TrainingConfig:
    """Fine-tuning defaults (AdamW 1e-4, betas 0.9 / 0.999, warm-up 10%, weight decay 0.01, clip 1, batch 16,
    validation every 50 steps keeping the best model by the task's main metric)."""
    decoder = task in DECODER_TASK_FORMATS  # next-token fine-tuning of a decoder: the lowest perplexity is the best
    values = dict(max_steps=500, batch_size=8 if decoder else 16, lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
                  weight_decay=0.01, warmup_ratio=0.1, grad_clip=1.0, eval_every=50,
                  best_metric="perplexity" if decoder else MAIN_METRIC[task],
                  best_metric_mode="min" if decoder else "max",
                  save_every=10**9, log_every=10)
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = TrainingConfig(**values)
    cfg.validate()
    return cfg


def validation_callback(data: TaskData, tokenizer, options: DataOptions):
    def evaluate(model) -> dict:
        return evaluate_task(model, data.task, data.validation_examples, data.validation_features, tokenizer,
                             data.labels, options.eval_batch_size, options.qa_metric)

    return evaluate


def check_run_folder(out: Path, resume: bool) -> None:
    if not resume and (latest_checkpoint(out) is not None or any(out.glob("stage-*/checkpoints/latest"))):
        raise AlambicError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")


def write_summary(out: Path, summary: dict) -> None:
    atomic_write_text(Path(out) / "task.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")


def evaluate_models(task: str, models: list[str], data_path, options: DataOptions) -> list[dict]:
    """One row per model (a fine-tuned task model or a distilled student): its parameters and task metrics on the
    examples of ``data_path``."""
    from alambic.tasks.models import load_evaluated_model, model_labels

    examples = read_examples(task, data_path, options)
    rows = []
    for spec in models:
        model, tokenizer, parameters = load_evaluated_model(spec, task)
        labels = model_labels(model) if task != "qa" else []
        check_labels(task, examples, labels, str(data_path), f"the labels of model {spec}")
        features = encode(task, examples, tokenizer, labels, max_length=options.max_length,
                          doc_stride=options.doc_stride)
        metrics = evaluate_task(model, task, examples, features, tokenizer, labels, options.eval_batch_size,
                                options.qa_metric)
        rows.append({"model": spec, "parameters": parameters, "examples": len(examples), **metrics})
    return rows
