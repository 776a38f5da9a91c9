"""The verbs end to end, one module each, on the components below them: distill (general distillation),
finetune (a task teacher, or the no-teacher baseline) and distill_task (task distillation, one stage or two).
The CLI and the top-level Python API (``alambic.distill``, ...) are thin layers over these."""
