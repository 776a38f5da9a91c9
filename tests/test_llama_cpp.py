"""Exports checked in the runtime people deploy them on: pruned students -> distil -> GGUF -> llama.cpp itself.

A width-pruned Llama or Qwen2 student keeps its teacher's head size with fewer heads, so heads x head size differs
from its hidden size (SmolLM2 sliced to 384 wide with 3 heads of 64). llama.cpp derives the head size as
n_embd / n_head unless the file carries ``attention.key_length`` / ``value_length``: without them it refused such a
file ("Failed to load model"), while transformers' GGUF reader (rope.dimension_count) read it back fine. So these
tests run llama.cpp, not a reader of our own.

llama-cpp-python compiles llama.cpp (about 6 minutes on 2 cores): `make test-llama-cpp` installs it and runs this
file, and CI calls that target; a plain `make test` skips the file when it is not installed, and says so.
"""

import numpy as np
import pytest
import torch
import transformers

from alambic.cli import main
from alambic.export.runtime import load_exported, read_manifest
from alambic.workflows.export import SAMPLE_TEXTS, encode, parity
from tiny import (bpe_tokenizer, chat_records, sample_texts, save_chat_teacher_and_data, tiny_gpt2, tiny_llama,
                  tiny_qwen2)

pytestmark = pytest.mark.llama_cpp
llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed: `make test-llama-cpp` builds it and runs these tests",
    exc_type=ImportError)

TEACHERS = {
    # 64 wide, 4 heads of 16 in 2 key/value groups: the student below is 48 wide with 2 heads of 16 (one whole group;
    # 2 x 16 != 48), as SmolLM2 -> 384 wide with 3 heads of 64
    "llama": lambda: tiny_llama(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2),
    "qwen2": lambda: tiny_qwen2(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2),
    # llama.cpp's qwen2 graph needs heads x head size = hidden: 32 wide with 2 heads of 16 (the refusal is tested)
    # GPT-2 has no head size of its own (n_embd / n_head): its pruned student keeps 16 per head by having 2 heads
    "gpt2": lambda: tiny_gpt2(n_embd=64, n_head=4),
}
WIDTH = {"llama": 48, "qwen2": 32, "gpt2": 32}
NUM_HEADS = {"llama": 2, "qwen2": 2, "gpt2": 2}
BOUND = {"f32": 1e-3, "f16": 0.05, "q8_0": 0.02}
"""Max |logit difference| to PyTorch in llama.cpp: float32 round-off, f16 weights (the issue measured 0.03 on a
pruned SmolLM2), and 8-bit blocks (measured 0.004-0.006 here; llama.cpp also quantises the activations to 8 bits). q8_0 also
takes llama.cpp's quantised matmul kernels, whose AMX variant crashed on AMX CPUs (export/runtime.py)."""


def cli(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama_cpp")
    for name, build in TEACHERS.items():
        build().save_pretrained(root / name)
        bpe_tokenizer().save_pretrained(root / name)
    (root / "text.txt").write_text("\n\n".join(sample_texts(8)))
    return root


def pruned_distilled_student(files, arch, tmp_path):
    """init-student (narrower, sliced by importance) -> distill 2 steps: the student a user would export."""
    init = tmp_path / "init"
    assert cli("init-student", "--teacher", files / arch, "--out", init, "--layers", "0,3", "--hidden-size", WIDTH[arch],
               "--num-heads", NUM_HEADS[arch], "--calibration-data", files / "text.txt", "--calibration-tokens", 256,
               "--max-length", 32) == 0
    config = transformers.AutoConfig.from_pretrained(init)
    if arch == "llama":
        assert config.num_attention_heads * config.head_dim != config.hidden_size  # the shape llama.cpp misread
    run = tmp_path / "run"
    assert cli("distill", "--teacher", files / arch, "--student", init, "--data", files / "text.txt", "--out", run,
               "--max-steps", 2, "--batch-size", 2, "--max-length", 32, "--no-progress") == 0
    return run / "student"


@pytest.mark.parametrize("arch", sorted(TEACHERS))
def test_a_pruned_distilled_student_runs_in_llama_cpp_as_in_pytorch(arch, files, tmp_path):
    student = pruned_distilled_student(files, arch, tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(student)
    batch = encode(tokenizer, model, list(SAMPLE_TEXTS), max_length=48)
    with torch.no_grad():
        reference = {"logits": model(**batch).logits}
    for gguf_type in BOUND:
        out = tmp_path / f"gguf-{gguf_type}"
        assert cli("export", student, "--format", "gguf", "--gguf-type", gguf_type, "--out", out) == 0
        exported = load_exported(out)
        assert exported.runtime == "llama.cpp"
        result = parity(reference, {"logits": exported(**batch).logits}, batch["attention_mask"])
        assert result["max_abs_diff"] < BOUND[gguf_type], (gguf_type, result)
        # a tiny random model's logits are near ties (0.006 apart at q8_0 flips 3% of its top-1 choices)
        assert result["top1_agreement"] >= (0.95 if gguf_type == "q8_0" else 0.99), (gguf_type, result)
        # the export's own parity check ran in llama.cpp too
        assert "llama.cpp" in {p["runtime"] for p in read_manifest(out)["parity"]}


def test_llama_cpp_generates_the_tokens_pytorch_generates(files, tmp_path):
    student = pruned_distilled_student(files, "llama", tmp_path)
    out = tmp_path / "gguf"
    assert cli("export", student, "--format", "gguf", "--gguf-type", "f32", "--out", out) == 0
    tokenizer = transformers.AutoTokenizer.from_pretrained(student)
    model = transformers.AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
    prompt = tokenizer("Shares in the company rose", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)[0, prompt.shape[1]:]
    # logits_all: without it llama.cpp fills only the last row of `scores`, and the rest is uninitialised memory
    llm = llama_cpp.Llama(model_path=str(out / read_manifest(out)["files"][0]), n_ctx=64, logits_all=True,
                          verbose=False)
    produced = []
    for token in llm.generate(prompt[0].tolist(), top_k=1, temp=0.0):
        produced.append(token)
        if len(produced) == len(expected):
            break
    assert produced == expected.tolist()
    scores = llm.scores[prompt.shape[1] - 1: prompt.shape[1] + len(expected) - 1]
    assert np.isfinite(scores).all()
    assert scores.argmax(axis=-1).tolist() == produced


def test_a_qwen2_shape_llama_cpp_cannot_run_is_refused_in_one_line(files, tmp_path, capsys):
    student = tmp_path / "student"
    assert cli("init-student", "--teacher", files / "qwen2", "--out", student, "--layers", "0,3", "--hidden-size", 48,
               "--num-heads", 2, "--width-init", "random") == 0
    capsys.readouterr()
    assert cli("export", student, "--format", "gguf", "--out", tmp_path / "gguf") == 2
    assert capsys.readouterr().err.strip() == (
        "alambic: error: llama.cpp runs qwen2 models whose heads x head size equals the hidden size; this one has "
        "2 x 16 != 48: build the student with --num-heads 3 (or leave --num-heads out), or export it with "
        "--format onnx")
    assert not (tmp_path / "gguf").exists()


def test_a_searched_student_runs_in_llama_cpp(files, tmp_path):
    """A shape search's student (a budget instead of a shape: a size, counted) -> distill -> GGUF: llama.cpp runs it
    as PyTorch does. Qwen2: its candidates keep heads x head size = hidden, as llama.cpp's qwen2 graph needs."""
    teacher = tmp_path / "teacher"
    tiny_qwen2(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
               num_hidden_layers=4).save_pretrained(teacher)
    bpe_tokenizer().save_pretrained(teacher)
    run = tmp_path / "run"
    assert cli("distill", "--teacher", teacher, "--data", files / "text.txt", "--target-speedup", 1.5,
               "--set", "student.budget_seq_len=32", "--set", f"student.timing_cache={tmp_path / 'cache'}",
               "--set", "student.calibration_tokens=256", "--out", run, "--max-steps", 2, "--batch-size", 2,
               "--max-length", 32, "--no-progress") == 0
    config = transformers.AutoConfig.from_pretrained(run / "student")
    assert (run / "student" / "alambic-search.json").is_file()
    assert config.num_attention_heads * config.head_dim == config.hidden_size
    out = tmp_path / "gguf"
    assert cli("export", run / "student", "--format", "gguf", "--gguf-type", "f32", "--out", out) == 0
    assert "llama.cpp" in {p["runtime"] for p in read_manifest(out)["parity"]}
    exported = load_exported(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(run / "student", dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(run / "student")
    batch = encode(tokenizer, model, list(SAMPLE_TEXTS), max_length=48)
    with torch.no_grad():
        reference = {"logits": model(**batch).logits}
    result = parity(reference, {"logits": exported(**batch).logits}, batch["attention_mask"])
    assert result["max_abs_diff"] < BOUND["f32"] and result["top1_agreement"] >= 0.99


def test_a_pruned_chat_student_answers_in_llama_cpp_as_in_pytorch(tmp_path):
    """Chat data -> distil a narrower student (the loss on the answers) -> GGUF -> llama.cpp's own chat completion,
    with the chat template the file carries: the same prompt tokens and the same greedy answer as PyTorch."""
    save_chat_teacher_and_data(tmp_path, hidden_size=64, intermediate_size=128)  # the student: 48 wide, 2 heads of 16
    run = tmp_path / "run"
    assert cli("distill", "--teacher", tmp_path / "teacher", "--data", tmp_path / "chat.jsonl", "--out", run,
               "--layers", "0,3", "--set", "student.hidden_size=48", "--set", "student.num_heads=2",
               "--max-steps", 2, "--batch-size", 2, "--max-length", 256, "--no-progress") == 0
    student = run / "student"
    out = tmp_path / "gguf"
    assert cli("export", student, "--format", "gguf", "--gguf-type", "f32", "--out", out) == 0
    tokenizer = transformers.AutoTokenizer.from_pretrained(student)
    model = transformers.AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
    assert model.config.hidden_size == 48
    messages = [{"role": "user", "content": chat_records(1)[0]["messages"][0]["content"]}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        answer = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(answer[0, ids.shape[1]:], skip_special_tokens=True)
    llm = llama_cpp.Llama(model_path=str(out / read_manifest(out)["files"][0]), n_ctx=512, verbose=False)
    assert llm.metadata["tokenizer.chat_template"] == tokenizer.chat_template
    assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids[0].tolist()
    reply = llm.create_chat_completion(messages=messages, max_tokens=8, temperature=0.0, top_k=1, seed=0)
    assert expected and reply["choices"][0]["message"]["content"] == expected


def test_a_gguf_export_answers_greedily_and_refuses_sampling_in_one_line(tmp_path, capsys):
    """eval-chat generates with llama.cpp's own key-value cache, greedily: a sampling temperature is refused for the
    export, not silently ignored."""
    save_chat_teacher_and_data(tmp_path)
    out = tmp_path / "gguf"
    assert cli("export", tmp_path / "teacher", "--format", "gguf", "--gguf-type", "f32", "--out", out) == 0
    model = load_exported(out)
    assert model.runtime == "llama.cpp" and hasattr(model, "answer_greedily")
    capsys.readouterr()
    (tmp_path / "short.jsonl").write_text('{"prompt": "Say hello.", "completion": "hello"}\n')
    assert cli("eval-chat", out, "--data", tmp_path / "short.jsonl", "--max-new-tokens", 4, "--temperature", 1) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("alambic: error: llama.cpp answers greedily here") and len(err.splitlines()) == 1
