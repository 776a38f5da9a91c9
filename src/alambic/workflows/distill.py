"""General distillation, end to end: check inputs, load teacher, build student, train, export.

Cheap checks (paths, names, layer specs) come first so a mistake is reported before a teacher loads.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
import yaml
from accelerate.utils import broadcast_object_list
from transformers import AutoTokenizer

from alambic.config import DistillConfig
from alambic.data.on_policy import OnPolicyBatches
from alambic.data.pipeline import heldout_batches, is_chat, training_batches
from alambic.data.chat import ChatExamples, is_teacher_written
from alambic.data.collate import pad_id_of
from alambic.data.sources import describe_sources
from alambic.engine.checkpoint import finished_step, latest_checkpoint, require_checkpoints
from alambic.engine.loop import make_accelerator, train
from alambic.engine.run_folder import locked_run
from alambic.environment import is_main_process
from alambic.errors import AlambicError
from alambic.evaluation.lm import evaluate_lm
from alambic.evaluation.model_card import distillation_card, last_logged
from alambic.modeling import eos_token_ids, hidden_size, lm_body, model_kind, num_layers, vocab_size
from alambic.recipes import recipe_parts
from alambic.recipes.distilbert import resolve_kd_rows
from alambic.search import SEARCH_FILE, searched_shape
from alambic.students import count_parameters, init_student, parse_layer_spec, save_student, selection
from alambic.students.layer_map import layers_record, recorded_layers, resolve_layer_map
from alambic.offline.store import TeacherOutputs, check_cache, read_manifest
from alambic.offline.training import OfflineDistilBERTRecipe, cached_batches
from alambic.teachers import check_same_vocabulary, load_model, load_teacher, resolve_model_path


@dataclass
class DistillResult:
    run_dir: Path
    student_dir: Path
    teacher_parameters: int | None  # None: a resumed run that was already complete (nothing loaded)
    student_parameters: int | None
    metrics: dict


def _trains_on_chat(cfg: DistillConfig, cache_manifest: dict | None) -> bool:
    """Whether the run trains on chat data: an offline cache says so in its manifest, else the training data."""
    if cache_manifest is not None:
        return cache_manifest.get("chat", False)
    return bool(cfg.data.train) and is_chat(cfg.data.train, cfg.data)


def _check_inputs(cfg: DistillConfig, resume: bool) -> tuple[list[dict] | None, list[str], bool]:
    """Everything checkable before the teacher loads; returns the calibration batches of layers=auto (else None),
    lines saying which unset options took a cache's values, and whether the training data is chat data."""
    notes, manifest = [], None
    if cfg.teacher_logits:
        manifest = read_manifest(cfg.teacher_logits)
        notes += _adopt_cache_settings(cfg, manifest)
        check_cache(manifest, max_length=cfg.data.max_length, temperature=cfg.loss.temperature,
                    needs_hidden=cfg.loss.alpha_cos > 0, folder=cfg.teacher_logits)
        if not cfg.student.calibration_data and not cfg.data.train:  # layers=auto measures on the cached data
            cfg.student.calibration_data = list(manifest["data"])
    if cfg.data.train:
        describe_sources(cfg.data.train)
    if cfg.data.eval:
        describe_sources(cfg.data.eval)
    chat = _trains_on_chat(cfg, manifest)
    if cfg.on_policy.lmbda > 0 and not chat:
        raise AlambicError("on_policy.lmbda > 0 has the student answer the prompts of chat data, but the training data "
                           "is raw text: give chat records ({\"messages\": [...]} or {\"prompt\": ...} .jsonl) or set "
                           "on_policy.lmbda=0")
    if cfg.recipe == "distilbert":  # completion-only soft targets on chat data
        resolve_kd_rows(cfg.loss, chat)
    calibration = None
    if cfg.student.init:
        resolve_model_path(cfg.student.init)
    else:
        teacher_dir = resolve_model_path(cfg.teacher)
        from transformers import AutoConfig

        teacher_config = AutoConfig.from_pretrained(teacher_dir)
        if chat and model_kind(teacher_config) != "causal":
            raise AlambicError("chat data trains decoders (causal LMs); the teacher is an encoder: give raw text, "
                               "or a decoder teacher")
        n = num_layers(teacher_config)
        searched = cfg.student.budget() is not None
        if cfg.student.layers.strip().lower() == selection.DEFAULT_SPEC and not searched:  # the data is at hand
            cfg.student.layers = selection.default_layers(model_kind(teacher_config), calibration_at_hand=True)
            cfg.student.validate()
        auto = not searched and selection.parse_auto_spec(cfg.student.layers) is not None
        if auto:
            selection.check_depth(cfg.student.depth, n)
        elif not searched:
            parse_layer_spec(cfg.student.layers, n)
        if auto or searched or cfg.student.prunes():
            from transformers import AutoTokenizer

            specs = calibration_specs(cfg)
            describe_sources(specs)
            calibration = selection.calibration_batches(
                specs, AutoTokenizer.from_pretrained(teacher_dir), model_kind(teacher_config),
                max_tokens=cfg.student.calibration_tokens, max_length=cfg.data.max_length,
                text_field=cfg.data.text_field, split_documents=cfg.data.split_documents, seed=cfg.training.seed)
    run_dir = Path(cfg.out)
    if not resume and latest_checkpoint(run_dir) is not None:
        raise AlambicError(
            f"{run_dir} already holds a run with checkpoints: pass --resume to continue it, or choose another --out"
        )
    if resume:
        require_checkpoints(run_dir)
    return calibration, notes, chat


def calibration_specs(cfg: DistillConfig) -> list[str]:
    """What the teacher is measured on (layers=auto, width pruning): student.calibration_data, else the training data."""
    return list(cfg.student.calibration_data or cfg.data.train)


def _adopt_cache_settings(cfg: DistillConfig, manifest: dict) -> list[str]:
    """Options the user left unset take the cache's values (its temperature, max length and hidden-state choice);
    set ones must agree with it (``check_cache`` says so in one line). Masking options are the cache's own: its
    masks were drawn when it was made, so setting them here is refused rather than ignored."""
    masking = [f"loss.{name}" for name in ("mlm_probability", "mlm_smoothing") if cfg.is_explicit(f"loss.{name}")]
    if masking:
        raise AlambicError(f"{masking[0]} does not apply with --teacher-logits: "
                           + ("the cache's masks were drawn when it was made (cache-teacher --mlm-probability); "
                              if manifest["kind"] == "masked" else "the cache holds a decoder's outputs; ")
                           + f"drop {masking[0]}")
    adopted = []
    if not cfg.is_explicit("loss.temperature") and cfg.loss.temperature != manifest["temperature"]:
        cfg.loss.temperature = float(manifest["temperature"])
        adopted.append(f"loss.temperature={cfg.loss.temperature:g}")
    if not cfg.is_explicit("data.max_length") and cfg.data.max_length != manifest["max_length"]:
        cfg.data.max_length = int(manifest["max_length"])
        adopted.append(f"data.max_length={cfg.data.max_length}")
    if not cfg.is_explicit("loss.alpha_cos") and cfg.loss.alpha_cos > 0 and not manifest["hidden_states"]:
        cfg.loss.alpha_cos = 0.0
        adopted.append("loss.alpha_cos=0 (the cache holds no hidden states for the cosine term)")
    cfg.loss.validate()
    return [f"from the teacher cache: {', '.join(adopted)}"] if adopted else []


DECODER_LR = {"raw text": 1e-3, "chat data": 3e-4}
"""The peak learning rate of a decoder student when training.lr is unset, by training data. Chosen on validation data
over 3 seeds, never the test (docs/benchmarks.md), SmolLM2-135M -> its 15 measured layers: raw text, the triple loss,
best of 5e-4 / 1e-3 / 2e-3 by perplexity (100 steps of 4 x 128 tokens); chat data, forward KL on the answers, best of
3e-4 / 1e-3 by headline ROUGE-L (80 steps of 8 conversations; 1e-4 was behind on every measure). Encoders keep
DistilBERT's 5e-4, the config's default."""

CHAT_TEMPERATURE = {"chat data": 1.0, "teacher-written chat data": 2.0}
"""The soft targets' temperature of a decoder student on chat data when loss.temperature is unset, by whose answers
the data holds. Chosen on validation over 3 seeds (docs/benchmarks.md), the instruct benchmark at 320 steps: on gold
answers, headline ROUGE-L 0.222 +- 0.007 at T = 1 against 0.213 +- 0.008 at T = 2, topic accuracy equal; on the
teacher's own answers (`alambic generate`'s output), 0.224 +- 0.004 at T = 2 against 0.215 +- 0.004 at T = 1, topic
accuracy equal. On raw text the two tie (validation perplexity 62.2 against 62.6, within the seeds' spread), so raw
text keeps T = 2, the config's default."""

CHAT_ALPHA_COS = 0.0
"""The cosine term's weight for a decoder student on chat data when loss.alpha_cos is unset. The term aligns the
hidden states of every token, prompt included, and changed nothing measured on the instruct benchmark's validation
split (3 seeds at T = 2: headline ROUGE-L 0.214 +- 0.008 with it against 0.213 +- 0.008 without, topic accuracy 94.4
against 94.9%; 2 seeds at T = 1: 0.222 +- 0.016 against 0.224 on the same seeds, topic accuracy 92.9 against 94.5%;
docs/benchmarks.md), for 2% more CPU time; every other chat figure was measured without it."""

CHAT_WARMUP_RATIO = 0.1
"""The warm-up share of a decoder student on chat data when training.warmup_ratio is unset: the setting every chat
figure of docs/benchmarks.md was measured with (DistilBERT's 0.05, the config's default, was not compared)."""


def _fit_decoder_defaults(cfg: DistillConfig, kind: str, chat: bool, say) -> None:
    """A decoder student of the distilbert recipe (the loss these were chosen for) trains at :data:`DECODER_LR` for
    its data, and on chat data at :data:`CHAT_TEMPERATURE`, without the cosine term (:data:`CHAT_ALPHA_COS`) and with
    :data:`CHAT_WARMUP_RATIO`, each when the user left it unset (an offline cache's temperature is the cache's)."""
    if kind != "causal" or cfg.recipe != "distilbert":
        return
    data = "chat data" if chat else "raw text"
    if not cfg.is_explicit("training.lr") and cfg.training.lr != DECODER_LR[data]:
        cfg.training.lr = DECODER_LR[data]
        say(f"training.lr={cfg.training.lr:g}: the default for a decoder on {data} (chosen on validation; set "
            "training.lr or --lr for another)")
    if chat and not cfg.teacher_logits and not cfg.is_explicit("loss.temperature"):
        data = "teacher-written chat data" if is_teacher_written(cfg.data.train) else "chat data"
        cfg.loss.temperature = CHAT_TEMPERATURE[data]
        origin = " (`alambic generate`'s output)" if data != "chat data" else ""
        say(f"loss.temperature={cfg.loss.temperature:g}: the default for a decoder on {data}{origin} (chosen on "
            "validation; set loss.temperature for another)")
    if chat:
        _take_chat_default(cfg, "loss.alpha_cos", CHAT_ALPHA_COS, "the cosine term did not help on validation; ", say)
        _take_chat_default(cfg, "training.warmup_ratio", CHAT_WARMUP_RATIO, "", say)


def _take_chat_default(cfg: DistillConfig, option: str, value: float, why: str, say) -> None:
    """Set the dotted ``option`` to a decoder's chat-data default unless the user set it, saying so when it changes."""
    section, name = option.split(".")
    if cfg.is_explicit(option) or getattr(getattr(cfg, section), name) == value:
        return
    setattr(getattr(cfg, section), name, value)
    say(f"{option}={value:g}: the default for a decoder on chat data ({why}set {option} for another)")


def planned_config(cfg: DistillConfig) -> DistillConfig:
    """``cfg`` with what `distill` fits to the teacher and the data before training, found without loading a model
    (``--print-config``): the settings an offline cache fixes, a decoder's learning rate, temperature, cosine term
    and warm-up for its data, the rows the soft targets cover. (What depends on the student built, as the cosine term
    of a narrower one, is left as set.)"""
    cfg.validate()
    manifest = None
    if cfg.teacher_logits:
        manifest = read_manifest(cfg.teacher_logits)
        _adopt_cache_settings(cfg, manifest)
        kind = manifest["kind"]
    else:
        from transformers import AutoConfig

        kind = model_kind(AutoConfig.from_pretrained(resolve_model_path(cfg.teacher)))
    chat = _trains_on_chat(cfg, manifest)
    _fit_decoder_defaults(cfg, kind, chat, say=lambda _line: None)
    if cfg.recipe == "distilbert":
        resolve_kd_rows(cfg.loss, chat)
    return cfg


def _fit_cosine_term(cfg: DistillConfig, teacher_width: int, student: torch.nn.Module, say) -> None:
    """The cosine term compares hidden states, so it needs the teacher's width: a narrower student turns it off
    when the user left loss.alpha_cos unset (a set value meets the recipe's one-line refusal)."""
    width = hidden_size(student.config)
    if cfg.recipe == "distilbert" and cfg.loss.alpha_cos > 0 and width != teacher_width \
            and not cfg.is_explicit("loss.alpha_cos"):
        cfg.loss.alpha_cos = 0.0
        say(f"loss.alpha_cos=0: the cosine term needs equal widths, and the student is {width} wide, the teacher "
            f"{teacher_width}")
        cfg.loss.validate()


def _build_student(cfg: DistillConfig, teacher, calibration, accelerator):
    """``init_student`` from the config. With measured layers (``layers=auto``) on several processes, the main
    process measures and the others build the student it chose: a greedy search may stop on its time budget, so
    processes measuring on their own could disagree, and the measurement need not run N times."""
    budget = cfg.student.budget()
    if budget is not None:
        return _search_student(cfg, budget, teacher, calibration, accelerator)
    shape = dict(hidden_size=cfg.student.hidden_size, intermediate_size=cfg.student.intermediate_size,
                 num_heads=cfg.student.num_heads, token_types=cfg.student.token_types, seed=cfg.training.seed,
                 width_init=cfg.student.width_init, allow_wider=cfg.student.allow_wider)
    if calibration is None:
        return init_student(teacher, layers=cfg.student.layers, **shape)
    built, chosen = None, [None]
    if accelerator.is_main_process:
        built = init_student(teacher, layers=cfg.student.layers, depth=cfg.student.depth, calibration_data=calibration,
                             selection_budget=cfg.student.selection_budget, log=accelerator.print, **shape)
        chosen = [list(built.layers)]
    if accelerator.num_processes > 1:
        broadcast_object_list(chosen)
    if built is not None:
        return built
    return init_student(teacher, layers=chosen[0], calibration_data=calibration if cfg.student.prunes() else None,
                        **shape)


def _search_student(cfg: DistillConfig, budget, teacher, calibration, accelerator):
    """A student of the shape the search chooses for ``budget``: the main process searches (timings differ between
    processes), the others build the shape and layers it chose."""
    from alambic.search import search_shape

    chosen = [None]
    built = None
    if accelerator.is_main_process:
        search, built = search_shape(teacher, budget, calibration, max_seconds=cfg.student.budget_seconds,
                                     timing_cache=cfg.student.timing_cache, search_steps=cfg.student.search_steps,
                                     seed=cfg.training.seed,
                                     token_types=cfg.student.token_types, log=accelerator.print)
        for line in search.table():
            accelerator.print(line)
        accelerator.print(search.summary())
        shape = search.chosen.shape
        chosen = [(list(built.layers), shape.hidden, shape.ffn, shape.heads)]
    if accelerator.num_processes > 1:
        broadcast_object_list(chosen)
    if built is not None:
        return built
    layers, hidden, ffn, heads = chosen[0]
    return init_student(teacher, layers=layers, hidden_size=hidden, intermediate_size=ffn, num_heads=heads,
                        calibration_data=calibration, token_types=cfg.student.token_types, seed=cfg.training.seed)


@locked_run(lambda arguments: arguments["cfg"].validate().out)
def distill(cfg: DistillConfig, *, resume: bool = False, progress: bool = True) -> DistillResult:
    cfg.validate()
    done = finished_step(Path(cfg.out), cfg.training.max_steps) if resume else None
    if done is not None and (Path(cfg.out) / "student" / "config.json").is_file():
        # said before any model loads or any layer is measured; by the main process only under torchrun
        if is_main_process():
            print(f"{cfg.out} is complete: trained to step {done} of training.max_steps={cfg.training.max_steps}, its "
                  f"student is in {Path(cfg.out) / 'student'}; raise --max-steps to train on", flush=True)
        return DistillResult(Path(cfg.out), Path(cfg.out) / "student", None, None, {})
    calibration, notes, chat = _check_inputs(cfg, resume)
    run_dir = Path(cfg.out)
    accelerator, precision = make_accelerator(cfg.training)
    say = accelerator.print
    for note in notes:
        say(note)
    if cfg.training.distributed == "fsdp" and accelerator.num_processes < 2:
        raise AlambicError("training.distributed=fsdp shards over several processes: launch with `torchrun "
                           "--nproc_per_node N` or `accelerate launch`, or use training.distributed=ddp")

    if cfg.teacher_logits:  # the teacher, if given at all, only builds the student
        outputs = TeacherOutputs(cfg.teacher_logits, read_manifest(cfg.teacher_logits))
        teacher, student_tokenizer = (load_teacher(cfg.teacher) if cfg.teacher and not cfg.student.init
                                      else (None, None))
        tokenizer, kind = AutoTokenizer.from_pretrained(cfg.teacher_logits), outputs.manifest["kind"]
        teacher_parameters, teacher_layers = outputs.manifest["teacher_parameters"], outputs.manifest["teacher_layers"]
    else:
        outputs = None
        teacher, tokenizer = load_teacher(cfg.teacher)
        kind, student_tokenizer = model_kind(teacher), tokenizer
        teacher_parameters, teacher_layers = count_parameters(teacher), num_layers(teacher.config)
    _fit_decoder_defaults(cfg, kind, chat, say)
    torch.manual_seed(cfg.training.seed)
    card = None  # the model card of a student whose layers were chosen by measurement
    if cfg.student.init:
        init_dir = resolve_model_path(cfg.student.init)  # a run folder: its model folder, named once
        student, student_tokenizer = load_model(init_dir, kind=kind, for_training=True)
        # what alambic recorded building it: the shape search and the teacher layers it was copied from
        search_json, source = searched_shape(init_dir), recorded_layers(init_dir)
        if teacher is not None:
            check_same_vocabulary(tokenizer, student_tokenizer, teacher.config, student.config)
    else:
        built = _build_student(cfg, teacher, calibration, accelerator)
        if built.selection is not None:
            built.selection.calibration = ", ".join(calibration_specs(cfg))
        card = built.model_card(cfg.teacher)
        search_json = built.search.to_json() if built.search is not None else None
        source = built.source_layers()
        say(built.summary())
        student = built.model
    # saved with the student: the teacher layers it was copied from, a searched shape's candidates
    student_files = {**layers_record(source), **({SEARCH_FILE: search_json} if search_json else {})}
    if outputs is not None:
        _fit_cosine_term(cfg, outputs.manifest["hidden_size"], student, say)
    elif cfg.recipe == "distilbert":
        _fit_cosine_term(cfg, hidden_size(teacher.config), student, say)
    if cfg.student.save_init and accelerator.is_main_process and not resume:
        save_student(student, tokenizer, run_dir / "student-init", card=card, files=student_files)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")

    _, recipe_class = recipe_parts(cfg.recipe)
    masking = cfg.loss if recipe_class.masks_inputs else None
    with accelerator.local_main_process_first():  # one process per machine tokenises, the others read its cache
        if outputs is not None:
            batches = _cached_batches(cfg, outputs, tokenizer, student, student_tokenizer)
        else:
            batches = training_batches(
                cfg.data.train, tokenizer, kind, cfg.data, masking, cfg.training.batch_size, cfg.training.seed
            )
        held_out = heldout_batches(cfg.data.eval, tokenizer, kind, cfg.data, cfg.training.batch_size) if cfg.data.eval else None
    if isinstance(batches.examples, ChatExamples):
        say(batches.examples.describe())
    if cfg.on_policy.lmbda > 0:
        # the teacher's end-of-turn ids: a student built from its config lacks its generation config
        batches = OnPolicyBatches(batches, student, cfg.on_policy, eos_token_ids=eos_token_ids(tokenizer, teacher),
                                  pad_token_id=pad_id_of(tokenizer), max_length=cfg.data.max_length,
                                  seed=cfg.training.seed)
    evaluate = (lambda model: evaluate_lm(model, held_out)) if held_out else None

    if outputs is not None:
        teacher = None  # built the student; the cache stands in for it from here on
        recipe = OfflineDistilBERTRecipe(student, cfg.loss)
    else:
        loss = cfg.loss
        if hasattr(loss, "layer_map"):  # tinybert, minilm: `copied` pairs each student layer with its source
            layer_map, note = resolve_layer_map(loss.layer_map, source, num_layers(student.config), teacher_layers,
                                                with_embeddings=cfg.recipe == "tinybert")
            loss = replace(loss, layer_map=layer_map)
            if note:
                say(note)
        recipe = recipe_class(teacher, student, loss)  # the engine places the teacher (and casts it for bf16)
    if cfg.training.compile:
        # Compile the transformer bodies in place: the modules (and the exported state dict) stay the same.
        for model in (student, teacher):
            if model is not None:
                lm_body(model).compile()
    result = train(
        recipe, batches, cfg.training, run_dir,
        accelerator=accelerator, precision=precision, tokenizer=tokenizer, resume=resume, evaluate=evaluate,
        progress=progress,
    )
    student_dir = run_dir / "student"
    if accelerator.is_main_process:
        exported = result.student or accelerator.unwrap_model(student)
        card = distillation_card(cfg.to_dict(), teacher_parameters=teacher_parameters,
                                 student_parameters=count_parameters(exported),
                                 teacher_layers=teacher_layers, student_layers=num_layers(exported.config),
                                 metrics=last_logged(run_dir), selection_card=card, kind=kind,
                                 precision=precision.describe())
        save_student(exported, tokenizer, student_dir, overwrite=True, card=card, files=student_files)
        say(f"student written to {student_dir}")
    accelerator.wait_for_everyone()
    return DistillResult(run_dir, student_dir, teacher_parameters, count_parameters(student), result.metrics)


def _cached_batches(cfg: DistillConfig, outputs, tokenizer, student, student_tokenizer):
    """The cache's batches, once it is checked against the run (the student's tokenizer, kind, length, temperature,
    data)."""
    from alambic.offline.store import examples_hash
    from alambic.teachers import vocabulary_hash

    data_hash = None
    if cfg.data.train:
        from alambic.data.pipeline import training_examples

        data_hash = examples_hash(training_examples(cfg.data.train, tokenizer, outputs.manifest["kind"], cfg.data))
    check_cache(outputs.manifest, tokenizer_hash=vocabulary_hash(student_tokenizer), kind=model_kind(student),
                max_length=cfg.data.max_length, temperature=cfg.loss.temperature, data_hash=data_hash,
                needs_hidden=cfg.loss.alpha_cos > 0, folder=cfg.teacher_logits,
                student_vocab_size=vocab_size(student.config),
                student_hidden_size=hidden_size(student.config) if cfg.loss.alpha_cos > 0 else None)
    return cached_batches(outputs, tokenizer, cfg.training.batch_size, cfg.training.seed)
