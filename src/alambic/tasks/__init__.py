"""Task distillation: classification, NER and extractive QA from the user's own files (docs/tasks.md)."""

from alambic.tasks.data import (TASKS, ClassificationExample, QAExample, TokenExample, check_labels, holdout_split,
                                label_list, read_conll, read_squad, read_task_data)
from alambic.tasks.evaluate import MAIN_METRIC, evaluate_task, predict
from alambic.tasks.features import Feature, TaskBatches, collate, encode
from alambic.tasks.models import head_task, load_task_model, model_labels, task_logits

__all__ = [
    "MAIN_METRIC", "TASKS", "ClassificationExample", "Feature", "QAExample", "TaskBatches", "TokenExample",
    "check_labels", "collate", "encode", "evaluate_task", "head_task", "holdout_split", "label_list",
    "load_task_model", "model_labels", "predict", "read_conll", "read_squad", "read_task_data", "task_logits",
]
