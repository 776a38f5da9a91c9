"""Student construction: layer subsets (fixed or chosen by measurement), narrower widths, copy-initialisation."""

from alambic.students.build import StudentInit, count_parameters, init_student, parse_layer_spec, save_student
from alambic.students.selection import LayerSelection, select_layers

__all__ = ["LayerSelection", "StudentInit", "count_parameters", "init_student", "parse_layer_spec", "save_student",
           "select_layers"]
