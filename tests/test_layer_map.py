import pytest

from alambic.errors import AlambicError
from alambic.students.layer_map import parse_layer_map


def test_strategies():
    assert parse_layer_map("uniform", 4, 12) == [(0, 0), (1, 3), (2, 6), (3, 9), (4, 12)]
    assert parse_layer_map("last", 3, 6) == [(3, 6)]
    assert parse_layer_map("0:0,1:4,2:8", 2, 12) == [(0, 0), (1, 4), (2, 8)]
    assert parse_layer_map(" 2:5 ", 3, 6) == [(2, 5)]


def test_uniform_map_rounds_halves_up_when_depths_do_not_divide():
    # 4 of 6: g(m) = 1.5, 3, 4.5, 6 -> 2, 3, 5, 6 (Python's round would give 2, 3, 4, 6)
    assert parse_layer_map("uniform", 4, 6) == [(0, 0), (1, 2), (2, 3), (3, 5), (4, 6)]
    assert parse_layer_map("uniform", 4, 10) == [(0, 0), (1, 3), (2, 5), (3, 8), (4, 10)]


@pytest.mark.parametrize("spec, message", [
    ("uniform", "no deeper than its teacher"),
    ("0:0,5:6", "student layer 5 is out of range 0-4"),
    ("1:13", "teacher layer 13 is out of range 0-12"),
    ("1:6,2:4", "not monotonic"),
    ("1:3,1:6", "not monotonic"),
    ("0:3", "embeddings"),
    ("one:two", "not uniform, last, or student:teacher pairs"),
    ("", "not uniform, last"),
])
def test_invalid_maps_are_named(spec, message):
    with pytest.raises(AlambicError, match=message):
        parse_layer_map(spec, 4, 12 if spec != "uniform" else 3)
