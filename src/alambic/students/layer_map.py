"""Which teacher layer each student layer learns from: TinyBERT's g(m).

Layer 0 is the embedding output, layer m >= 1 the output of transformer layer m (1-based), on both sides.

A student alambic builds records the teacher layers it was copied from in ``alambic-layers.json`` (beside its
``config.json``; Hugging Face ignores it), so that ``copied`` can pair each student layer with its source: a student
of layers 0, 1, 8, ... of a 30-layer teacher learns layer 3 from teacher layer 9, where ``uniform`` would say 6.
``auto`` (TinyBERT's default here) is ``copied`` for such a student and ``uniform`` for any other.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from alambic.errors import AlambicError

STRATEGIES = ("auto", "uniform", "last", "copied")
LAYERS_FILE = "alambic-layers.json"


def parse_layer_map(spec: str, student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """``[(m, g(m)), ...]`` for ``spec``:

    - ``uniform``: ``g(m) = m * N / M`` for m = 0..M (TinyBERT), rounded half up when M does not divide N
      (4 of 6: ``0:0,1:2,2:3,3:5,4:6``); ``auto`` means the same here, and ``copied`` once resolved;
    - ``last``: the last student layer learns from the last teacher layer (MiniLM);
    - ``copied``: each layer from the teacher layer it was copied from; resolve it first with
      :func:`resolve_layer_map`, which knows the student's source layers;
    - explicit ``0:0,1:4,2:8,3:12``: student:teacher pairs, both increasing.
    """
    M, N = student_layers, teacher_layers
    spec = str(spec).strip()
    if spec in ("uniform", "auto"):
        if M > N:
            raise AlambicError(f"a uniform layer map needs a student ({M} layers) no deeper than its teacher ({N}); "
                               "give an explicit map")
        return uniform_map(M, N)
    if spec == "last":
        return [(M, N)]
    if spec == "copied":
        raise AlambicError(f"layer map copied needs the teacher layers the student was copied from ({LAYERS_FILE} "
                           "in a student folder alambic wrote); give uniform or student:teacher pairs instead")
    try:
        pairs = [tuple(int(x) for x in item.split(":")) for item in spec.split(",") if item.strip()]
        if not pairs or any(len(p) != 2 for p in pairs):
            raise ValueError
    except ValueError:
        raise AlambicError(
            f"layer map {spec!r} is not auto, uniform, last, copied, or student:teacher pairs such as "
            f"{_example(M, N)}"
        ) from None
    for m, g in pairs:
        if not 0 <= m <= M:
            raise AlambicError(f"layer map {spec!r}: student layer {m} is out of range 0-{M} (0 = embeddings)")
        if not 0 <= g <= N:
            raise AlambicError(f"layer map {spec!r}: teacher layer {g} is out of range 0-{N} (0 = embeddings)")
    for (m1, g1), (m2, g2) in zip(pairs, pairs[1:]):
        if m2 <= m1 or g2 <= g1:
            raise AlambicError(
                f"layer map {spec!r} is not monotonic: student and teacher layers must both increase ({m1}:{g1} then {m2}:{g2})"
            )
    if any((m == 0) != (g == 0) for m, g in pairs):
        raise AlambicError(f"layer map {spec!r}: the embeddings (layer 0) can only map to the embeddings")
    return pairs


def uniform_map(M: int, N: int) -> list[tuple[int, int]]:
    return [(m, math.floor(m * N / M + 0.5)) for m in range(M + 1)]


def _example(M: int, N: int) -> str:
    return ",".join(f"{m}:{g}" for m, g in uniform_map(M, N))


def copied_map(source_layers: list[int], with_embeddings: bool = True) -> list[tuple[int, int]]:
    """Embeddings to embeddings (unless not ``with_embeddings``), then student layer m (1-based) to the teacher
    layer it was copied from."""
    return [(0, 0)] * with_embeddings + [(m, layer + 1) for m, layer in enumerate(source_layers, 1)]


def layers_record(source: tuple[list[int], int] | None) -> dict[str, str]:
    """The file a student folder carries so that ``copied`` works on it later, as ``{name: text}``, for ``source`` =
    ``(teacher layers it was copied from, teacher depth)``; empty when its layers were not copied (None)."""
    if source is None:
        return {}
    layers, teacher_layers = source
    return {LAYERS_FILE: json.dumps({"teacher_layers": teacher_layers, "layers": list(layers)}) + "\n"}


def recorded_layers(folder) -> tuple[list[int], int] | None:
    """``(source layers, teacher depth)`` recorded in a student folder, or None (a folder alambic did not build)."""
    path = Path(folder) / LAYERS_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    return list(record["layers"]), int(record["teacher_layers"])


def resolve_layer_map(spec: str, source: tuple[list[int], int] | None, student_layers: int, teacher_layers: int,
                      with_embeddings: bool = True) -> tuple[str, str | None]:
    """``spec`` with ``copied`` replaced by its explicit pairs, ``auto`` by ``copied``'s pairs when the student's
    source layers are known (else ``uniform``), and a note saying which pairs were used, or when ``uniform`` pairs a
    student layer with another teacher layer than its source. ``source``: :func:`recorded_layers`' answer, or None;
    ``with_embeddings``: whether the recipe compares embedding outputs (pair 0:0; MiniLM does not)."""
    spec = str(spec).strip()
    if spec not in ("auto", "copied", "uniform"):
        return spec, None
    if source is None or source[1] != teacher_layers or len(source[0]) != student_layers:
        if spec == "copied" and source is not None:
            raise AlambicError(f"layer map copied: the student's {LAYERS_FILE} records {len(source[0])} layers copied "
                               f"from a {source[1]}-layer teacher, but the student has {student_layers} and the "
                               f"teacher {teacher_layers}; give uniform or student:teacher pairs")
        return ("uniform" if spec == "auto" else spec), None  # copied without a record: parse_layer_map says so
    layers = source[0]
    copied = ",".join(f"{m}:{g}" for m, g in copied_map(layers, with_embeddings))
    if spec in ("auto", "copied"):
        return copied, f"layer map {spec}: {copied} (student:teacher layers, 0 = embeddings: each student layer " \
                       "from the teacher layer it was copied from)"
    if teacher_layers >= student_layers and uniform_map(student_layers, teacher_layers) != copied_map(layers):
        return spec, (f"layer map uniform pairs student:teacher layers {_example(student_layers, teacher_layers)}, "
                      f"but the student's layers were copied from {copied}: layer map copied pairs each with its "
                      "source")
    return spec, None
