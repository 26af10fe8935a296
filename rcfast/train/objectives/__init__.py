"""Objectives: a run's loss as named, weighted terms from a registry.

``objective: [{term: multihead_kd, weight: 1.0}, {term: cross_entropy, head: task_a, weight: 0.1}]``.
A term is a small :class:`Term` subclass in its own module here, registered by
``@register_term("<name>")``; the import list below is the registry of built-in
terms (a new term = its module + one line here). See ``docs/extending.md``.
"""
from rcfast.train.objectives.base import (ModelsUnavailable, RunLayout, StreamInfo, Term, TermSetup,
                                          available_terms, register_term, term_class)
from rcfast.train.objectives.inputs import (STUDENT_FEATURES, Images, InputKey, Labels, StepInputs,
                                            StudentHeadLinear, StudentLayer, StudentLogits, TeacherLayer,
                                            TeacherLogits)
from rcfast.train.objectives.objective import Objective

# The built-in terms: importing a module registers its term.
from rcfast.train.objectives import cross_entropy  # noqa: E402,F401  (cross_entropy)
from rcfast.train.objectives import multihead_kd  # noqa: E402,F401  (multihead_kd)
from rcfast.train.objectives import ot_distill  # noqa: E402,F401  (ot_distill)
from rcfast.train.objectives import double_distill  # noqa: E402,F401  (double_distill)
from rcfast.train.objectives import factor_reconstruction  # noqa: E402,F401  (factor_reconstruction)
from rcfast.train.objectives import iekd  # noqa: E402,F401  (iekd_inherit, iekd_explore)
from rcfast.train.objectives import mutual_learning  # noqa: E402,F401  (mutual_learning)

__all__ = [
    "Objective", "Term", "TermSetup", "RunLayout", "StreamInfo", "ModelsUnavailable", "register_term",
    "term_class", "available_terms", "InputKey", "Images", "Labels", "StudentLogits", "StudentLayer",
    "StudentHeadLinear", "TeacherLogits", "TeacherLayer", "StepInputs", "STUDENT_FEATURES",
]
