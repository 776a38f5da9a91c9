import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every machine counts as a CPU without native bf16, so `mixed_precision: auto` trains in fp32 everywhere and the
# figures tests compare do not depend on the CPU CI draws; tests of the choice itself describe the hardware.
os.environ["ALAMBIC_CPU_BF16"] = "0"

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Each test session gets its own alambic cache, so tests never see a user's cache. Session-scoped, so it is in
    place before any module-scoped fixture tokenises (a function-scoped one came after them)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ALAMBIC_CACHE", str(tmp_path_factory.getbasetemp() / "alambic-cache"))
        yield


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    """A folder of twelve short real-text files, one document each (the engine's and checkpoints' tests train on it)."""
    from tiny import sample_texts

    folder = tmp_path_factory.mktemp("text")
    for i, text in enumerate(sample_texts(12)):
        (folder / f"{i}.txt").write_text(text)
    return str(folder)
