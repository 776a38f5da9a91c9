"""Fine-tune a (pre-trained or distilled) model on a task: the way to make a task teacher, and the no-teacher baseline
a distilled student is compared with. Hard labels only, on the same engine as distillation; the best model by the
validation metric is kept in ``OUT/best`` (with its label map). Encoders take classification, NER or extractive QA
(:func:`finetune`); decoders take chat data or raw text (:func:`finetune_decoder`)."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list

from alambic.engine.checkpoint import save_model_folder
from alambic.engine.loop import make_accelerator, stop_everywhere, train
from alambic.engine.run_folder import locked_run
from alambic.errors import AlambicError, did_you_mean
from alambic.recipes.task import TaskLossConfig, TaskRecipe
from alambic.students import count_parameters
from alambic.tasks.features import TaskBatches
from alambic.tasks.models import load_task_model
from alambic.teachers import resolve_model_path
from alambic.tasks.workflow import (DataOptions, check_run_folder, prepare_task_data, task_training_config,
                                    validation_callback, write_summary)


@locked_run(lambda arguments: arguments["out"])
def finetune(task: str, model: str, train_data, out, *, validation=None, training=None, data: DataOptions = None,
             resume: bool = False, progress: bool = True, log=print) -> dict:
    """Fine-tune ``model`` on ``train_data``; returns the summary written to ``OUT/task.json``."""
    from transformers import AutoTokenizer

    out = Path(out)
    data = data or DataOptions()
    training = training or task_training_config(task)
    check_run_folder(out, resume)
    accelerator, precision = make_accelerator(training)
    say = log if accelerator.is_main_process else _silent
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model))
    prepared = prepare_task_data(task, train_data, validation, tokenizer, data, seed=training.seed)
    say(prepared.describe())
    torch.manual_seed(training.seed)  # the fresh task head
    student, tokenizer, _ = load_task_model(model, task, prepared.labels or None, role="model")
    recipe = TaskRecipe(None, student, task, TaskLossConfig(alpha_kd=0.0, alpha_ce=1.0))
    batches = TaskBatches(task, prepared.train_features, tokenizer, training.batch_size, training.seed)
    result = train(recipe, batches, training, out, accelerator=accelerator, precision=precision, tokenizer=tokenizer,
                   resume=resume, progress=progress, evaluate=validation_callback(prepared, tokenizer, data),
                   label="finetune")
    name = training.best_metric
    summary = {"task": task, "model": str(model), "labels": prepared.labels, "steps": result.step,
               "parameters": count_parameters(student), f"best_validation_{name}": result.metrics.get(
                   f"eval/best_{name}"), "final_validation": {k[5:]: v for k, v in result.metrics.items()
                                                              if k.startswith("eval/") and "best_" not in k},
               "best_model": str(out / "best"), "last_model": str(out / "student")}
    # the last step's model; OUT/best: the best validated
    _save(accelerator, result.student or student, tokenizer, out, summary)
    return summary


def _silent(*_lines) -> None:
    """The log of every process but the main one: under a launcher, each line is said once."""


def _save(accelerator, model, tokenizer, out: Path, summary: dict) -> None:
    """The last step's model in ``OUT/student`` and the run's summary in ``OUT/task.json``, written by one process."""
    if accelerator.is_main_process:
        save_model_folder(model, tokenizer, out / "student")
        write_summary(out, summary)
    accelerator.wait_for_everyone()


def _held_out_split(accelerator, task: str, train_specs: list, out: Path, text_field: str):
    """(training sources, validation sources) when no validation data is given: a stable 10% of the conversations
    or documents held out, written under ``OUT/data`` by the main process alone; the others take its paths. A problem
    it meets (too few examples, a bad file) stops every process with its one line."""
    from alambic.data.chat import read_chat, split_chat
    from alambic.data.sources import hold_out_documents

    split, problem = [None], None
    if accelerator.is_main_process:
        try:
            split = [split_chat(read_chat(train_specs, need_response=True), out / "data") if task == "chat"
                     else hold_out_documents(train_specs, out / "data", text_field=text_field)]
        except AlambicError as error:
            problem = str(error)
    stop_everywhere(accelerator, problem)
    if accelerator.num_processes > 1:
        broadcast_object_list(split)
    return split[0]


@locked_run(lambda arguments: arguments["out"])
def finetune_decoder(task: str, model: str, train_data, out, *, validation=None, training=None, max_length: int = 512,
                     text_field: str = "text", resume: bool = False, progress: bool = True, log=print) -> dict:
    """Next-token cross-entropy fine-tuning of a decoder, on the distillation engine; the model with the lowest
    validation perplexity is kept in ``OUT/best``.

    - ``task="chat"``: supervised fine-tuning on conversations, the loss on the assistant tokens only (the
      completion-only loss of :mod:`alambic.data.chat`). It makes a task teacher out of an instruct model, and is the
      no-teacher baseline of a distilled chat student. Without ``validation`` a stable 10% of the conversations (by
      content hash) is held out.
    - ``task="lm"``: domain adaptation on raw text (packed blocks of ``max_length`` tokens), so that a teacher knows
      the student's text before it teaches. Without ``validation`` a stable 10% of the documents is held out.
    """
    from alambic.config import DECODER_TASK_FORMATS, DataConfig
    from alambic.data.pipeline import heldout_batches, training_batches
    from alambic.data.sources import as_specs
    from alambic.evaluation.lm import evaluate_lm
    from alambic.modeling import model_kind
    from alambic.recipes.distilbert import DistilBERTLossConfig, DistilBERTRecipe
    from alambic.teachers import load_model

    if task not in DECODER_TASK_FORMATS:
        raise AlambicError(f"a decoder fine-tunes on chat or lm data, not {task!r}"
                           f"{did_you_mean(task, DECODER_TASK_FORMATS)}")
    out = Path(out)
    training = training or task_training_config(task)
    check_run_folder(out, resume)
    student, tokenizer = load_model(model, for_training=True)
    if model_kind(student.config) != "causal":
        raise AlambicError(f"{model} is an encoder: --task {task} fine-tunes decoders (causal LMs); fine-tune an "
                           "encoder on classification, ner or qa")
    accelerator, precision = make_accelerator(training)
    say = log if accelerator.is_main_process else _silent
    train_specs = as_specs(train_data)
    if validation is None:
        train_specs, validation = _held_out_split(accelerator, task, train_specs, out, text_field)
    validation = as_specs(validation)
    data = DataConfig(train=train_specs, eval=validation, format=DECODER_TASK_FORMATS[task], max_length=max_length,
                      text_field=text_field)
    data.validate()
    torch.manual_seed(training.seed)
    batches = training_batches(train_specs, tokenizer, "causal", data, None, training.batch_size, training.seed)
    say(batches.examples.describe())
    held_out = heldout_batches(validation, tokenizer, "causal", data, batch_size=training.batch_size)
    recipe = DistilBERTRecipe(None, student, DistilBERTLossConfig(alpha_kd=0.0, alpha_lm=1.0, alpha_cos=0.0))
    result = train(recipe, batches, training, out, accelerator=accelerator, precision=precision, tokenizer=tokenizer,
                   resume=resume, progress=progress, evaluate=lambda m: evaluate_lm(m, held_out), label="finetune")
    summary = {"task": task, "model": str(model), "steps": result.step, "parameters": count_parameters(student),
               "best_validation_perplexity": result.metrics.get("eval/best_perplexity"),
               "final_validation": {k[5:]: v for k, v in result.metrics.items()
                                    if k.startswith("eval/") and "best_" not in k},
               "best_model": str(out / "best"), "last_model": str(out / "student")}
    _save(accelerator, result.student or student, tokenizer, out, summary)
    return summary
