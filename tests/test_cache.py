import os
import stat

import pytest

from alambic.cache import atomic_directory, atomic_write_text


def test_atomic_outputs_have_ordinary_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "model") as tmp:
            (tmp / "config.json").write_text("{}")
        atomic_write_text(tmp_path / "report.md", "x")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "report.md").stat().st_mode) == 0o644


def test_interrupted_directory_write_leaves_the_old_one(tmp_path):
    with atomic_directory(tmp_path / "model") as tmp:
        (tmp / "weights").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(tmp_path / "model") as tmp:
            (tmp / "weights").write_text("half")
            raise KeyboardInterrupt
    assert (tmp_path / "model" / "weights").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
