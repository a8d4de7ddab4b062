"""What a way of choosing ranks is given, and what it returns.

Every planner — the per-layer policies, the MAC budget, the latency plan — is a
:class:`Planner`: made with its options, then asked once for a :class:`Plan`
of the :class:`PlanInputs` (the allocation units and the MACs and parameters
outside them). A plan holds one :class:`LayerChoice` per unit — a kind and a
rank, or the reason the layer is left whole — and what the planner measured to
make it (the latency plan's rounds; nothing for the others).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

from ..factorization import Kind
from .units import Unit

__all__ = ["LayerChoice", "PathBudget", "Plan", "PlanInputs", "Planner"]


@dataclass(frozen=True)
class LayerChoice:
    """One unit's outcome: a kind and a rank, or (``kind`` None) the reason it is left whole."""

    kind: Kind | None
    rank: int = 0
    reason: str | None = None

    @classmethod
    def keep(cls, reason: str) -> LayerChoice:
        return cls(None, 0, reason)


@dataclass
class PathBudget:
    """One path through a model's If branches, which a MAC budget must meet on its own: ``shares`` gives the
    part of each unit's MACs that runs on it (unit key → 0..1), ``fixed`` the MACs of the other counted
    layers on it, ``before`` its MACs before; ``name`` says which branch it takes."""

    name: str
    shares: dict[str, float]
    fixed: int
    before: int


@dataclass
class PlanInputs:
    """The units to plan, and what the plan cannot change: the MACs of the other counted layers, the
    parameters outside the units, and the model's parameters before. ``paths``: with every If branch sized
    (``--branches all``), the paths a ``--speedup`` by MACs must each reach (empty: the whole counts)."""

    units: list[Unit]
    fixed_macs: int
    fixed_params: int
    params_before: int
    paths: list[PathBudget] = field(default_factory=list)

    @property
    def macs_before(self) -> int:
        return self.fixed_macs + sum(unit.macs for unit in self.units)


@dataclass
class Plan:
    """A choice per unit key; ``by``: what a budget was planned by (``"latency"``, ``"macs"``; None for a
    per-layer policy); ``measured``: what the planner measured to make it (``Report.latency`` of a plan by
    latency); ``warnings``: what the user should know, one line each."""

    choices: dict[str, LayerChoice]
    by: str | None
    measured: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def decomposes(self) -> bool:
        return any(choice.kind is not None for choice in self.choices.values())


class Planner(abc.ABC):
    """One way of choosing ranks; its options are its constructor's arguments."""

    @abc.abstractmethod
    def plan(self, inputs: PlanInputs) -> Plan:
        """One choice per unit of ``inputs``; raises :class:`~onnx_lowrank.errors.LowRankError` for a target no
        choice reaches, naming what can be reached."""
