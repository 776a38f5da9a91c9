"""Sharded training with FSDP2 (``torch.distributed.fsdp.fully_shard``), for ``training.distributed: fsdp``.

Every transformer layer of the student is its own FSDP unit, and the objective is the root unit: its own parameters
(embeddings, final norm, LM head, any projection) are gathered for the whole of the objective's forward, which is
what lets the fused vocabulary loss read the LM head's weight directly. Each process then holds 1/N of the student's
parameters, gradients and AdamW state between steps. The frozen teacher's layers are sharded too
(``training.fsdp_teacher: shard``, gathered layer by layer in its forward) or kept whole on every process
(``replicate``); its embeddings and head stay whole (the fused loss reads its projection). In bf16, parameters are
gathered in bf16 and gradients reduced in fp32.

Checkpoints are sharded with ``torch.distributed.checkpoint`` (each process writes its shards of the model and
optimiser state), next to the trainer state and the student gathered whole on the main process (a checkpoint stays
usable on its own); they resume on the same number of processes.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import sys
from pathlib import Path

import torch

from alambic import modeling
from alambic.errors import AlambicError

SHARDED = "sharded"
"""The folder of a checkpoint holding the model and optimiser shards (torch.distributed.checkpoint)."""


def check_sharding(recipe, processes: int) -> None:
    import torch.distributed.fsdp as fsdp

    if not hasattr(fsdp, "fully_shard"):
        raise AlambicError(f"training.distributed=fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, torch 2.6 or "
                           f"later); this torch is {torch.__version__}: upgrade torch or use training.distributed=ddp")
    if processes < 2:
        raise AlambicError("training.distributed=fsdp shards over several processes: launch with `torchrun "
                           "--nproc_per_node N` or `accelerate launch`, or use training.distributed=ddp")
    if type(recipe).__name__ not in ("DistilBERTRecipe", "OfflineDistilBERTRecipe"):
        raise AlambicError(f"training.distributed=fsdp runs the distilbert recipe (live or --teacher-logits) for "
                           f"now; {type(recipe).__name__} reads intermediate layers through hooks, untested under "
                           "FSDP: use training.distributed=ddp for it")


def shard(recipe, *, bf16: bool, shard_teacher: bool) -> None:
    """Shard the student's layers and the objective (the root) in place, and the teacher's layers if asked."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
              else MixedPrecisionPolicy())
    for layer in modeling.transformer_layers(recipe.student):
        fully_shard(layer, mp_policy=policy)
    # The objective's inputs are the teacher's targets and the row counts: cast to bf16 they would lose the stored
    # log-probabilities' precision and round the counts, so only the layers (whose inputs are activations) cast.
    root_policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                        cast_forward_inputs=False) if bf16 else policy)
    fully_shard(recipe.objective, mp_policy=root_policy)
    # Make the objective the root now: FSDP initialises roots lazily, on their first forward, and a student forward
    # run first (the evaluation at step 0) would otherwise make each layer a root of its own. torch has no public
    # call for this in 2.13.
    recipe.objective._get_fsdp_state()._lazy_init()
    if recipe.teacher is not None and shard_teacher:
        for layer in modeling.transformer_layers(recipe.teacher):
            fully_shard(layer)
            # Each teacher layer is a root of its own (the teacher's embeddings and head stay whole), and FSDP keeps a
            # root's parameters gathered after its forward, expecting a backward: the teacher has none, so free them.
            layer.register_forward_hook(lambda module, args, output: module.reshard())


@contextlib.contextmanager
def gathered(objective):
    """The objective's root parameters gathered, for a forward of the student outside the objective (evaluation)."""
    objective.unshard()
    try:
        yield
    finally:
        objective.reshard()


def gradient_sync(objective, enabled: bool):
    objective.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def local_norm(norm):
    """The global gradient norm as a plain tensor (clipping sharded gradients returns it as a replicated DTensor)."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def whole_student(objective, student, is_main: bool):
    """The student with every weight gathered, as a plain transformers model on the main process (None elsewhere).
    Every process must call it: the weights are gathered collectively."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(objective, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main:
        return None
    with torch.random.fork_rng(devices=[]):  # a fresh model draws initial weights: keep the run's RNG untouched
        plain = type(student)(student.config)
    prefix = "student."
    plain.load_state_dict({k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)})
    return plain.eval()


def save_sharded_checkpoint(run_dir: Path, step: int, objective, student, optimizer, scheduler, tokenizer, keep: int,
                            loop_state: dict, rng_states: list[dict], is_main: bool, processes: int) -> None:
    """The checkpoint of :mod:`alambic.engine.checkpoint`, with the model and optimiser sharded: every process
    writes its shards into a temporary folder, the main process the rest, verifies, renames and prunes."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    from alambic.engine.checkpoint import checkpoint_path, publish_checkpoint, write_manifest

    root = Path(run_dir) / "checkpoints"
    final = checkpoint_path(run_dir, step)
    tmp = root / f".{final.name}.partial"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dcp.save({"model": get_model_state_dict(objective), "optim": get_optimizer_state_dict(objective, optimizer)},
             checkpoint_id=str(tmp / SHARDED))
    plain = whole_student(objective, student, is_main)
    if is_main:
        plain.save_pretrained(tmp / "student")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "student")
        torch.save({"step": step, "scheduler": scheduler.state_dict(), "rng": rng_states, "loop": loop_state,
                    "processes": processes}, tmp / "trainer-state.pt")
        write_manifest(tmp, step, sharded=True)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        publish_checkpoint(run_dir, final, keep)
    dist.barrier()


METADATA_CLASSES = {
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("collections", "OrderedDict"),
}
"""What a sharded checkpoint's ``.metadata`` may name, beyond ``torch.distributed.checkpoint.metadata``'s classes and
torch's dtypes: its descriptions of the shards, and nothing that runs code."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        # a dotted name would walk from an allowed module to anything it imports (the metadata module imports os)
        found = None if "." in name else getattr(sys.modules.get(module), name, None)
        allowed = "." not in name and (
            (module, name) in METADATA_CLASSES
            or (module == "torch.distributed.checkpoint.metadata" and isinstance(found, type)
                and found.__module__ == module)
            or (module == "torch" and isinstance(found, torch.dtype)))
        if not allowed:
            raise AlambicError(f"a sharded checkpoint's .metadata names {module}.{name}, which a checkpoint "
                               "description never holds: it was not written by alambic's FSDP run, and is not loaded "
                               "(loading would run code); start afresh without --resume")
        return super().find_class(module, name)


def safe_checkpoint_io(path: Path):
    """(storage reader, load planner) for ``torch.distributed.checkpoint.load`` that unpickle nothing but shard
    descriptions and tensors: torch's own reader unpickles ``.metadata`` freely and its planner loads the
    non-tensor items with ``weights_only=False``, so a crafted checkpoint could run code on ``--resume``."""
    import io

    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as stream:
                metadata = _MetadataUnpickler(stream).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:  # DefaultLoadPlanner's, with weights_only
            try:
                item = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as error:
                raise AlambicError(f"a sharded checkpoint holds an item that does not load without running code "
                                   f"({str(error).splitlines()[0]}); it is not loaded: start afresh without "
                                   "--resume") from None
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], item)
            else:
                self.state_dict[read_item.dest_index.fqn] = item

    return Reader(str(path)), Planner()


def load_sharded_checkpoint(path: Path, objective, optimizer, scheduler, process_index: int,
                            processes: int) -> tuple[int, dict]:
    """Restore what :func:`save_sharded_checkpoint` wrote (every process reads its own shards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    from alambic.engine.checkpoint import _set_rng_state, _trainer_state

    path = Path(path)
    if not (path / SHARDED).is_dir():
        raise AlambicError(f"checkpoint {path} was written without FSDP: resume it with training.distributed=ddp")
    state = _trainer_state(path)
    if state.get("processes") != processes:
        raise AlambicError(f"checkpoint {path} was written by {state.get('processes')} processes and FSDP resumes "
                           f"on the same number: launch {state.get('processes')} processes (now {processes})")
    shards = {"model": get_model_state_dict(objective), "optim": get_optimizer_state_dict(objective, optimizer)}
    from torch.distributed.checkpoint.api import CheckpointException

    reader, planner = safe_checkpoint_io(path / SHARDED)
    try:
        dcp.load(shards, storage_reader=reader, planner=planner)
    except CheckpointException as error:  # torch gathers each rank's (exception, trace): ours is one line
        refused = [exception for exception, _ in error.failures.values() if isinstance(exception, AlambicError)]
        if refused:
            raise refused[0] from None
        raise
    set_model_state_dict(objective, shards["model"])
    set_optimizer_state_dict(objective, optimizer, shards["optim"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"][process_index % len(state["rng"])])
    return int(state["step"]), state.get("loop", {})
