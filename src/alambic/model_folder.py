"""Is a model folder whole? ``check_model_folder`` reads what loading would trip on (config.json, the weight files'
presence, headers and sizes) and names the file and what is wrong with it, before transformers or safetensors get
to raise a traceback; ``run_folder_model`` maps an alambic run folder to the model it produced."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from alambic.errors import AlambicError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
RUN_MODELS = ("best", "student")
"""Where a run folder keeps its model, in order of preference: the best by validation (finetune, distill-task, and
distill with an evaluation metric), else the exported student (distill)."""


def run_folder_model(path: Path) -> Path | None:
    """``RUN/best`` or ``RUN/student`` when ``path`` is a run folder (no config.json of its own), else None."""
    if (path / "config.json").exists():
        return None
    return next((path / name for name in RUN_MODELS if (path / name / "config.json").is_file()), None)


def _safetensors_problem(file: Path) -> str | None:
    size = file.stat().st_size
    try:
        with file.open("rb") as handle:
            header_size = struct.unpack("<Q", handle.read(8))[0]
            if header_size > size - 8:
                return "truncated (its header is cut short)"
            header = json.loads(handle.read(header_size))
    except (struct.error, ValueError, UnicodeDecodeError):
        return "not a safetensors file (unreadable header)"
    ends = [entry["data_offsets"][1] for name, entry in header.items()
            if name != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry]
    needed = 8 + header_size + max(ends, default=0)
    if size < needed:
        return f"truncated ({size:,} bytes of {needed:,})"
    return None


def check_model_folder(path: Path) -> None:
    """Raise one readable line naming the file and the problem when ``path`` cannot load as a model."""
    config = path / "config.json"
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except OSError as error:
        raise AlambicError(f"{config} cannot be read ({error.strerror or error})") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise AlambicError(f"{config} is not valid JSON ({error}); restore the file or re-save the model") from None
    present = [name for name in WEIGHT_FILES if (path / name).is_file()]
    if not present:
        raise AlambicError(f"{path} has a config.json but no weights (none of {', '.join(WEIGHT_FILES[::2])}); "
                           "copy the weight files next to it")
    files = []
    for name in present:
        if name.endswith(".index.json"):
            try:
                shards = set(json.loads((path / name).read_text(encoding="utf-8"))["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
                raise AlambicError(f"{path / name} is not a readable weight index ({error})") from None
            missing = sorted(s for s in shards if not (path / s).is_file())
            if missing:
                raise AlambicError(f"{path / name} lists {missing[0]}, which is missing")
            files += [path / s for s in sorted(shards)]
        else:
            files.append(path / name)
    for file in files:
        if file.suffix == ".safetensors":
            problem = _safetensors_problem(file)
            if problem:
                raise AlambicError(f"{file} is {problem}; restore it or re-save the model")
        elif file.stat().st_size == 0:
            raise AlambicError(f"{file} is empty; restore it or re-save the model")
