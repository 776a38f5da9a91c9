"""`alambic export`: every format on tiny real models, loaded back in its runtime and compared with PyTorch; the
GGUF writer checked against transformers' own GGUF reader (and llama.cpp where installed); the report and eval-task
measuring export folders like models; bad requests refused in one line."""

import copy
import json

import numpy as np
import pytest
import torch
import transformers

from alambic.cli import main
from alambic.evaluation.report import ReportSettings, build_report
from alambic.export.gguf_file import write_gguf
from alambic.export.runtime import MANIFEST, load_exported, read_manifest
from alambic.workflows.export import SAMPLE_TEXTS, encode, export, parity
from tiny import DECODERS, ENCODERS, MINILM_DIR, bpe_tokenizer, sample_texts, tiny_bert, tiny_llama, wordpiece_tokenizer

LABELS = ["business", "sport", "tech"]


def task_model(task: str, seed: int = 0):
    """A tiny BERT with a task head (its label map saved), as `alambic finetune` leaves one."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(**{**tiny_bert().config.to_dict(), "num_hidden_layers": 2})
    if task == "classification":
        config.id2label, config.label2id = dict(enumerate(LABELS)), {k: i for i, k in enumerate(LABELS)}
        return transformers.BertForSequenceClassification(config).eval()
    if task == "ner":
        tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-MISC", "I-MISC"]
        config.id2label, config.label2id = dict(enumerate(tags)), {k: i for i, k in enumerate(tags)}
        return transformers.BertForTokenClassification(config).eval()
    return transformers.BertForQuestionAnswering(config).eval()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    tiny_llama().save_pretrained(root / "llama")
    bpe_tokenizer().save_pretrained(root / "llama")
    tiny_bert().save_pretrained(root / "bert")
    for name in ("qwen2", "gpt2", "roberta", "distilbert"):
        (DECODERS.get(name) or ENCODERS[name])().save_pretrained(root / name)
        (wordpiece_tokenizer() if name == "distilbert" else bpe_tokenizer()).save_pretrained(root / name)
    for task in ("classification", "ner", "qa"):
        task_model(task).save_pretrained(root / task)
    for name in ("bert", "classification", "ner", "qa"):
        wordpiece_tokenizer().save_pretrained(root / name)
    (root / "text.txt").write_text("\n\n".join(t[:600] for t in sample_texts(24)))
    return root


def cli(*argv) -> int:
    return main([str(a) for a in argv])


# --- ONNX ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model, head", [
    ("llama", "causal"), ("qwen2", "causal"), ("gpt2", "causal"), ("bert", "masked"), ("roberta", "masked"),
    ("distilbert", "masked"), ("classification", "classification"), ("ner", "ner"), ("qa", "qa")])
def test_onnx_export_matches_pytorch_on_real_text(model, head, root, tmp_path):
    out = tmp_path / "onnx"
    manifest = export(root / model, "onnx", out, log=lambda line: None)
    assert {MANIFEST, "config.json", "model.onnx"} <= {p.name for p in out.iterdir()}
    assert (out / "tokenizer.json").is_file() or (out / "vocab.txt").is_file()
    assert manifest["head"] == head and json.loads((out / MANIFEST).read_text()) == manifest
    assert manifest["parity"][0]["max_abs_diff"] < 1e-4 and manifest["parity"][0]["top1_agreement"] == 1.0
    # independently of the manifest: other texts, through ONNX Runtime, against the PyTorch model
    from alambic.tasks.models import load_task_model
    from alambic.teachers import load_model

    reference = (load_model(root / model)[0] if head in ("causal", "masked")
                 else load_task_model(root / model, head, need_head=True)[0].eval())
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    batch = encode(tokenizer, reference, [t[:400] for t in sample_texts(5)], max_length=48)
    exported = load_exported(out)(**batch)
    with torch.no_grad():
        expected = reference(**batch)
    mask = batch["attention_mask"].bool()
    for name in manifest["outputs"]:
        got, want = getattr(exported, name), getattr(expected, name)
        if want.dim() == 3:
            got, want = got[mask], want[mask]
        elif head == "qa":
            got, want = got[mask], want[mask]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_onnx_int8_dynamic_and_static(root, tmp_path):
    dynamic = export(root / "classification", "onnx-int8", tmp_path / "dynamic", log=lambda line: None)
    static = export(root / "classification", "onnx-int8", tmp_path / "static", int8="static",
                    calibration_data=[str(root / "text.txt")], log=lambda line: None)
    plain = export(root / "classification", "onnx", tmp_path / "float", log=lambda line: None)
    assert dynamic["precision"] == "int8 dynamic" and static["precision"] == "int8 static"
    assert static["calibration"] == [str(root / "text.txt")]
    import onnx

    ops = {name: {n.op_type for n in onnx.load(tmp_path / name / "model.onnx").graph.node}
           for name in ("dynamic", "static", "float")}
    assert "DynamicQuantizeLinear" in ops["dynamic"] or "MatMulInteger" in ops["dynamic"]
    assert "QuantizeLinear" in ops["static"] and "QuantizeLinear" not in ops["float"]
    size = {name: (tmp_path / name / "model.onnx").stat().st_size for name in ("dynamic", "float")}
    assert size["dynamic"] < 0.5 * size["float"]  # int8 weights: a quarter of fp32, plus the graph
    for manifest in (dynamic, static):
        result = manifest["parity"][0]
        assert 0 < result["max_abs_diff"] < 0.1 * max(1.0, result["max_abs_reference"])
        assert result["top1_agreement"] >= 0.9
    assert plain["parity"][0]["max_abs_diff"] < 1e-5


# --- PyTorch int8 -------------------------------------------------------------------------------------------------

def test_torch_int8_reloads_int8_weights_within_half_a_step_of_the_float_ones(root, tmp_path):
    manifest = export(root / "llama", "torch-int8", tmp_path / "q", log=lambda line: None)
    reloaded = load_exported(tmp_path / "q")
    float_model = tiny_llama()
    # every Linear of the reloaded model holds int8 weights, each within half a quantisation step of the float one
    # (round to nearest), read independently of the exporter's code
    floats = dict(float_model.named_modules())
    quantised = {name: module for name, module in reloaded.named_modules() if hasattr(module, "weight")
                 and callable(module.weight) and "quantized" in type(module).__module__}
    assert len(quantised) == sum(isinstance(m, torch.nn.Linear) for m in floats.values())  # the LM head too
    for name, module in quantised.items():
        weight = module.weight()
        assert weight.dtype == torch.qint8
        step = weight.q_scale()
        assert (weight.dequantize() - floats[name].weight).abs().max() <= step / 2 + 1e-6, name
    ids = torch.randint(3, 512, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        float_logits = float_model(input_ids=ids).logits
        int8_logits = reloaded(input_ids=ids).logits
    assert 0 < (int8_logits - float_logits).abs().max() < 0.1
    assert manifest["parity"][0]["top1_agreement"] > 0.9 and manifest["parity_bound"]["min_top1_agreement"] == 0.9


# --- GGUF ---------------------------------------------------------------------------------------------------------

GGUF_TOLERANCE = {"f32": 1e-5, "f16": 2e-3, "q8_0": 3e-2}


@pytest.mark.parametrize("family", sorted(DECODERS))
@pytest.mark.parametrize("gguf_type", ["f32", "f16", "q8_0"])
def test_gguf_round_trip_through_transformers(family, gguf_type, tmp_path):
    # transformers reads GPT-2's position table at its default length (it ignores context_length), so 1024 here
    model = DECODERS[family](**({"n_positions": 1024} if family == "gpt2" else {}))
    tokenizer = bpe_tokenizer()
    write_gguf(model, tokenizer, tmp_path / "m.gguf", gguf_type)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    text = sample_texts(1)[0][:500]
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        diff = (back(ids).logits - model(ids).logits).abs().max().item()
    assert diff < GGUF_TOLERANCE[gguf_type] * max(1.0, model(ids).logits.abs().max().item())
    from alambic.modeling import num_layers

    assert num_layers(back.config) == num_layers(model.config)
    reread = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert reread(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_gguf_q8_0_is_a_quarter_of_f32(tmp_path):
    model = tiny_llama(hidden_size=64, intermediate_size=128)
    sizes = {}
    for gguf_type in ("f32", "f16", "q8_0"):
        write_gguf(model, bpe_tokenizer(), tmp_path / f"{gguf_type}.gguf", gguf_type)
        sizes[gguf_type] = (tmp_path / f"{gguf_type}.gguf").stat().st_size
    import gguf

    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "q8_0.gguf").tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" not in types  # tied to token_embd: stored once
    assert sizes["f32"] > sizes["f16"] > sizes["q8_0"]


def test_gguf_export_carries_a_gguf_teachers_tokenizer_over(root, tmp_path):
    # a "teacher" GGUF with a chat template and a pre-tokenizer name of its own: the student's export copies both
    import gguf

    tokenizer = copy.deepcopy(bpe_tokenizer())  # the cached tokenizer is shared: other tests need it template-free
    tokenizer.chat_template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
    write_gguf(tiny_llama(), tokenizer, tmp_path / "teacher.gguf", "f16")
    manifest = export(root / "llama", "gguf", tmp_path / "out", gguf_type="q8_0",
                      tokenizer_from=str(tmp_path / "teacher.gguf"), log=lambda line: None)
    fields = gguf.GGUFReader(tmp_path / "out" / manifest["files"][0]).fields
    assert fields["tokenizer.chat_template"].contents() == tokenizer.chat_template
    assert fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    assert manifest["tokenizer_from"] == str(tmp_path / "teacher.gguf")
    runtimes = {p["runtime"] for p in manifest["parity"]}
    assert "transformers" in runtimes
    assert all(p["top1_agreement"] >= 0.95 for p in manifest["parity"])


def test_gguf_runs_in_llama_cpp(root, tmp_path):
    pytest.importorskip("llama_cpp", exc_type=ImportError)  # not installed, or installed without its deps
    manifest = export(root / "llama", "gguf", tmp_path / "out", log=lambda line: None)
    model = load_exported(tmp_path / "out")
    assert model.runtime == "llama.cpp"
    assert {p["runtime"] for p in manifest["parity"]} == {"llama.cpp", "transformers"}
    tokenizer = bpe_tokenizer()
    batch = encode(tokenizer, tiny_llama(), list(SAMPLE_TEXTS), max_length=64)
    with torch.no_grad():
        reference = {"logits": tiny_llama()(**batch).logits}
    result = parity(reference, {"logits": model(**batch).logits}, batch["attention_mask"])
    assert result["max_abs_diff"] < 2e-3 and result["top1_agreement"] == 1.0


# --- measured like any model ----------------------------------------------------------------------------------------

def test_report_measures_exports_in_their_runtimes(root, tmp_path):
    for fmt in ("onnx", "onnx-int8", "torch-int8", "gguf"):
        assert cli("export", root / "llama", "--format", fmt, "--out", tmp_path / fmt) == 0
    settings = ReportSettings(seq_lens=[32], batch_size=2, warmup=0, repeats=1, threads=1,
                              lm_data=[str(root / "text.txt")], max_tokens=512)
    models = [str(root / "llama")] + [str(tmp_path / fmt) for fmt in ("onnx", "onnx-int8", "torch-int8", "gguf")]
    report = build_report(models, settings, log=None, warn=None)
    rows = {row["name"]: row for row in report["models"]}
    teacher, onnx = rows[str(root / "llama")], rows[str(tmp_path / "onnx")]
    assert teacher["runtime"] == "torch float32" and onnx["runtime"] == "onnxruntime float32"
    assert rows[str(tmp_path / "onnx-int8")]["runtime"] == "onnxruntime int8 dynamic"
    assert rows[str(tmp_path / "torch-int8")]["format"] == "torch-int8"
    assert onnx["disk_bytes"] == (tmp_path / "onnx" / "model.onnx").stat().st_size
    assert rows[str(tmp_path / "torch-int8")]["disk_bytes"] == (tmp_path / "torch-int8" / "model-int8.pt").stat().st_size
    for row in report["models"]:
        assert row["parameters"] == teacher["parameters"]
        assert row["flops"][0]["measured_per_token"] == teacher["flops"][0]["measured_per_token"]
        assert row["speed"] and row["speed"][0]["runtime"] == row["runtime"].split()[0]
    # the float ONNX graph scores the held-out text as PyTorch does; the quantised ones nearly so
    assert onnx["quality"]["perplexity"] == pytest.approx(teacher["quality"]["perplexity"], rel=1e-5)
    for row in report["models"]:
        assert row["quality"]["tokens"] == teacher["quality"]["tokens"]
        assert row["ratios"]["quality_retention_pct"] == pytest.approx(100, abs=2)


def test_eval_task_and_report_score_a_classification_export(root, tmp_path, capsys):
    data = "tests/data/topics.csv"
    assert cli("export", root / "classification", "--format", "onnx-int8", "--out", tmp_path / "int8") == 0
    capsys.readouterr()
    assert cli("eval-task", root / "classification", tmp_path / "int8", "--task", "classification", "--data", data,
               "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[1]["parameters"] == rows[0]["parameters"]
    assert abs(rows[1]["accuracy"] - rows[0]["accuracy"]) <= 1 / 18 + 1e-9  # at most one of 18 texts flips
    settings = ReportSettings(seq_lens=[16], batch_size=2, warmup=0, repeats=1, threads=1, task="classification",
                              data=[data])
    report = build_report([str(root / "classification"), str(tmp_path / "int8")], settings, log=None, warn=None)
    assert report["models"][1]["quality"]["value"] == pytest.approx(rows[1]["accuracy"])


# --- refused in one line -----------------------------------------------------------------------------------------

def bad_requests(root):
    mistral = root / "mistral"
    if not mistral.exists():
        config = transformers.MistralConfig(vocab_size=512, hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)
        transformers.MistralForCausalLM(config).save_pretrained(mistral)
        bpe_tokenizer().save_pretrained(mistral)
    (root / "taken").mkdir(exist_ok=True)
    return {
        "gguf of an encoder": (["export", root / "classification", "--format", "gguf"],
                               "GGUF is a format for decoders (llama.cpp); this model is a bert encoder"),
        "gguf of an architecture it does not map": (["export", mistral, "--format", "gguf"],
                                                    "GGUF export takes gpt2, llama, qwen2 decoders, not mistral"),
        "static int8 without calibration": (["export", root / "classification", "--format", "onnx-int8", "--int8",
                                             "static"], "--int8 static fixes activation scales on calibration text"),
        "output exists": (["export", root / "llama", "--format", "onnx", "--out", root / "taken"],
                          "already exists; remove it or choose another folder"),
        "option of another format": (["export", root / "llama", "--format", "onnx", "--gguf-type", "q8_0"],
                                     "--gguf-type only applies to --format gguf"),
        "tokenizer from another vocabulary": (["export", root / "llama", "--format", "gguf", "--tokenizer-from",
                                               root / "text.txt"], "is not a .gguf file"),
        "model missing": (["export", root / "nope", "--format", "onnx"], "no such file or folder"),
    }


BAD_REQUESTS = ["gguf of an encoder", "gguf of an architecture it does not map", "static int8 without calibration",
                "output exists", "option of another format", "tokenizer from another vocabulary", "model missing"]


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_request_is_one_line_exit_2_and_writes_nothing(case, root, tmp_path, capsys):
    requests = bad_requests(root)
    assert sorted(requests) == sorted(BAD_REQUESTS)
    argv, message = requests[case]
    if "--out" not in argv:
        argv = argv + ["--out", tmp_path / "out"]
    code = cli(*argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("alambic: error: ") and message in lines[0], err
    assert not (tmp_path / "out").exists()
    assert not any((root / "taken").iterdir())


def test_a_broken_manifest_is_named(root, tmp_path):
    export(root / "llama", "torch-int8", tmp_path / "q", log=lambda line: None)
    (tmp_path / "q" / "model-int8.pt").unlink()
    from alambic.errors import AlambicError

    with pytest.raises(AlambicError, match="lacks model-int8.pt, which its alambic-export.json lists"):
        read_manifest(tmp_path / "q")


# --- an export is held to its bound, and feeds on its own tokenizer's output ----------------------------------------

def test_the_onnx_graph_takes_what_its_saved_tokenizer_returns(root, tmp_path):
    import onnxruntime

    # a BERT classifier (two token types) whose tokenizer returns no token_type_ids
    source = tmp_path / "classifier"
    task_model("classification").save_pretrained(source)
    transformers.AutoTokenizer.from_pretrained(MINILM_DIR, model_input_names=["input_ids", "attention_mask"]
                                               ).save_pretrained(source)
    export(source, "onnx", tmp_path / "onnx", log=lambda line: None)
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    saved = transformers.AutoTokenizer.from_pretrained(tmp_path / "onnx")
    feeds = dict(saved(["Shares rose.", "The striker scored twice in the second half."], padding=True,
                       return_tensors="np"))
    assert sorted(i.name for i in session.get_inputs()) == sorted(feeds) == ["attention_mask", "input_ids"]
    (logits,) = session.run(["logits"], {name: value.astype("int64") for name, value in feeds.items()})
    with torch.no_grad():
        expected = transformers.AutoModelForSequenceClassification.from_pretrained(source)(
            **{name: torch.from_numpy(value) for name, value in feeds.items()}).logits
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-5)
    # the same model with a tokenizer that does return them keeps the input (sentence pairs need it)
    export(root / "classification", "onnx", tmp_path / "pairs", log=lambda line: None)
    session = onnxruntime.InferenceSession(str(tmp_path / "pairs" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert "token_type_ids" in {i.name for i in session.get_inputs()}


def test_a_tokenizer_gguf_cannot_carry_is_named_in_one_line(tmp_path, capsys):
    # a WordLevel tokenizer without an unknown token: it cannot even encode the parity texts
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(512)}))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tiny_llama().save_pretrained(tmp_path / "model")
    transformers.PreTrainedTokenizerFast(tokenizer_object=words, eos_token="w2", pad_token="w0").save_pretrained(
        tmp_path / "model")
    capsys.readouterr()
    assert cli("export", tmp_path / "model", "--format", "gguf", "--out", tmp_path / "out") == 2
    assert capsys.readouterr().err.strip() == (
        "alambic: error: GGUF export builds byte-level BPE vocabularies only; this tokenizer is WordLevel: give the "
        "teacher's .gguf with --tokenizer-from FILE.gguf to carry its vocabulary over, or export with --format onnx")
    assert not (tmp_path / "out").exists()


def test_an_export_outside_its_bound_is_not_written_unless_asked(root, tmp_path, capsys, monkeypatch):
    import alambic.workflows.export as export_module

    # int8 always moves the logits a little: a bound of zero KL is one it misses
    monkeypatch.setitem(export_module.INT8_BOUND, "max_mean_kl", 0.0)
    assert cli("export", root / "llama", "--format", "torch-int8", "--out", tmp_path / "q") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("alambic: error: the torch-int8 export disagrees with PyTorch beyond its bound (mean KL ")
    assert err.endswith(f"(bound 0) in torch), so {tmp_path / 'q'} was not written; --allow-disagreement writes it "
                        "anyway, marked in alambic-export.json")
    assert not (tmp_path / "q").exists() and not list(tmp_path.glob(".tmp-*"))
    assert cli("export", root / "llama", "--format", "torch-int8", "--out", tmp_path / "q", "--allow-disagreement") == 0
    manifest = read_manifest(tmp_path / "q")
    assert manifest["parity_outside_bound"][0].startswith("mean KL ") and manifest["parity_bound"]["max_mean_kl"] == 0
    # the bound a float export meets, by the same measure
    assert export(root / "llama", "onnx", tmp_path / "float", log=lambda line: None)["parity_bound"] == (
        export_module.FLOAT_BOUND)
    assert "parity_outside_bound" not in read_manifest(tmp_path / "float")


def test_static_int8_is_checked_on_texts_it_was_not_calibrated_on(root, tmp_path):
    lines = []
    texts = [f"Paragraph {i}: " + t[:300].replace("\n", " ") for i, t in enumerate(sample_texts(60))]
    (tmp_path / "paragraphs.txt").write_text("\n\n".join(texts))
    manifest = export(root / "classification", "onnx-int8", tmp_path / "static", int8="static",
                      calibration_data=[str(tmp_path / "paragraphs.txt")], log=lines.append)
    from alambic.workflows.export import CALIBRATION_TEXTS, PARITY_TEXTS

    assert manifest["parity"][0]["texts"] == PARITY_TEXTS
    tokenizer = wordpiece_tokenizer()
    # the parity batch held the paragraphs after the calibration ones: as many tokens as they have
    expected = sum(min(len(tokenizer(t)["input_ids"]), 128) for t in texts[CALIBRATION_TEXTS:CALIBRATION_TEXTS + 16])
    assert manifest["parity"][0]["tokens"] == expected


def test_parity_counts_clear_rows_apart_and_its_kl_is_the_direct_one():
    reference = torch.tensor([[[3.0, 0.0, 0.0], [0.5, 0.45, 0.0]]])  # a clear top prediction, then a near tie
    exported = torch.tensor([[[2.9, 0.1, 0.0], [0.4, 0.5, 0.0]]])  # the tie flips, the clear one holds
    result = parity({"logits": reference}, {"logits": exported}, torch.ones(1, 2))
    assert result["top1_agreement"] == 0.5 and result["rows"] == 2
    assert result["clear_rows"] == 1 and result["clear_top1_agreement"] == 1.0
    kl = torch.nn.functional.kl_div(exported.log_softmax(-1), reference.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1).mean()
    assert result["mean_kl"] == pytest.approx(float(kl))
    assert result["max_abs_diff"] == pytest.approx(0.1) and result["max_abs_reference"] == 3.0
    from alambic.workflows.export import INT8_BOUND, parity_failures

    assert parity_failures(result, INT8_BOUND) == []
    assert parity_failures({**result, "mean_kl": 0.2}, INT8_BOUND) == ["mean KL 0.2 (bound 0.05)"]
