"""Task distillation end to end: a fine-tuned teacher, a student (a folder, or built from the teacher), one or two
stages, the best student by the validation metric in ``OUT/best``.

Stages (methods.md sections 4 and 5):
- ``pred``: prediction-layer distillation only (``L = a_ce * L_hard + a_kd * L_kd``);
- ``trm,pred``: TinyBERT's task distillation / the Korean RoBERTa study: first the intermediate layers (embedding,
  hidden-state and attention MSE through the TinyBERT recipe), then the prediction layer; each stage is its own run
  folder (``OUT/stage-1-trm``, ``OUT/stage-2-pred``), so ``--resume`` continues whichever was interrupted;
- ``joint``: intermediate and prediction losses together.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from alambic.cache import atomic_write_text
from alambic.engine.checkpoint import save_model_folder
from alambic.engine.loop import train
from alambic.engine.run_folder import locked_run
from alambic.errors import AlambicError
from alambic.modeling import num_layers
from alambic.recipes.task import TaskLossConfig, TaskRecipe
from alambic.recipes.tinybert import TinyBERTLossConfig, TinyBERTRecipe
from alambic.search import SEARCH_FILE, search_shape, searched_shape
from alambic.students import count_parameters, init_student
from alambic.students.layer_map import layers_record, recorded_layers, resolve_layer_map
from alambic.tasks.cache import TeacherLogitCache, teacher_fingerprint
from alambic.tasks.features import TaskBatches, features_fingerprint
from alambic.tasks.models import load_task_model, model_labels
from alambic.tasks.workflow import (DataOptions, check_run_folder, prepare_task_data, task_training_config,
                                    validation_callback, write_summary)
from alambic.teachers import check_same_vocabulary

CALIBRATION_BATCHES = 16
"""Training batches (the first of the seeded order) that width pruning measures the teacher on."""
STAGES = {"pred": ("pred",), "trm,pred": ("trm", "pred"), "joint": ("joint",), "trm": ("trm",)}


def parse_stages(text: str) -> tuple[str, ...]:
    key = ",".join(part.strip() for part in str(text).split(","))
    if key not in STAGES:
        raise AlambicError(f"--stages {text!r} is not one of: pred, trm,pred, joint")
    return STAGES[key]


@locked_run(lambda arguments: arguments["out"])
def distill_task(task: str, teacher: str, train_data, out, *, student: str | None = None,
                 student_layers: str | None = None, hidden_size: int | None = None,
                 intermediate_size: int | None = None, num_heads: int | None = None, validation=None,
                 stages: str = "pred", loss: TaskLossConfig | None = None,
                 intermediate: TinyBERTLossConfig | None = None, training=None, trm_steps: int | None = None,
                 trm_lr: float | None = None, data: DataOptions | None = None, teacher_cache: bool = True,
                 unlabelled=(), width_init: str = "importance", resume: bool = False, progress: bool = True,
                 keep_stages: bool = False, budget=None, search_seconds: float | None = None,
                 timing_cache=None, search_steps: int = 0, log=print) -> dict:
    """Distil the fine-tuned ``teacher`` into a student on ``task``; returns the summary in ``OUT/task.json``.

    ``train_data`` may mix labelled and unlabelled examples; ``unlabelled``: transfer-set files (the teacher's soft
    targets are their only loss). A narrower student built from ``student_layers`` is sliced from the teacher by
    importance measured on the training features (``width_init="random"``: fresh weights)."""

    out, plan = Path(out), parse_stages(stages)
    loss = (loss or TaskLossConfig()).validate()
    data = data or DataOptions()
    training = training or task_training_config(task)
    if sum(x is not None for x in (student, student_layers, budget)) != 1:
        raise AlambicError("give the student as one of: a folder (--student), teacher layers to copy "
                           "(--student-layers, e.g. linspace:3), or a budget the search meets (--target-speedup X)")
    if student_layers is None and any(v is not None for v in (hidden_size, intermediate_size, num_heads)):
        raise AlambicError("--hidden-size, --intermediate-size and --num-heads build a student with "
                           "--student-layers; drop them or give --student-layers")
    check_run_folder(out, resume)
    teacher_model, tokenizer, teacher_path = load_task_model(teacher, task, role="teacher", need_head=True)
    labels = model_labels(teacher_model) if task != "qa" else []
    prepared = prepare_task_data(task, train_data, validation, tokenizer, data, seed=training.seed, labels=labels,
                                 labels_from=f"the labels of teacher {teacher}", unlabelled=list(unlabelled or ()),
                                 allow_unlabelled=True)
    log(prepared.describe())
    if loss.alpha_kd == 0 and any(not f.labelled for f in prepared.train_features):
        raise AlambicError("unlabelled training examples learn from the teacher's soft targets only, but alpha_kd "
                           "is 0: raise --alpha-kd or drop the unlabelled examples")
    batches = TaskBatches(task, prepared.train_features, tokenizer, training.batch_size, training.seed)

    torch.manual_seed(training.seed)
    card = None  # what a student built here kept of its teacher (layers, width pruning), for OUT/best/README.md
    search_json = None  # a searched shape's candidates (this run's search, or the --student's), for OUT/best
    if budget is not None:
        calibration = [batches(i) for i in range(min(batches.per_epoch, CALIBRATION_BATCHES))]
        search, built = search_shape(teacher_model, budget, calibration, max_seconds=search_seconds,
                                     timing_cache=timing_cache, search_steps=search_steps, seed=training.seed,
                                     log=log, progress=progress)
        for line in search.table():
            log(line)
        log(search.summary())
        student_model, card, search_json = built.model, built.model_card(str(teacher)), search.to_json()
        source = built.source_layers()
        log(built.summary())
    elif student_layers is not None:
        narrower = any(v is not None for v in (hidden_size, intermediate_size, num_heads))
        calibration = None
        if narrower and width_init == "importance":
            calibration = [batches(i) for i in range(min(batches.per_epoch, CALIBRATION_BATCHES))]
        built = init_student(teacher_model, layers=student_layers, hidden_size=hidden_size,
                             intermediate_size=intermediate_size, num_heads=num_heads, seed=training.seed,
                             calibration_data=calibration, width_init=width_init)
        student_model = built.model
        card = built.model_card(str(teacher))
        source = built.source_layers()
        log(built.summary())
    else:
        student_model, student_tokenizer, student_path = load_task_model(student, task, labels or None,
                                                                         role="student")
        search_json = searched_shape(student)
        source = recorded_layers(student_path)
        check_same_vocabulary(tokenizer, student_tokenizer, teacher_model.config, student_model.config)

    cache = None
    if teacher_cache and loss.alpha_kd > 0 and any(stage != "trm" for stage in plan):
        key = f"{teacher_fingerprint(teacher_path)}-{task}-{features_fingerprint(prepared.train_features)}"
        cache = TeacherLogitCache(task, key)
    tinybert = replace(intermediate or TinyBERTLossConfig(), alpha_prediction=0.0)
    tinybert.validate()
    if any(stage in ("trm", "joint") for stage in plan):
        layer_map, note = resolve_layer_map(tinybert.layer_map, source, num_layers(student_model.config),
                                            num_layers(teacher_model.config))
        tinybert = replace(tinybert, layer_map=layer_map)
        if note:
            log(note)
    evaluate = validation_callback(prepared, tokenizer, data)

    name = training.best_metric
    best, run_dir = None, out
    for number, stage in enumerate(plan, 1):
        run_dir = out if len(plan) == 1 else out / f"stage-{number}-{stage}"
        done = run_dir / "stage-done"
        if resume and done.is_file():
            log(f"stage {number} ({stage}) already finished: loading its student")
            trained = type(student_model).from_pretrained(run_dir / "student", dtype=torch.float32)
            student_model.load_state_dict(trained.state_dict())
            best = json.loads(done.read_text(encoding="utf-8")).get("best")
            continue
        stage_resume = resume and (run_dir / "checkpoints" / "latest").is_file()
        log(f"stage {number}/{len(plan)}: {stage}")
        if stage == "trm":
            cfg = replace(training, eval_every=0, best_metric=None, early_stopping_patience=0,
                          max_steps=trm_steps or training.max_steps, lr=trm_lr or training.lr)
            recipe = TinyBERTRecipe(teacher_model, student_model, tinybert)
            train(recipe, batches, cfg, run_dir, tokenizer=tokenizer, resume=stage_resume, progress=progress,
                  label=f"distill-task {stage}")
            best = None
        else:
            extra = TinyBERTRecipe(teacher_model, student_model, tinybert) if stage == "joint" else None
            recipe = TaskRecipe(teacher_model, student_model, task, loss, cache=cache, intermediate=extra)
            try:
                result = train(recipe, batches, training, run_dir, tokenizer=tokenizer, resume=stage_resume,
                               progress=progress, evaluate=evaluate, label=f"distill-task {stage}")
            finally:
                if cache is not None:
                    cache.flush()
            best = result.metrics.get(f"eval/best_{name}")
        student_model.save_pretrained(run_dir / "student")  # what the next stage (or a resumed run) starts from
        done.write_text(json.dumps({"best": best}) + "\n", encoding="utf-8")
        if number < len(plan) and not keep_stages:
            # the next stage starts from OUT/stage-N/student: this stage's checkpoints and best model are copies
            # nothing reads again (a resumed run skips a finished stage)
            for redundant in ("checkpoints", "best"):
                shutil.rmtree(run_dir / redundant, ignore_errors=True)
    if len(plan) > 1 and (run_dir / "best").is_dir():
        if (out / "best").exists():
            shutil.rmtree(out / "best")
        shutil.copytree(run_dir / "best", out / "best")
    save_model_folder(student_model, tokenizer, out / "student")  # the last step's student, as distill exports it
    # beside the last and the best student: how it was built (card, search) and the teacher layers it was copied
    # from, so that a later stage can pair layers with their sources (copied)
    extras = {**layers_record(source), **({SEARCH_FILE: search_json} if search_json else {}),
              **({"README.md": card} if card else {})}
    for folder in (out / "student", out / "best"):
        if folder.is_dir():
            for file_name, text in extras.items():
                atomic_write_text(folder / file_name, text)
    summary = {"task": task, "teacher": str(teacher), "student": str(student or (f"layers {student_layers}" if student_layers else f"searched: {budget.describe()}")),
               "stages": list(plan), "labels": labels, "loss": vars(loss),
               "training_examples": {"labelled": sum(e.labelled for e in prepared.train_examples),
                                     "unlabelled": sum(not e.labelled for e in prepared.train_examples)},
               "teacher_parameters": count_parameters(teacher_model),
               "student_parameters": count_parameters(student_model),
               f"best_validation_{name}": best,
               "teacher_cache": None if cache is None else {"file": str(cache.path), "hits": cache.hits,
                                                            "misses": cache.misses},
               "best_model": str(out / "best"), "last_model": str(out / "student")}
    write_summary(out, summary)
    return summary
