"""Teacher selection by optimal transport (selective cross-task distillation, arXiv 2204.11526).

- :func:`class_cost_matrix`: the ``[C_teacher, C_target]`` cost between a
  teacher's classes and a target task's classes, from class prototypes in the
  teacher's feature space.
- :func:`rank_teachers`: score a repository of teachers on a labeled target
  sample (OT transport cost; LEEP and linear-probe accuracy as baselines),
  best first, each teacher run once.
"""
from rcfast.select.cost import class_cost_matrix, prototype_cost
from rcfast.select.outputs import ClassifierOutputs, classifier_outputs, final_linear
from rcfast.select.rank import METHODS, TeacherScore, rank_teachers
from rcfast.select.scores import leep_score, linear_probe_score, ot_score

__all__ = [
    "class_cost_matrix", "prototype_cost", "ClassifierOutputs", "classifier_outputs", "final_linear",
    "METHODS", "TeacherScore", "rank_teachers", "leep_score", "linear_probe_score", "ot_score",
]
