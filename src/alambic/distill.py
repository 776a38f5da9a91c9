"""General distillation, end to end: check inputs, load teacher, build student, train, export.

Cheap checks (paths, names, layer specs) come first so a mistake is reported before a teacher loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from alambic.config import DistillConfig
from alambic.data.pipeline import heldout_batches, training_batches
from alambic.data.sources import describe_sources
from alambic.engine.checkpoint import latest_checkpoint
from alambic.engine.loop import make_accelerator, train
from alambic.errors import AlambicError
from alambic.evaluation.lm import evaluate_lm
from alambic.modeling import has_lm_head, lm_body, model_kind, num_layers
from alambic.recipes.distilbert import DistilBERTRecipe
from alambic.students import count_parameters, init_student, parse_layer_spec, save_student
from alambic.teachers import check_same_vocabulary, load_model, load_teacher, resolve_model_path


@dataclass
class DistillResult:
    run_dir: Path
    student_dir: Path
    teacher_parameters: int
    student_parameters: int
    metrics: dict


def _check_inputs(cfg: DistillConfig, resume: bool) -> None:
    describe_sources(cfg.data.train)
    if cfg.data.eval:
        describe_sources(cfg.data.eval)
    teacher_dir = resolve_model_path(cfg.teacher)
    if cfg.student.init:
        resolve_model_path(cfg.student.init)
    else:
        from transformers import AutoConfig

        parse_layer_spec(cfg.student.layers, num_layers(AutoConfig.from_pretrained(teacher_dir)))
    run_dir = Path(cfg.out)
    if run_dir.exists() and not run_dir.is_dir():
        raise AlambicError(f"--out {run_dir} is a file; give a folder for the run")
    if not resume and latest_checkpoint(run_dir) is not None:
        raise AlambicError(
            f"{run_dir} already holds a run with checkpoints: pass --resume to continue it, or choose another --out"
        )


def _check_teacher_gives_soft_targets(cfg: DistillConfig, teacher) -> None:
    if cfg.loss.alpha_kd > 0 and not has_lm_head(teacher):
        raise AlambicError(
            f"teacher {cfg.teacher!r} has no language-model head, so it gives no soft targets: "
            "set loss.alpha_kd=0 to distil its hidden states only (cosine + the student's own MLM loss)"
        )


def distill(cfg: DistillConfig, *, resume: bool = False, progress: bool = True) -> DistillResult:
    cfg.validate()
    _check_inputs(cfg, resume)
    run_dir = Path(cfg.out)
    accelerator = make_accelerator(cfg.training)
    say = accelerator.print

    teacher, tokenizer = load_teacher(cfg.teacher)
    _check_teacher_gives_soft_targets(cfg, teacher)
    kind = model_kind(teacher)
    torch.manual_seed(cfg.training.seed)
    if cfg.student.init:
        student, student_tokenizer = load_model(cfg.student.init, kind=kind, for_training=True)
        check_same_vocabulary(tokenizer, student_tokenizer, teacher.config, student.config)
    else:
        built = init_student(
            teacher,
            layers=cfg.student.layers,
            hidden_size=cfg.student.hidden_size,
            intermediate_size=cfg.student.intermediate_size,
            num_heads=cfg.student.num_heads,
            seed=cfg.training.seed,
        )
        say(built.summary())
        student = built.model
    if cfg.student.save_init and accelerator.is_main_process and not resume:
        save_student(student, tokenizer, run_dir / "student-init")
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")

    with accelerator.main_process_first():  # one process tokenises, the others read its cache
        batches = training_batches(
            cfg.data.train, tokenizer, kind, cfg.data, cfg.loss, cfg.training.batch_size, cfg.training.seed
        )
        held_out = heldout_batches(cfg.data.eval, tokenizer, kind, cfg.data, cfg.training.batch_size) if cfg.data.eval else None
    evaluate = (lambda model: evaluate_lm(model, held_out)) if held_out else None

    if accelerator.mixed_precision == "bf16":
        teacher = teacher.to(torch.bfloat16)
    recipe = DistilBERTRecipe(teacher.to(accelerator.device), student, cfg.loss)
    if cfg.training.compile:
        # Compile the transformer bodies in place: the modules (and the exported state dict) stay the same.
        for model in (student, teacher):
            lm_body(model).compile()
    result = train(
        recipe, batches, cfg.training, run_dir,
        accelerator=accelerator, tokenizer=tokenizer, resume=resume, evaluate=evaluate, progress=progress,
    )
    student_dir = run_dir / "student"
    if accelerator.is_main_process:
        save_student(accelerator.unwrap_model(student), tokenizer, student_dir, overwrite=True)
        say(f"student written to {student_dir}")
    accelerator.wait_for_everyone()
    return DistillResult(run_dir, student_dir, count_parameters(teacher), count_parameters(student), result.metrics)
