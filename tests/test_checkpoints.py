"""Nothing lost: corrupt, truncated, interrupted and untrusted checkpoints, a full disk; every resume compared
bit for bit with an uninterrupted run."""

import errno

import numpy as np
import pytest
import torch

from alambic.engine import checkpoint as ckpt
from alambic.engine.loop import train
from alambic.errors import AlambicError
from test_engine import make_run


class Interrupt(Exception):
    pass


def straight_weights(text_dir, tmp_path, max_steps):
    recipe, batches, cfg, tok = make_run("causal", text_dir, max_steps=max_steps)
    train(recipe, batches, cfg, tmp_path / "straight", tokenizer=tok, progress=False)
    return {k: v.clone() for k, v in recipe.student.state_dict().items()}


def assert_same_weights(expected, model):
    got = model.state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected), "resumed weights differ"


@pytest.fixture(scope="module")
def straight9(text_dir, tmp_path_factory):
    return straight_weights(text_dir, tmp_path_factory.mktemp("straight"), 9)


def run_six(text_dir, run_dir, **training):
    """A 9-step run that dies during step 7, after its checkpoints of steps 3 and 6."""
    recipe, batches, cfg, tok = make_run("causal", text_dir, max_steps=9, **training)

    def dies_in_step_seven(index):
        if index >= 6 * cfg.grad_accum:
            raise Interrupt
        return batches(index)

    try:
        train(recipe, dies_in_step_seven, cfg, run_dir, tokenizer=tok, progress=False)
    except Interrupt:
        pass


def resume_to_nine(text_dir, run_dir):
    recipe, batches, cfg, tok = make_run("causal", text_dir, max_steps=9)
    train(recipe, batches, cfg, run_dir, tokenizer=tok, resume=True, progress=False)
    return recipe.student


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(text_dir, tmp_path, straight9, capsys):
    run_six(text_dir, tmp_path / "run")
    state = tmp_path / "run" / "checkpoints" / "step-0000006" / "trainer-state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    assert "trainer-state.pt truncated" in ckpt.verify_checkpoint(state.parent)
    student = resume_to_nine(text_dir, tmp_path / "run")
    out = capsys.readouterr().out
    assert "checkpoint step-0000006 is unusable (trainer-state.pt truncated or changed" in out
    assert "resumed from" in out and "step-0000003 at step 3" in out
    assert_same_weights(straight9, student)


@pytest.mark.parametrize("damage", ["truncate weights", "delete manifest file", "wrong step"])
def test_verification_names_what_is_wrong(text_dir, tmp_path, damage):
    run_six(text_dir, tmp_path / "run")
    path = tmp_path / "run" / "checkpoints" / "step-0000006"
    assert ckpt.verify_checkpoint(path) is None
    if damage == "truncate weights":
        weights = path / "student" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
        expected = "student/model.safetensors truncated or changed"
    elif damage == "delete manifest file":
        (path / "objective-extra.safetensors").unlink()
        expected = "objective-extra.safetensors missing"
    else:
        path.rename(path.with_name("step-0000007"))
        path = path.with_name("step-0000007")
        expected = "manifest.json says step 6, the folder is step-0000007"
    assert expected in ckpt.verify_checkpoint(path)


def test_no_usable_checkpoint_is_one_line(text_dir, tmp_path):
    run_six(text_dir, tmp_path / "run")
    for path in ckpt.checkpoints(tmp_path / "run"):
        (path / "trainer-state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(AlambicError, match=r"none of the 2 checkpoints .* is usable \(newest, step-0000006: "
                                           r"trainer-state.pt truncated or changed .*start again without --resume"):
        resume_to_nine(text_dir, tmp_path / "run")


def test_a_corrupt_file_of_the_right_size_is_skipped_on_load(text_dir, tmp_path, straight9, capsys):
    run_six(text_dir, tmp_path / "run")
    state = tmp_path / "run" / "checkpoints" / "step-0000006" / "trainer-state.pt"
    state.write_bytes(b"\0" * state.stat().st_size)  # passes the size check, fails to load
    student = resume_to_nine(text_dir, tmp_path / "run")
    assert "checkpoint step-0000006 is unusable (does not load" in capsys.readouterr().out
    assert_same_weights(straight9, student)


def test_a_trainer_state_that_needs_pickle_is_refused_unless_trusted(text_dir, tmp_path, straight9, monkeypatch):
    run_six(text_dir, tmp_path / "run")
    for path in ckpt.checkpoints(tmp_path / "run"):
        file = path / "trainer-state.pt"
        state = torch.load(file, weights_only=True)
        state["rng"][0]["numpy"] = np.random.get_state()  # a numpy array, as alambic wrote before format 2
        torch.save(state, file)
        (path / ckpt.MANIFEST).unlink()  # as a checkpoint of an older alambic, which had no manifest
    with pytest.raises(AlambicError, match="holds pickled objects .* cannot run code: .* ALAMBIC_TRUST_CHECKPOINTS=1"):
        resume_to_nine(text_dir, tmp_path / "run")
    monkeypatch.setenv("ALAMBIC_TRUST_CHECKPOINTS", "1")
    student = resume_to_nine(text_dir, tmp_path / "run")  # trusted: loads, and the old numpy state is restored
    assert ckpt._trainer_state(ckpt.checkpoints(tmp_path / "run")[0])["step"] == 9
    assert_same_weights(straight9, student)  # the NumPy state does not drive training: the run resumed exactly


@pytest.mark.parametrize("where", ["student weights", "trainer state", "manifest", "latest pointer"])
def test_killed_inside_a_checkpoint_write_resumes_exactly(where, text_dir, tmp_path, straight9, monkeypatch):
    """The run dies while writing the step-6 checkpoint; the resumed run ends with the uninterrupted weights."""
    real = {"student weights": (ckpt, "save_file"), "trainer state": (torch, "save"),
            "manifest": (ckpt, "verify_checkpoint"), "latest pointer": (ckpt, "atomic_write_text")}[where]
    original = getattr(*real)
    fired = []

    def dies_at_step_six(*args, **kwargs):
        if "0000006" in " ".join(map(str, args)):
            fired.append(where)
            raise Interrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(*real, dies_at_step_six)
    run_six(text_dir, tmp_path / "run")
    monkeypatch.undo()
    assert fired == [where]  # the run did die inside that write
    leftovers = [p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    assert leftovers == []
    assert_same_weights(straight9, resume_to_nine(text_dir, tmp_path / "run"))


def test_a_full_disk_during_a_checkpoint_loses_nothing_already_saved(text_dir, tmp_path, straight9, monkeypatch):
    original = torch.save

    def disk_full_at_step_six(obj, file, *args, **kwargs):
        if "0000006" in str(file):
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(obj, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_at_step_six)
    with pytest.raises(OSError, match="No space left"):
        run_six(text_dir, tmp_path / "run")
    monkeypatch.undo()
    assert [p.name for p in ckpt.checkpoints(tmp_path / "run")] == ["step-0000003"]
    assert ckpt.verify_checkpoint(ckpt.checkpoints(tmp_path / "run")[0]) is None
    assert_same_weights(straight9, resume_to_nine(text_dir, tmp_path / "run"))


def test_rotation_never_deletes_the_last_good_checkpoint(text_dir, tmp_path, monkeypatch):
    """keep_checkpoints=1: a new checkpoint that does not verify leaves the previous one in place."""
    original = ckpt.verify_checkpoint
    monkeypatch.setattr(ckpt, "verify_checkpoint",
                        lambda path: "simulated damage" if path.name == "step-0000006" else original(path))
    with pytest.raises(ckpt.UnusableCheckpoint, match="did not verify after writing .* the older checkpoints are kept"):
        run_six(text_dir, tmp_path / "run", keep_checkpoints=1)
    assert [p.name for p in ckpt.checkpoints(tmp_path / "run")][-1] == "step-0000003"
    assert original(tmp_path / "run" / "checkpoints" / "step-0000003") is None


# --- sharded (FSDP) checkpoints load nothing that runs code -------------------------------------------------------

class _Payload:
    """Unpickling this calls os.system: what a crafted checkpoint file could carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_sharded_checkpoint_loads_through_the_safe_reader_and_refuses_code(tmp_path):
    import pickle

    import torch.distributed.checkpoint as dcp

    from alambic.engine.sharding import safe_checkpoint_io

    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    saved = {"model": model.state_dict(), "optim": optimizer.state_dict()}
    with pytest.warns(UserWarning):  # no process group: torch says it saves as one process
        dcp.save(saved, checkpoint_id=str(tmp_path / "sharded"), no_dist=True)
    fresh = torch.nn.Linear(4, 3)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters())
    fresh(torch.randn(2, 4)).sum().backward()
    fresh_optimizer.step()
    loaded = {"model": fresh.state_dict(), "optim": fresh_optimizer.state_dict()}
    reader, planner = safe_checkpoint_io(tmp_path / "sharded")
    with pytest.warns(UserWarning):
        dcp.load(loaded, storage_reader=reader, planner=planner, no_dist=True)
    assert all(torch.equal(loaded["model"][k], saved["model"][k]) for k in saved["model"])
    assert loaded["optim"]["state"][0]["step"] == saved["optim"]["state"][0]["step"]
    # a .metadata that would run a command is refused, and the command does not run
    marker = tmp_path / "ran"
    (tmp_path / "sharded" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    reader, planner = safe_checkpoint_io(tmp_path / "sharded")
    with pytest.raises(AlambicError, match=r"\.metadata names posix\.system, which a checkpoint description never "
                                           r"holds.*start afresh without --resume"):
        reader.read_metadata()
    assert not marker.exists()


def test_the_metadata_reader_refuses_a_dotted_name_through_an_allowed_module(tmp_path):
    # pickle's protocol 4 resolves "os.system" inside an allowed module that imports os: refused by name
    import pickle

    from alambic.engine.sharding import _MetadataUnpickler

    marker = tmp_path / "ran"
    def text(value: str) -> bytes:  # SHORT_BINUNICODE
        return b"\x8c" + bytes([len(value)]) + value.encode()

    # PROTO 4, module and name, STACK_GLOBAL, the command, TUPLE1, REDUCE, STOP
    payload = (b"\x80\x04" + text("torch.distributed.checkpoint.metadata") + text("os.system") + b"\x93"
               + text(f"touch {marker}") + b"\x85R.")
    import io

    with pytest.raises(AlambicError, match="names torch.distributed.checkpoint.metadata.os.system"):
        _MetadataUnpickler(io.BytesIO(payload)).load()
    assert not marker.exists()
    assert pickle.loads(payload) == 0 and marker.exists()  # the same bytes do run a command when unpickled freely
