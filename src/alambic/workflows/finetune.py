"""Fine-tune a (pre-trained or distilled) encoder on a task: the way to make a task teacher, and the no-teacher
baseline a distilled student is compared with. Hard labels only, on the same engine as distillation; the best model
by the validation metric is kept in ``OUT/best`` (with its label map)."""

from __future__ import annotations

from pathlib import Path

import torch

from alambic.engine.checkpoint import save_model_folder
from alambic.engine.loop import train
from alambic.engine.run_folder import locked_run
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
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model))
    prepared = prepare_task_data(task, train_data, validation, tokenizer, data, seed=training.seed)
    log(prepared.describe())
    torch.manual_seed(training.seed)  # the fresh task head
    student, tokenizer, _ = load_task_model(model, task, prepared.labels or None, role="model")
    recipe = TaskRecipe(None, student, task, TaskLossConfig(alpha_kd=0.0, alpha_ce=1.0))
    batches = TaskBatches(task, prepared.train_features, tokenizer, training.batch_size, training.seed)
    result = train(recipe, batches, training, out, tokenizer=tokenizer, resume=resume, progress=progress,
                   evaluate=validation_callback(prepared, tokenizer, data))
    save_model_folder(student, tokenizer, out / "student")  # the last step's model; OUT/best: the best validated
    name = training.best_metric
    summary = {"task": task, "model": str(model), "labels": prepared.labels, "steps": result.step,
               "parameters": count_parameters(student), f"best_validation_{name}": result.metrics.get(
                   f"eval/best_{name}"), "final_validation": {k[5:]: v for k, v in result.metrics.items()
                                                              if k.startswith("eval/") and "best_" not in k},
               "best_model": str(out / "best"), "last_model": str(out / "student")}
    write_summary(out, summary)
    return summary
