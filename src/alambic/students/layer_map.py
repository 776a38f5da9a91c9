"""Which teacher layer each student layer learns from: TinyBERT's g(m).

Layer 0 is the embedding output, layer m >= 1 the output of transformer layer m (1-based), on both sides.
"""

from __future__ import annotations

import math

from alambic.errors import AlambicError

STRATEGIES = ("uniform", "last")


def parse_layer_map(spec: str, student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """``[(m, g(m)), ...]`` for ``spec``:

    - ``uniform``: ``g(m) = m * N / M`` for m = 0..M (TinyBERT), rounded half up when M does not divide N
      (4 of 6: ``0:0,1:2,2:3,3:5,4:6``);
    - ``last``: the last student layer learns from the last teacher layer (MiniLM);
    - explicit ``0:0,1:4,2:8,3:12``: student:teacher pairs, both increasing.
    """
    M, N = student_layers, teacher_layers
    spec = str(spec).strip()
    if spec == "uniform":
        if M > N:
            raise AlambicError(f"a uniform layer map needs a student ({M} layers) no deeper than its teacher ({N}); "
                               "give an explicit map")
        return uniform_map(M, N)
    if spec == "last":
        return [(M, N)]
    try:
        pairs = [tuple(int(x) for x in item.split(":")) for item in spec.split(",") if item.strip()]
        if not pairs or any(len(p) != 2 for p in pairs):
            raise ValueError
    except ValueError:
        raise AlambicError(
            f"layer map {spec!r} is not uniform, last, or student:teacher pairs such as {_example(M, N)}"
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
