import pytest

from alambic.errors import AlambicError
from alambic.students.layer_map import (copied_map, layers_record, parse_layer_map, recorded_layers,
                                        resolve_layer_map)


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
    ("one:two", "not auto, uniform, last, copied, or student:teacher pairs"),
    ("", "not auto, uniform, last"),
])
def test_invalid_maps_are_named(spec, message):
    with pytest.raises(AlambicError, match=message):
        parse_layer_map(spec, 4, 12 if spec != "uniform" else 3)


def test_copied_pairs_each_student_layer_with_the_teacher_layer_it_was_copied_from():
    # teacher layers are 0-based in the record, 1-based (0 = embeddings) in the map
    assert copied_map([0, 1, 8]) == [(0, 0), (1, 1), (2, 2), (3, 9)]
    assert copied_map([0, 1, 8], with_embeddings=False) == [(1, 1), (2, 2), (3, 9)]
    spec, note = resolve_layer_map("copied", ([0, 1, 8], 12), 3, 12)
    assert spec == "0:0,1:1,2:2,3:9" and parse_layer_map(spec, 3, 12) == copied_map([0, 1, 8])
    assert "layer map copied: 0:0,1:1,2:2,3:9" in note
    assert resolve_layer_map("copied", ([0, 1, 8], 12), 3, 12, with_embeddings=False)[0] == "1:1,2:2,3:9"


def test_uniform_stays_and_says_when_it_differs_from_the_copied_layers():
    spec, note = resolve_layer_map("uniform", ([0, 1, 8], 12), 3, 12)
    assert spec == "uniform" and "0:0,1:4,2:8,3:12" in note and "copied from 0:0,1:1,2:2,3:9" in note
    assert resolve_layer_map("uniform", ([3, 7, 11], 12), 3, 12) == ("uniform", None)  # the same pairs: no note
    assert resolve_layer_map("uniform", None, 3, 12) == ("uniform", None)
    assert resolve_layer_map("0:0,1:4", ([0, 1, 8], 12), 3, 12) == ("0:0,1:4", None)


def test_copied_without_a_record_or_from_another_teacher_is_refused():
    spec, _ = resolve_layer_map("copied", None, 3, 12)
    with pytest.raises(AlambicError, match="alambic-layers.json"):
        parse_layer_map(spec, 3, 12)
    with pytest.raises(AlambicError, match="copied from a 24-layer teacher, but the student has 3 and the teacher 12"):
        resolve_layer_map("copied", ([0, 1, 8], 24), 3, 12)


def test_the_record_of_source_layers_round_trips(tmp_path):
    assert layers_record(None) == {}  # layers not copied: no record
    for name, text in layers_record(([0, 1, 8], 12)).items():
        (tmp_path / name).write_text(text)
    assert recorded_layers(tmp_path) == ([0, 1, 8], 12)
    assert recorded_layers(tmp_path / "elsewhere") is None


def test_auto_is_copied_for_a_copied_student_and_uniform_otherwise():
    assert resolve_layer_map("auto", ([0, 1, 8], 12), 3, 12)[0] == "0:0,1:1,2:2,3:9"
    assert resolve_layer_map("auto", None, 3, 12) == ("uniform", None)  # not built by alambic, or fresh widths
    assert resolve_layer_map("auto", ([0, 1, 8], 24), 3, 12) == ("uniform", None)  # recorded from another teacher
    assert parse_layer_map("auto", 4, 12) == parse_layer_map("uniform", 4, 12)  # a recipe built without a workflow
