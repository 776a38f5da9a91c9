"""Teacher cache format 2 (alambic.offline.compact): the encoding round-trips within its stated bounds, a run reads
format 1 and format 2 caches alike, and a format it does not know is refused in one line."""

import json
import math

import numpy as np
import pytest
import torch

from alambic.cli import main
from alambic.errors import AlambicError
from alambic.offline import compact
from alambic.offline.store import TeacherOutputs, read_manifest
from alambic.workflows.cache_teacher import cache_teacher
from tiny import bpe_tokenizer, sample_texts, tiny_llama

QUIET = {"log": lambda line: None}


def bucket_width(gaps):
    """The width of the 6-bit code's bucket each gap falls in: the most a decoded gap can be off."""
    codes = compact.encode_gaps(np.asarray(gaps, dtype=np.float64))

    def edge(u):
        return -2 * np.log(1 - u / 63)

    return torch.as_tensor(edge(np.minimum(codes + 0.5, 62.999)) - edge(np.maximum(codes - 0.5, 0)))


def test_varints_round_trip_across_byte_lengths():
    values = np.array([0, 1, 127, 128, 300, 16383, 16384, 2**21 - 1, 2**21, 2**27], dtype=np.int64)
    encoded = compact._varint(values)
    assert len(encoded) == 1 + 1 + 1 + 2 + 2 + 2 + 3 + 3 + 4 + 4
    assert np.array_equal(compact._unvarint(encoded), values)


def test_gap_codes_are_exact_at_zero_and_within_half_a_step_elsewhere():
    gaps = np.linspace(0, 12, 2001)
    codes = compact.encode_gaps(gaps)
    decoded = compact.decode_gaps(codes)
    assert decoded[0] == 0 and (np.diff(codes.astype(int)) >= 0).all()
    inner = codes < 63

    def edge(u):  # the gap where the code u / 63 of the companding lies
        return -2 * np.log(1 - u / 63)

    low, high = edge(np.maximum(codes - 0.5, 0)), edge(np.minimum(codes + 0.5, 62.999))
    assert ((low - 1e-9 <= gaps) & (gaps <= high + 1e-9))[inner].all()  # each gap in its code's bucket
    assert ((low <= decoded) & (decoded <= high))[inner].all()  # decoded inside the same bucket
    edge = -2 * math.log(0.5 / 63)  # where the last code starts: 9.67 nats
    assert (gaps[~inner] >= edge - 1e-9).all() and (decoded[~inner] == edge + 1).all()


def test_a_block_round_trips_ids_exactly_and_log_probs_within_the_code_step():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 5000, generator=generator) * 3
    log_probs, ids = torch.log_softmax(logits, -1).topk(64, -1)
    blob, top = compact.encode_block(ids, log_probs)
    decoded_ids, decoded = compact.decode_block(blob, top, 64)
    order = ids.argsort(-1)
    assert torch.equal(decoded_ids, ids.gather(-1, order))  # ascending, every id kept
    expected = log_probs.gather(-1, order)
    gaps = log_probs.max(-1, keepdim=True).values - expected
    inner = gaps < 9.6
    width = bucket_width(gaps.numpy()).float()
    assert ((decoded - expected).abs()[inner] <= width[inner] + 2e-3).all()
    assert (decoded[~inner] <= expected.max(-1, keepdim=True).values.expand_as(decoded)[~inner] - 9.6).all()
    assert torch.equal(top, log_probs.max(-1).values.half())
    assert len(blob) < 40 * 64 * 4  # smaller than format 1's ids and float16 log-probs


@pytest.fixture(scope="module")
def teacher_and_text(tmp_path_factory):
    root = tmp_path_factory.mktemp("compact")
    tiny_llama().save_pretrained(root / "llama")
    bpe_tokenizer().save_pretrained(root / "llama")
    (root / "text.txt").write_text("\n\n".join(sample_texts(12)))
    return root


def test_format_1_and_format_2_caches_read_alike(teacher_and_text, tmp_path):
    root = teacher_and_text
    for version in (1, 2):
        cache_teacher(root / "llama", [str(root / "text.txt")], tmp_path / f"v{version}", top_k=16, max_length=32,
                      shard_examples=8, format_version=version, **QUIET)
    one, two = (TeacherOutputs(tmp_path / f"v{v}", read_manifest(tmp_path / f"v{v}")) for v in (1, 2))
    assert one.manifest["format_version"] == 1 and two.manifest["format_version"] == 2
    assert two.manifest["bytes_per_token"] < one.manifest["bytes_per_token"]
    examples = [one[i] for i in (0, 9, 3, 17)]  # across shards and blocks, out of order
    a, b = one.rows(examples), two.rows([two[i] for i in (0, 9, 3, 17)])
    order = a["topk_ids"].argsort(-1)
    assert torch.equal(b["topk_ids"], a["topk_ids"].gather(-1, order))
    p = torch.cat([a["topk_log_probs"].exp(), a["rest_log_prob"].exp()[:, None]], -1)
    p = p / p.sum(-1, keepdim=True)  # format 1's float16 rows sum to 1 within 1e-3 only
    q = torch.cat([b["topk_log_probs"].gather(-1, order.argsort(-1)).exp(), b["rest_log_prob"].exp()[:, None]], -1)
    assert torch.allclose(q.sum(-1), torch.ones(len(q)), atol=1e-5)  # a distribution, renormalised on reading
    kl = (p * (p.clamp_min(1e-30).log() - q.clamp_min(1e-30).log())).sum(-1)
    assert float(kl.mean()) < 0.01 and float(kl.min()) > -1e-6


def test_a_run_trains_on_a_format_1_cache(teacher_and_text, tmp_path):
    root = teacher_and_text
    cache_teacher(root / "llama", [str(root / "text.txt")], tmp_path / "v1", top_k=8, max_length=32,
                  format_version=1, **QUIET)
    assert main(["distill", "--teacher-logits", str(tmp_path / "v1"), "--layers", "0,3", "--teacher",
                 str(root / "llama"), "--max-steps", "2", "--batch-size", "2", "--set", "data.max_length=32",
                 "--no-progress", "--out", str(tmp_path / "run")]) == 0
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(m["loss"]) for m in metrics if "loss" in m)


def test_an_unknown_format_is_refused_in_one_line(teacher_and_text, tmp_path, capsys):
    root = teacher_and_text
    cache_teacher(root / "llama", [str(root / "text.txt")], tmp_path / "cache", top_k=8, max_length=32, **QUIET)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    manifest["format_version"] = 3
    (tmp_path / "cache" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(AlambicError, match="is a teacher cache of format 3, this alambic reads formats 1 and 2"):
        read_manifest(tmp_path / "cache")
    assert main(["cache-teacher", "--teacher", str(root / "llama"), "--data", str(root / "text.txt"), "--out",
                 str(tmp_path / "other"), "--cache-format", "3"]) == 2
    assert "--cache-format must be in [1, 2], got 3" in capsys.readouterr().err
