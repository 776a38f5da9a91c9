"""DDP through torch.distributed (gloo on CPU): two processes with batch B equal one process with 2 x B accumulated,
and a DDP run interrupted and resumed equals one run straight through."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tiny import bpe_tokenizer, sample_texts, tiny_llama


TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
needs_torchrun = pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None,
                                    reason="torchrun missing")


TIMEOUT_S = 600  # a gloo hang fails the test instead of stalling CI


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """Two processes on this machine; --standalone picks a free rendezvous port, so runs never collide."""
    done = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def assert_two_processes_equal_one(command: list[str], tmp_path) -> subprocess.CompletedProcess:
    """``command`` under DDP on two processes (OUT = tmp_path/ddp) trains the same student as one process
    accumulating two micro-batches (tmp_path/one). Returns the DDP run."""
    done = torchrun("-m", "alambic", *command, "--out", str(tmp_path / "ddp"))
    subprocess.run([sys.executable, "-m", "alambic", *command, "--grad-accum", "2", "--out", str(tmp_path / "one")],
                   check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, timeout=TIMEOUT_S)
    ddp = load_file(str(tmp_path / "ddp" / "student" / "model.safetensors"))
    one = load_file(str(tmp_path / "one" / "student" / "model.safetensors"))
    assert max((ddp[k] - one[k]).abs().max().item() for k in one) < 1e-6
    return done


@pytest.fixture
def llama_and_text(tmp_path):
    """A tiny Llama teacher folder and a folder of text files, in tmp_path."""
    tiny_llama().save_pretrained(tmp_path / "teacher")
    bpe_tokenizer().save_pretrained(tmp_path / "teacher")
    (tmp_path / "text").mkdir()
    for i, text in enumerate(sample_texts(10)):
        (tmp_path / "text" / f"{i}.txt").write_text(text)
    return tmp_path


@needs_torchrun
def test_two_processes_match_one_process_with_the_same_global_batch(llama_and_text):
    tmp_path = llama_and_text
    common = ["distill", "--teacher", str(tmp_path / "teacher"), "--data", str(tmp_path / "text"), "--max-steps", "3",
              "--batch-size", "2", "--no-progress", "--set", "training.log_every=1", "--set", "data.max_length=32",
              "--set", "training.save_every=2"]
    assert_two_processes_equal_one(common, tmp_path)
    logs = {name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("ddp", "one")}
    assert [r["step"] for r in logs["ddp"]] == [1, 2, 3]  # only the main process writes
    for a, b in zip(logs["ddp"], logs["one"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    checkpoints = sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir())
    assert checkpoints == ["latest", "step-0000002", "step-0000003"]


@needs_torchrun
@pytest.mark.parametrize("distributed, precision", [("ddp", "no"), ("fsdp", "no"), ("ddp", "bf16")])
def test_run_interrupted_and_resumed_equals_the_straight_run(distributed, precision, tmp_path):
    """bf16: with fp32 masters, which every checkpoint reads."""
    (tmp_path / "text").mkdir()
    for i, text in enumerate(sample_texts(10)):  # documents of many lengths: the processes draw unequal dropout masks
        (tmp_path / "text" / f"{i}.txt").write_text(" ".join(text.split()[: 6 + 5 * i]))
    worker = os.path.join(os.path.dirname(__file__), "ddp_resume_worker.py")
    torchrun(worker, str(tmp_path / "text"), str(tmp_path), distributed, precision)

    def final(run):
        return load_file(str(tmp_path / run / "checkpoints" / "step-0000004" / "student" / "model.safetensors"))

    straight, resumed = final("straight"), final("resumed")
    assert all((straight[k] == resumed[k]).all() for k in straight), f"the resumed {distributed} run differs"
    if distributed == "fsdp":  # sharded checkpoints, each with the student gathered whole
        assert (tmp_path / "resumed" / "checkpoints" / "step-0000004" / "sharded" / ".metadata").is_file()
    steps = [json.loads(x)["step"] for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_sharding_engines_are_refused_in_words():
    from accelerate.utils import DistributedType

    from alambic.engine.loop import check_engine
    from alambic.errors import AlambicError

    for engine in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        check_engine(engine)
    for engine in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        with pytest.raises(AlambicError, match="set training.distributed=fsdp"):
            check_engine(engine)


@needs_torchrun
def test_fsdp_matches_one_process_with_the_same_global_batch_and_exports_a_plain_student(llama_and_text):
    """FSDP over two processes (each holds half of every sharded tensor) against one process accumulating the same
    global batch: the same weights up to float summation order (reduce-scatter vs one accumulation), 1e-5."""
    import torch
    import transformers

    tmp_path = llama_and_text
    common = ["distill", "--teacher", str(tmp_path / "teacher"), "--data", str(tmp_path / "text"), "--max-steps", "3",
              "--batch-size", "2", "--no-progress", "--set", "training.log_every=1", "--set", "data.max_length=32",
              "--set", "training.save_every=2", "--set", "training.mixed_precision=no", "--layers", "0,2",
              "--eval-data", str(tmp_path / "text")]  # evaluation runs the sharded student's forward too
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun("-m", "alambic", *common, "--set", "training.distributed=fsdp", "--out", str(tmp_path / "fsdp"))
    subprocess.run([sys.executable, "-m", "alambic", *common, "--grad-accum", "2", "--out", str(tmp_path / "one")],
                   check=True, env=env, capture_output=True, timeout=TIMEOUT_S)
    fsdp = load_file(str(tmp_path / "fsdp" / "student" / "model.safetensors"))
    one = load_file(str(tmp_path / "one" / "student" / "model.safetensors"))
    assert sorted(fsdp) == sorted(one)
    assert max((fsdp[k] - one[k]).abs().max().item() for k in one) < 1e-5
    start = tiny_llama().state_dict()
    assert (fsdp["model.norm.weight"] - start["model.norm.weight"]).abs().max() > 1e-4  # it trained
    logs = {name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("fsdp", "one")}
    for a, b in zip(logs["fsdp"], logs["one"]):
        assert a.keys() == b.keys()
        for key in a:
            if key.startswith(("loss", "eval/")):
                assert a[key] == pytest.approx(b[key], rel=1e-5), key
    assert any("eval/perplexity" in record for record in logs["fsdp"])
    # the exported student is a plain transformers model, equal to the one gathered into the last checkpoint
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "student")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 2
    checkpoint = tmp_path / "fsdp" / "checkpoints" / "step-0000003"
    assert (checkpoint / "sharded").is_dir()
    gathered = load_file(str(checkpoint / "student" / "model.safetensors"))
    assert all(torch.equal(gathered[k], fsdp[k]) for k in fsdp)


@needs_torchrun
def test_fsdp_is_refused_in_words_where_it_cannot_run(llama_and_text, capsys):
    from alambic.cli import main

    tmp_path = llama_and_text
    base = ["distill", "--teacher", str(tmp_path / "teacher"), "--data", str(tmp_path / "text"), "--max-steps", "1",
            "--set", "data.max_length=32", "--set", "training.distributed=fsdp", "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "a")]) == 2
    assert "shards over several processes: launch with `torchrun" in capsys.readouterr().err
    assert main(base + ["--recipe", "tinybert", "--out", str(tmp_path / "b")]) == 2
    assert "training.distributed=fsdp runs the distilbert recipe" in capsys.readouterr().err


@needs_torchrun
# finetune-chat: CI runs it in `make test-slow`
@pytest.mark.parametrize("verb", ["distill", pytest.param("finetune-chat", marks=pytest.mark.slow)])
def test_bf16_with_fp32_masters_under_ddp_equals_one_process_through_evaluations_and_checkpoints(verb, tmp_path):
    """The other tests train in fp32 (conftest); here the default of bf16 machines, bf16 with fp32 masters, evaluated
    (and checkpointed) mid-run. Evaluations and saves read the masters, which once unhooked DDP from the bf16
    parameters: the processes stopped averaging their gradients and drifted apart. The closing line is said once;
    finetune without validation data holds its split out on the main process, which the others then read."""
    from tiny import save_chat_teacher_and_data

    save_chat_teacher_and_data(tmp_path)
    chat = str(tmp_path / "chat.jsonl")
    if verb == "distill":
        command = ["distill", "--teacher", str(tmp_path / "teacher"), "--data", chat, "--eval-data", chat,
                   "--layers", "0,3", "--set", "training.save_every=2", "--set", "training.eval_every=2"]
        closing = "held-out after training"
    else:
        command = ["finetune", "--task", "chat", "--model", str(tmp_path / "teacher"), "--train", chat,
                   "--eval-every", "2"]
        closing = "best validation perplexity"
    command += ["--max-steps", "4", "--batch-size", "2", "--max-length", "256", "--mixed-precision", "bf16",
                "--no-progress"]
    done = assert_two_processes_equal_one(command, tmp_path)
    assert done.stdout.count(closing) == 1


@pytest.mark.parametrize("verb", ["distill-task", "generate"])
def test_a_one_process_verb_under_a_launcher_is_refused_in_one_line(verb, tmp_path, monkeypatch, capsys):
    """Only distill, finetune and cache-teacher share their work among a launcher's processes; under torchrun
    (WORLD_SIZE > 1) every other verb stops before it reads or writes anything, and leaves no output folder."""
    from alambic.cli import main
    from tiny import save_chat_teacher_and_data

    save_chat_teacher_and_data(tmp_path)
    capsys.readouterr()  # the saving's progress bars
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = str(tmp_path / "out")
    if verb == "distill-task":
        args = ["distill-task", "--task", "classification", "--teacher", str(tmp_path / "teacher"), "--train",
                "bbc-news:train", "--student-layers", "0,2", "--out", out]
    else:
        args = ["generate", "--teacher", str(tmp_path / "teacher"), "--prompts", str(tmp_path / "chat.jsonl"),
                "--out", out]
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == (
        f"alambic: error: {verb} runs in one process (only distill, finetune, cache-teacher use several): launch it "
        "without torchrun / accelerate launch")
    assert not (tmp_path / "out").exists()


@needs_torchrun
def test_measured_layer_selection_under_ddp_builds_one_student(llama_and_text):
    """layers=auto on two processes: the main process measures and broadcasts its choice. The run only completes if
    both build the same student (DDP checks that parameter shapes agree across processes when it wraps the model)."""
    tmp_path = llama_and_text
    args = ["distill", "--teacher", str(tmp_path / "teacher"), "--data", str(tmp_path / "text"), "--max-steps", "2",
            "--batch-size", "2", "--no-progress", "--set", "data.max_length=32", "--layers", "auto:influence",
            "--set", f"student.calibration_data=[{tmp_path / 'text'}]", "--set", "student.calibration_tokens=256",
            "--out", str(tmp_path / "ddp")]
    done = torchrun("-m", "alambic", *args)
    assert done.stdout.count("layers kept") == 1  # printed by the main process only (accelerate.print)
    card = (tmp_path / "ddp" / "student" / "README.md").read_text()
    assert "influence" in card  # the main process's selection is recorded with the student


@needs_torchrun
def test_on_policy_under_ddp_samples_each_process_its_prompts_like_one_process(tmp_path):
    """GKD batches under DDP: each process answers its own micro-batch's prompts with the coin and generator of
    that micro-batch's index, so two processes train exactly as one accumulating the same two micro-batches."""
    from tiny import save_chat_teacher_and_data

    save_chat_teacher_and_data(tmp_path)
    common = ["distill", "--teacher", str(tmp_path / "teacher"), "--data", str(tmp_path / "chat.jsonl"),
              "--max-steps", "2", "--batch-size", "2", "--max-length", "256", "--layers", "0,3", "--no-progress",
              "--set", "on_policy.lmbda=1", "--set", "on_policy.max_new_tokens=6", "--divergence", "reverse_kl",
              "--set", "loss.alpha_cos=0", "--set", "training.log_every=1"]
    assert_two_processes_equal_one(common, tmp_path)
    logs = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert all("generate_share" in r for r in logs)


@needs_torchrun
def test_a_resume_on_another_number_of_processes_is_refused_in_one_line(llama_and_text):
    # a one-process run stopped at step 2 of 4, resumed by two processes: each would read its own share of the
    # batches, so the data order and the global batch would change and batches be trained twice
    tmp_path = llama_and_text
    common = ["distill", "--teacher", str(tmp_path / "teacher"), "--data", str(tmp_path / "text"), "--batch-size",
              "2", "--no-progress", "--set", "data.max_length=32", "--out", str(tmp_path / "run"),
              "--set", "training.save_every=2"]
    subprocess.run([sys.executable, "-m", "alambic", *common, "--max-steps", "2"], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, timeout=TIMEOUT_S)
    done = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "alambic", *common,
                           "--max-steps", "4", "--resume"], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=TIMEOUT_S)
    assert done.returncode != 0
    assert ("alambic: error: checkpoint step-0000002 was written by a run of 1 process, and this run has 2: resume "
            "with the same number (torchrun --nproc_per_node 1, or no launcher), or start afresh in another --out"
            ) in done.stderr
    assert "alambic/engine" not in done.stderr  # one line from each process, no traceback of ours (torchrun prints
    # its own summary of the failed workers)
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 2  # nothing trained again


@needs_torchrun
@pytest.mark.slow  # three FSDP runs and three single-process ones: a minute; CI runs it in `make test-slow`
@pytest.mark.parametrize("variant", ["bf16", "teacher-logits", "teacher-logits-bf16"])
def test_fsdp_with_bf16_or_a_teacher_cache_matches_one_process(variant, llama_and_text):
    """What the README says FSDP runs: bf16, and --teacher-logits. Against one process accumulating the same global
    batch: with a cache, in fp32, the same weights up to summation order; in bf16, the same losses up to bf16
    rounding (FSDP computes with bf16 parameters, one process with bf16 autocast: both round, differently)."""
    tmp_path = llama_and_text
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["distill", "--max-steps", "3", "--batch-size", "2", "--no-progress", "--set", "training.log_every=1",
              "--set", "data.max_length=32", "--layers", "0,2", "--teacher", str(tmp_path / "teacher")]
    bf16 = variant.endswith("bf16")
    common += ["--set", f"training.mixed_precision={'bf16' if bf16 else 'no'}"]
    if variant.startswith("teacher-logits"):
        cache = tmp_path / "cache"
        subprocess.run([sys.executable, "-m", "alambic", "cache-teacher", "--teacher", str(tmp_path / "teacher"),
                        "--data", str(tmp_path / "text"), "--out", str(cache), "--top-k", "16", "--max-length", "32"],
                       check=True, env=env, capture_output=True, timeout=TIMEOUT_S)
        common += ["--teacher-logits", str(cache)]
    else:
        common += ["--data", str(tmp_path / "text")]
    torchrun("-m", "alambic", *common, "--set", "training.distributed=fsdp", "--out", str(tmp_path / "fsdp"))
    subprocess.run([sys.executable, "-m", "alambic", *common, "--grad-accum", "2", "--out", str(tmp_path / "one")],
                   check=True, env=env, capture_output=True, timeout=TIMEOUT_S)
    logs = {name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("fsdp", "one")}
    assert [r["step"] for r in logs["fsdp"]] == [1, 2, 3]
    tolerance = 2e-2 if bf16 else 1e-5
    for a, b in zip(logs["fsdp"], logs["one"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=tolerance)
        assert a.get("loss/kd", 0) > 0
    fsdp = load_file(str(tmp_path / "fsdp" / "student" / "model.safetensors"))
    one = load_file(str(tmp_path / "one" / "student" / "model.safetensors"))
    assert sorted(fsdp) == sorted(one) and all(fsdp[k].dtype == one[k].dtype for k in one)  # exported as fp32
    start = tiny_llama().state_dict()
    for name in ("model.norm.weight", "model.layers.1.mlp.down_proj.weight"):
        moved_fsdp = fsdp[name] - start[name.replace("layers.1", "layers.2")]
        moved_one = one[name] - start[name.replace("layers.1", "layers.2")]
        assert moved_one.abs().max() > 1e-4  # it trained
        # AdamW's first steps move each weight by about lr x sign(gradient): where a gradient is near zero, a
        # rounding difference flips a whole step, so the updates are compared on average, not weight by weight
        share = (moved_fsdp - moved_one).abs().mean() / moved_one.abs().mean()
        assert share <= (0.1 if bf16 else 0.01), (name, float(share))


@needs_torchrun
def test_an_error_on_the_main_process_before_a_barrier_ends_every_process(llama_and_text):
    """The main process stops on a user error while the other waits at a barrier: the launcher ends the run (exit
    status 2 of the main process), within seconds, with the error's one line; nothing waits forever."""
    tmp_path = llama_and_text
    worker = os.path.join(os.path.dirname(__file__), "rank0_failure_worker.py")
    done = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", worker, str(tmp_path / "text"),
                           str(tmp_path / "out")], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert done.returncode != 0 and "released" not in done.stdout
    assert "alambic: error: unknown teacher 'no-such-teacher'" in done.stderr
    assert "exitcode  : 2" in done.stderr  # the main process's own exit status, as the launcher reports it
