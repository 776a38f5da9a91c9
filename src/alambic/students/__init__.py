"""Student construction: layer subsets, narrower widths, copy-initialisation from the teacher."""

from alambic.students.build import StudentInit, count_parameters, init_student, parse_layer_spec, save_student

__all__ = ["StudentInit", "count_parameters", "init_student", "parse_layer_spec", "save_student"]
