"""alambic eval-chat: ROUGE-L, answer accuracy, option likelihood and the teacher-relative metrics, checked against
hand-computed values and direct computations with full logits."""

import copy
import json

import pytest
import torch

from alambic.cli import main
from alambic.data.chat import read_chat
from alambic.errors import AlambicError
from alambic.evaluation.chat import (Answers, TeacherAnswers, answer_matches, chat_items, evaluate_chat,
                                     evaluate_model, generate_answers, normalize_answer, option_continuations,
                                     option_scores, rouge_l)
from tiny import bpe_tokenizer, chat_records, chat_tokenizer, save_chat_teacher_and_data, tiny_llama

TOPICS = ["business", "entertainment", "politics", "sports", "tech"]


def short_records(n: int = 8) -> list[dict]:
    """The tiny chat records with prompts cut to fit the tiny Llama's 256 positions; single-turn ones with the
    five BBC topics as options."""
    records = []
    for record in chat_records(n):
        messages = record["messages"]
        messages[0]["content"] = messages[0]["content"][:100]
        records.append({"messages": messages, **({"options": TOPICS} if len(messages) == 2 else {})})
    return records


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def chat_llama(seed: int, **overrides):
    tok = chat_tokenizer()
    return tiny_llama(seed, vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      **overrides)


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    path = write_jsonl(tmp_path_factory.mktemp("chat") / "short.jsonl", short_records())
    return chat_items(read_chat([path], need_response=False), chat_tokenizer())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = save_chat_teacher_and_data(tmp_path_factory.mktemp("eval-chat"))
    chat_llama(1, num_hidden_layers=2).save_pretrained(root / "student")
    chat_tokenizer().save_pretrained(root / "student")
    write_jsonl(root / "short.jsonl", short_records(6))
    return root


# --- text metrics ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction, reference, expected", [
    ("the cat sat on the mat", "the cat is on the mat", 5 / 6),  # LCS "the cat on the mat": P = R = 5/6
    ("police kill the gunman", "police killed the gunman", 3 / 4),  # Lin (2004): LCS 3 of 4 words each
    ("the gunman kill police", "police killed the gunman", 2 / 4),  # word order matters: LCS "the gunman"
    ("a b c d", "a c", 2 * (2 / 4) * 1 / (2 / 4 + 1)),  # P = 2/4, R = 2/2
    ("The Cat.", "the cat", 1.0),  # lowercase, punctuation is no word
    ("서울에서 만나요", "서울에서 봐요", 1 / 2),  # Hangul words count (rouge-score's own tokeniser drops them)
    ("sports", "business", 0.0),
    ("", "business", 0.0),
    ("...", "!", 1.0),  # two answers without words are equal
])
def test_rouge_l_matches_hand_computed_values(prediction, reference, expected):
    assert rouge_l(prediction, reference) == pytest.approx(expected)


def test_generation_accuracy_normalises_then_needs_the_gold_words_first():
    assert normalize_answer("  Hello,\n  World!  ") == "hello world"
    assert normalize_answer("«Tech»…") == "tech"  # Unicode punctuation too
    assert answer_matches("Business.", "business")
    assert answer_matches("BUSINESS news, clearly!", "business")
    assert answer_matches("new york city", "New York")
    assert not answer_matches("sports", "sport")  # words, not characters
    assert not answer_matches("new", "new york")
    assert not answer_matches("The topic is business", "business")  # must begin with the gold answer
    assert not answer_matches("", "business")
    assert not answer_matches("anything", "?!")  # a gold answer without words matches nothing


# --- option likelihood ----------------------------------------------------------------------------------------------

def test_option_likelihood_matches_a_direct_computation_with_full_logits(items):
    tok, model = chat_tokenizer(), chat_llama(0)
    scored = [item for item in items if item.options]
    assert len(scored) >= 4 and all(len(item.options) == 5 for item in scored)
    batched = option_scores(model, tok, items, batch_size=3)  # padded batches that mix records
    direct = []
    with torch.no_grad():
        for item in scored:
            sums = []
            for option in item.options:
                whole = tok(item.prompt_text + option, add_special_tokens=False)["input_ids"]
                assert whole[:len(item.prompt_ids)] == list(item.prompt_ids)  # the tokenisation the docstring says
                ids = whole + [tok.convert_tokens_to_ids("<|im_end|>")]  # end-of-turn token scored too
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
                sums.append(sum(float(logp[t - 1, ids[t]]) for t in range(len(item.prompt_ids), len(ids))))
            direct.append(sums)
    assert batched == [pytest.approx(d, abs=1e-4) for d in direct]
    assert [c[-1] for item in scored for c in option_continuations(tok, item)] == [tok.eos_token_id] * 5 * len(scored)

    answers = Answers([[5]] * len(items), ["x"] * len(items), [False] * len(items))
    row = evaluate_model(model, tok, items, answers=answers, batch_size=4)
    golds = [item.options.index(item.reference) for item in scored]
    argmax = [max(range(5), key=d.__getitem__) for d in direct]
    norm = [max(range(5), key=lambda i: d[i] / len(item.options[i].encode())) for d, item in zip(direct, scored)]
    assert row["option_accuracy"] == pytest.approx(sum(a == g for a, g in zip(argmax, golds)) / len(golds))
    assert row["option_accuracy_norm"] == pytest.approx(sum(a == g for a, g in zip(norm, golds)) / len(golds))
    assert row["option_examples"] == len(scored) and row["examples"] == len(items)


# --- teacher-relative metrics ---------------------------------------------------------------------------------------

def test_teacher_nll_and_forward_kl_match_direct_computations_with_full_logits(items):
    tok, teacher, student = chat_tokenizer(), chat_llama(0), chat_llama(1, num_hidden_layers=2)
    theirs = generate_answers(teacher, tok, items, max_new_tokens=6, batch_size=3)
    ours = generate_answers(student, tok, items, max_new_tokens=6, batch_size=3)
    eos = tok.eos_token_id
    ours.ids[0], ours.stopped[0] = ours.ids[0][:2] + [eos], True  # one answer that ended: its EOS is scored
    ours.texts[0] = tok.decode(ours.ids[0], skip_special_tokens=True)
    row = evaluate_model(student, tok, items, teacher=TeacherAnswers(teacher, theirs), answers=ours, batch_size=3,
                         max_new_tokens=6)

    nll, tokens, kl, positions = 0.0, 0, 0.0, 0
    with torch.no_grad():
        for item, mine, its in zip(items, ours.ids, theirs.ids):
            p = len(item.prompt_ids)
            ids = list(item.prompt_ids) + mine
            logp = torch.log_softmax(teacher(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
            nll -= sum(float(logp[t - 1, ids[t]]) for t in range(p, len(ids)))
            tokens += len(mine)
            ids = torch.tensor([list(item.prompt_ids) + its])
            t_logp = torch.log_softmax(teacher(input_ids=ids).logits[0].double(), dim=-1)
            s_logp = torch.log_softmax(student(input_ids=ids).logits[0].double(), dim=-1)
            for t in range(p - 1, ids.shape[1] - 1):  # sum over the whole vocabulary at each answer position
                kl += float((t_logp[t].exp() * (t_logp[t] - s_logp[t])).sum())
                positions += 1
    assert row["teacher_nll"] == pytest.approx(nll / tokens, rel=1e-5)
    assert row["forward_kl"] == pytest.approx(kl / positions, rel=1e-4)
    assert row["forward_kl"] > 0.01
    assert row["rouge_l_teacher"] == pytest.approx(
        sum(rouge_l(a, b) for a, b in zip(ours.texts, theirs.texts)) / len(items))
    lengths = [len(ids) - stopped for ids, stopped in zip(ours.ids, ours.stopped)]
    assert row["mean_tokens"] == pytest.approx(sum(lengths) / len(items))
    assert row["hit_max_new_tokens"] == pytest.approx(sum(not s for s in ours.stopped) / len(items))
    assert lengths[0] == 2 and 0 < row["hit_max_new_tokens"] < 1


def test_seeded_sampling_repeats_and_greedy_ignores_the_seed(items):
    tok, model = chat_tokenizer(), chat_llama(0)
    few = items[:3]
    sampled = [generate_answers(model, tok, few, max_new_tokens=6, temperature=1.0, seed=s).ids for s in (7, 7, 8)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]
    greedy = [generate_answers(model, tok, few, max_new_tokens=6, seed=s).ids for s in (7, 8)]
    assert greedy[0] == greedy[1]


def test_loaded_models_need_their_tokenizer_and_a_name_each(tmp_path):
    records = read_chat([write_jsonl(tmp_path / "c.jsonl", short_records(2))], need_response=False)
    with pytest.raises(AlambicError, match="tokenizer="):
        evaluate_chat([chat_llama(0)], records)
    with pytest.raises(AlambicError, match="one name per model"):
        evaluate_chat([chat_llama(0)], records, tokenizer=chat_tokenizer(), names=["a", "b"])


# --- the verb -------------------------------------------------------------------------------------------------------

def test_eval_chat_end_to_end_json(files, tmp_path, capsys):
    out, answers = tmp_path / "rows.json", tmp_path / "answers" / "answers.jsonl"
    code = main(["eval-chat", str(files / "teacher"), str(files / "student"), "--names", "self,student",
                 "--teacher", str(files / "teacher"), "--data", str(files / "short.jsonl"), "--max-new-tokens", "8",
                 "--batch-size", "4", "--json", "--out", str(out), "--samples", str(answers)])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == json.loads(out.read_text())
    assert [r["model"] for r in rows] == ["self", "student"]
    keys = {"model", "parameters", "rouge_l", "accuracy", "option_accuracy", "option_accuracy_norm", "option_examples",
            "rouge_l_teacher", "teacher_nll", "forward_kl", "mean_tokens", "hit_max_new_tokens", "examples"}
    for row in rows:
        assert set(row) == keys
        assert row["examples"] == 6 and row["option_examples"] == 4  # records 3 and 6 are two-turn, without options
        assert all(0 <= row[k] <= 1 for k in ("rouge_l", "accuracy", "option_accuracy", "rouge_l_teacher",
                                               "hit_max_new_tokens"))
        assert 0 < row["mean_tokens"] <= 8 and row["teacher_nll"] > 0
    self_row, student_row = rows
    assert self_row["forward_kl"] == pytest.approx(0.0, abs=1e-6)  # the teacher evaluated against itself
    assert self_row["rouge_l_teacher"] == 1.0
    assert student_row["forward_kl"] > 0.01 and student_row["parameters"] < self_row["parameters"]

    # the answers behind the figures: one line per prompt, each model's answer and the teacher's
    samples = [json.loads(line) for line in answers.read_text().splitlines()]
    records = [json.loads(line) for line in (files / "short.jsonl").read_text().splitlines()]
    assert [s["messages"] for s in samples] == [r["messages"][:-1] for r in records]
    assert [s["gold"] for s in samples] == [r["messages"][-1]["content"] for r in records]
    assert all(set(s["answers"]) == {"teacher", "self", "student"} for s in samples)
    assert all(s["answers"]["self"] == s["answers"]["teacher"] for s in samples)  # greedy: the same model, same text
    assert all(s["where"].endswith(f"short.jsonl:{i}") for i, s in enumerate(samples, 1))
    for row in rows:
        assert row["rouge_l"] == pytest.approx(
            sum(rouge_l(s["answers"][row["model"]], s["gold"]) for s in samples) / len(samples))

    assert main(["eval-chat", str(files / "student"), "--data", str(files / "short.jsonl"), "--max-examples", "2",
                 "--max-new-tokens", "4", "--temperature", "1", "--seed", "3"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["model", "params", "(M)", "rouge_l"] and "forward_kl" not in table[0]
    assert table[2].split()[0] == str(files / "student") and table[2].split()[-1] == "2"


def test_a_gguf_export_answers_as_its_source(files, tmp_path, capsys):
    """`alambic export --format gguf` folders are evaluated in their runtime (llama.cpp when installed, else
    transformers' GGUF reader): a float32 file gives its source's greedy answers and figures."""
    from alambic.workflows.export import export

    student = tmp_path / "student"  # a wide initialisation: its greedy answers are words, not blank lines
    chat_llama(1, num_hidden_layers=2, initializer_range=0.3).save_pretrained(student)
    chat_tokenizer().save_pretrained(student)
    export(student, "gguf", tmp_path / "gguf", gguf_type="f32", log=lambda line: None)
    samples = tmp_path / "answers.jsonl"
    assert main(["eval-chat", str(student), str(tmp_path / "gguf"), "--names", "source,gguf", "--teacher",
                 str(files / "teacher"), "--data", str(files / "short.jsonl"), "--max-new-tokens", "8", "--json",
                 "--samples", str(samples)]) == 0
    source, exported = json.loads(capsys.readouterr().out)
    answers = [json.loads(line)["answers"] for line in samples.read_text().splitlines()]
    assert all(a["gguf"] == a["source"] for a in answers) and any(a["gguf"].strip() for a in answers)
    for key in ("parameters", "rouge_l", "accuracy", "option_accuracy", "option_accuracy_norm", "rouge_l_teacher",
                "mean_tokens", "hit_max_new_tokens"):
        assert exported[key] == source[key], key
    for key in ("teacher_nll", "forward_kl"):  # float32 in another runtime: round-off only
        assert exported[key] == pytest.approx(source[key], rel=1e-3, abs=1e-4), key


def _int8_export(files, root):
    from alambic.workflows.export import export

    export(files / "student", "torch-int8", root / "int8", log=lambda line: None)
    return root / "int8"


def _no_template_model(root):
    chat_llama(0).save_pretrained(root / "plain")
    tok = copy.deepcopy(chat_tokenizer())
    tok.chat_template = None
    tok.save_pretrained(root / "plain")  # the chat vocabulary, no chat template
    return root / "plain"


BAD = {
    "missing data file": (lambda f, t: ["{teacher}", "--data", str(t / "nope.jsonl")], "no such file"),
    "model without chat template": (lambda f, t: [str(_no_template_model(t)), "--data", "{data}"], "no chat template"),
    "record without final answer": (
        lambda f, t: ["{teacher}", "--data", write_jsonl(t / "q.jsonl", [{"prompt": "Which topic?"}])],
        "does not end with an assistant answer"),
    "gold not among options": (
        lambda f, t: ["{teacher}", "--data", write_jsonl(t / "o.jsonl", [
            {"prompt": "Which topic?", "completion": "sport", "options": TOPICS}])],
        "is not one of 'options'"),
    "another tokenizer": (
        lambda f, t: [str(_bpe_model(t)), "--data", "{data}", "--teacher", "{teacher}"], "another tokenizer"),
    "prompt longer than the positions": (lambda f, t: ["{teacher}", "--data", str(f / "chat.jsonl")],
                                         "exceed the 256 positions"),
    "names count": (lambda f, t: ["{teacher}", "--data", "{data}", "--names", "a,b"], "one name per model"),
    "an export that cannot generate": (lambda f, t: [str(_int8_export(f, t)), "--data", "{data}"],
                                       "is a torch-int8 export: chat evaluation generates with PyTorch models"),
    "max examples": (lambda f, t: ["{teacher}", "--data", "{data}", "--max-examples", "0"], "--max-examples"),
    "out is a folder": (lambda f, t: ["{teacher}", "--data", "{data}", "--out", str(t)], "is a folder"),
    "samples is a folder": (lambda f, t: ["{teacher}", "--data", "{data}", "--samples", str(t)], "--samples"),
}


def _bpe_model(root):
    tiny_llama(0).save_pretrained(root / "bpe")
    bpe_tokenizer().save_pretrained(root / "bpe")
    return root / "bpe"


@pytest.mark.parametrize("case", BAD)
def test_bad_inputs_are_one_line_and_exit_2(case, files, tmp_path, capsys):
    args, message = BAD[case]
    argv = [a.format(teacher=files / "teacher", data=files / "short.jsonl") for a in args(files, tmp_path)]
    assert main(["eval-chat", *argv, "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("alambic: error: ") and len(err.splitlines()) == 1 and "Traceback" not in err
    assert message in err


def test_the_teacher_reads_its_own_answers_once_for_every_model_compared(items):
    tok, teacher = chat_tokenizer(), chat_llama(0)
    students = [chat_llama(seed, num_hidden_layers=2) for seed in (1, 2)]
    taught = TeacherAnswers(teacher, generate_answers(teacher, tok, items, max_new_tokens=4, batch_size=3))
    calls = []
    hook = teacher.model.register_forward_hook(lambda *_: calls.append(1))
    rows, counts = [], []
    for student in students:
        before = len(calls)
        rows.append(evaluate_model(student, tok, items, teacher=taught, max_new_tokens=4, batch_size=3))
        counts.append(len(calls) - before)
    hook.remove()
    fresh = evaluate_model(students[1], tok, items, teacher=TeacherAnswers(teacher, taught.answers),
                           max_new_tokens=4, batch_size=3)
    assert fresh == rows[1]  # the kept rows give the figures a fresh teacher gives
    batches = -(-len(items) // 3)
    # the first model: its answers' NLL and the teacher's own answers; the second: its answers' NLL only
    assert counts == [2 * batches, batches]
    assert rows[0]["forward_kl"] != rows[1]["forward_kl"]
