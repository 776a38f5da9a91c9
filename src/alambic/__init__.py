"""alambic: knowledge distillation for transformer language models.

The verbs of the ``alambic`` command as Python functions, taking the same configuration objects and returning the
models and figures (imported on first use, so ``import alambic`` stays light)::

    import alambic

    cfg = alambic.load_config(overrides=[{"teacher": "smollm2-135m", "out": "runs/nb",
                                          "data": {"train": ["bbc-news:train"]}, "training": {"max_steps": 20}}])
    result = alambic.distill(cfg)            # DistillResult: run_dir, student_dir, parameters, last metrics
"""

import importlib

__version__ = "0.1.0"

_API = {
    "load_config": "alambic.config", "DistillConfig": "alambic.config", "TrainingConfig": "alambic.config",
    "distill": "alambic.workflows.distill", "finetune": "alambic.workflows.finetune",
    "distill_task": "alambic.workflows.distill_task", "init_student": "alambic.students",
    "save_student": "alambic.students", "load_teacher": "alambic.teachers", "load_model": "alambic.teachers",
    "evaluate_lm": "alambic.evaluation.lm", "heldout_batches": "alambic.data.pipeline",
    "build_report": "alambic.evaluation.report", "ReportSettings": "alambic.evaluation.report",
    "write_report": "alambic.evaluation.report", "evaluate_models": "alambic.tasks.workflow",
    "generate": "alambic.workflows.generate",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'alambic' has no attribute {name!r}")
