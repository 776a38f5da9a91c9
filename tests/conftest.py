import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session gets its own alambic cache, so tests never see a user's cache or each other's leftovers."""
    monkeypatch.setenv("ALAMBIC_CACHE", str(tmp_path_factory.getbasetemp() / "alambic-cache"))
