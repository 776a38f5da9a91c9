"""Where alambic keeps what it computes once: converted GGUF teachers and tokenised corpora."""

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def cache_dir(kind: str) -> Path:
    """``$ALAMBIC_CACHE/<kind>`` (default ``~/.cache/alambic/<kind>``), created on demand."""
    root = Path(os.environ.get("ALAMBIC_CACHE", Path.home() / ".cache" / "alambic"))
    path = root / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_directory(final: Path):
    """Yield a temporary sibling directory; on success it replaces ``final`` in one rename.

    An interrupted writer leaves only a ``.tmp-*`` sibling behind, never a half-written ``final``.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".old-{final.name}-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp, final)
            except OSError:
                if not final.is_dir():
                    raise
                # Another process wrote ``final`` meanwhile (machines sharing a cache): keep theirs.
                shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the result is an ordinary file
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
