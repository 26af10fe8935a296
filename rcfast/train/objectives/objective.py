"""``Objective``: a run's loss as a list of named, weighted terms.

YAML (``objective:`` of a run config)::

    objective:
      - {term: multihead_kd, weight: 1.0, temperature: 4.0}
      - {term: cross_entropy, head: task_a, weight: 0.1}

Each entry is ``term`` (a registered name), ``weight`` (default 1.0),
optionally ``name`` (how the term is logged), and the term's own options. The
default name is the term's registry name; when a term appears more than once it
is ``<term>:<head>`` (entries with a ``head`` option), otherwise each entry needs
an explicit ``name``.

The loss of a step is ``sum_i weight_i * term_i(step)`` in entry order; each
term's unweighted value is logged under its name.
"""
from __future__ import annotations

import copy
import inspect
import math
from typing import Mapping, Sequence

import torch
from torch import nn

from rcfast.train.config import ConfigError
from rcfast.train.objectives.base import ModelsUnavailable, RunLayout, Term, TermSetup, available_terms, term_class
from rcfast.train.objectives.inputs import InputKey, StepInputs

__all__ = ["Objective"]

_RESERVED = ("term", "weight", "name")


def _entry_name(spec: Mapping, where: str) -> str | None:
    name = spec.get("name")
    if name is not None and (not isinstance(name, str) or not name or "." in name):
        raise ConfigError(f"{where}.name must be a non-empty string without '.', got {name!r}")
    return name


def _default_names(specs: Sequence[Mapping]) -> list[str]:
    counts: dict[str, int] = {}
    for spec in specs:
        counts[spec["term"]] = counts.get(spec["term"], 0) + 1
    names = []
    for i, spec in enumerate(specs):
        explicit = _entry_name(spec, f"objective[{i}]")
        if explicit is not None:
            names.append(explicit)
        elif counts[spec["term"]] == 1:
            names.append(spec["term"])
        elif isinstance(spec.get("head"), str):
            names.append(f"{spec['term']}:{spec['head']}")
        else:
            raise ConfigError(f"objective[{i}]: term {spec['term']!r} appears {counts[spec['term']]} times; "
                              "give each entry a distinct name: (e.g. name: kd_proxy)")
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise ConfigError(f"objective[{i}] and objective[{seen[name]}] are both named {name!r}; "
                              "give them distinct name: values")
        seen[name] = i
    return names


def _build_term(spec: Mapping, where: str) -> Term:
    cls = term_class(spec["term"])
    options = {k: v for k, v in spec.items() if k not in _RESERVED}
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    valid = [n for n, p in params.items() if n != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD]
    unknown = [k for k in options if k not in valid]
    if unknown and not takes_any:
        raise ConfigError(f"{where} ({spec['term']}): unknown option {unknown[0]!r}; valid options: "
                          f"{list(_RESERVED) + valid}")
    try:
        return cls(**options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where} ({spec['term']}): {exc}") from exc


class Objective(nn.Module):
    """Named, weighted loss terms; an ``nn.Module`` so terms' parameters train and checkpoint with the run.

    Args:
        entries: ``[(name, weight, term), ...]`` in the order they are summed.

    Build one from YAML-style specs with :meth:`from_specs`. The trainer calls
    :meth:`bind` once; then ``objective(step)`` returns ``(loss, {name: value})``.
    """

    def __init__(self, entries: Sequence[tuple[str, float, Term]]) -> None:
        super().__init__()
        if not entries:
            raise ConfigError("the objective needs at least one term (objective: [{term: multihead_kd}, ...])")
        self.terms = nn.ModuleDict()
        self.weights: dict[str, float] = {}
        for name, weight, term in entries:
            if not isinstance(term, Term):
                raise TypeError(f"objective term {name!r} must be a rcfast Term, got {type(term).__name__}")
            if name in self.terms:
                raise ConfigError(f"two objective terms are named {name!r}")
            if (isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight)
                    or weight < 0):
                raise ConfigError(f"objective term {name!r}: weight must be a finite number >= 0, got {weight!r}")
            self.terms[name] = term
            self.weights[name] = float(weight)
        self.inputs: list[InputKey] = []
        self._bound = False

    @classmethod
    def from_specs(cls, specs: Sequence[Mapping]) -> "Objective":
        """Build the terms of ``objective:`` entries (options checked, nothing bound yet)."""
        if isinstance(specs, Mapping) or not isinstance(specs, Sequence):
            raise ConfigError(f"objective must be a list of terms, got {type(specs).__name__}")
        for i, spec in enumerate(specs):
            if not isinstance(spec, Mapping):
                raise ConfigError(f"objective[{i}] must be a mapping like {{term: multihead_kd, weight: 1.0}}, "
                                  f"got {spec!r}")
            if not isinstance(spec.get("term"), str):
                raise ConfigError(f"objective[{i}] needs term: <name>; registered terms: "
                                  f"{available_terms()}")
        names = _default_names(specs)
        entries = []
        for i, (name, spec) in enumerate(zip(names, specs)):
            weight = spec.get("weight", 1.0)
            if (isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight)
                    or weight < 0):
                # A negative weight would ascend that term's gradient: never a loss to minimise.
                raise ConfigError(f"objective[{i}].weight must be a finite number >= 0, got {weight!r}")
            entries.append((name, float(weight), _build_term(spec, f"objective[{i}]")))
        return cls(entries)

    def check_layout(self, layout: RunLayout) -> list[InputKey]:
        """Check the terms against a run's layout from its config alone (no models; nothing is kept).

        Terms are bound to throw-away copies of themselves: a term's bind runs
        until it needs a model (``setup.probe``); the rest is checked when the
        trainer binds the objective to the real models. Returns the inputs the
        terms declared (those of a term that needs a model are missing).
        """
        return copy.deepcopy(self)._bind_terms(layout, stop_at_probe=True)

    @property
    def names(self) -> list[str]:
        return list(self.terms.keys())

    def bind(self, layout: RunLayout) -> list[InputKey]:
        """Bind every term to the run (once); return the declared inputs in declaration order."""
        if self._bound:
            raise RuntimeError("this Objective is already bound to a run; build a new one per Consolidator")
        self.inputs = self._bind_terms(layout, stop_at_probe=False)
        self._bound = True
        return list(self.inputs)

    def _bind_terms(self, layout: RunLayout, stop_at_probe: bool) -> list[InputKey]:
        declared: list[InputKey] = []
        complete = True
        for name, term in self.terms.items():
            setup = TermSetup(layout, name)
            try:
                term.bind(setup)
            except ModelsUnavailable:
                if not stop_at_probe:
                    raise
                complete = False
            except (TypeError, ValueError) as exc:
                if isinstance(exc, ConfigError):
                    raise
                raise setup.error(str(exc)) from exc
            else:
                if not setup.declared:
                    raise setup.error("declares no inputs (its bind() must call setup.need(...))")
            declared.extend(k for k in setup.declared if k not in declared)
        if complete:
            self._check_all_used(layout, declared)
        return declared

    def _check_all_used(self, layout: RunLayout, declared: list[InputKey]) -> None:
        """A teacher or data stream no term reads is a mistake (a typo, or a forgotten term)."""
        streams = {k.stream for k in declared}
        teachers = set()
        for key in declared:
            teachers.update(getattr(key, "teachers", ()))
            if isinstance(getattr(key, "teacher", None), str):
                teachers.add(key.teacher)
        for kind, names, used in (("teacher", layout.teachers, teachers), ("data stream", layout.streams, streams)):
            unused = [n for n in names if n not in used]
            if unused:
                raise ConfigError(f"{kind} {unused[0]!r} is used by no objective term (terms: {self.names}); "
                                  "remove it or add a term that uses it")

    def forward(self, step: StepInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(sum_i weight_i * term_i(step), {name: term_i(step) detached})``."""
        total = None
        values = {}
        for name, term in self.terms.items():
            value = term(step)
            if value.dim() != 0:
                raise ValueError(f"objective term {name!r} returned a tensor of shape {tuple(value.shape)}; "
                                 "a term's forward must return a scalar")
            values[name] = value.detach()
            weighted = self.weights[name] * value
            total = weighted if total is None else total + weighted
        return total, values

    @torch.no_grad()
    def parts(self, step: StepInputs) -> dict[str, dict[str, torch.Tensor]]:
        """``{name: {part: value}}`` of the terms that report parts (for the logs)."""
        out = {}
        for name, term in self.terms.items():
            parts = term.parts(step)
            if parts:
                out[name] = {k: v.detach() for k, v in parts.items()}
        return out

    def has_trainable_parameters(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    def extra_repr(self) -> str:
        return ", ".join(f"{name}: {weight:g}" for name, weight in self.weights.items())
