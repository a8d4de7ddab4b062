"""The per-layer policies: every layer at one rank (``--rank``), at the rank keeping a share of its energy
(``--energy``), or at the rank a ranks file names (``--ranks``).

* ``rank K``: the first allowed kind of each layer (spatial where it applies) at ``min(K, full rank)``;
  a ranks file's entry may name the kind.
* ``energy E``: per allowed kind the least rank ``K`` with ``Σ_{k≤K} s_k² ≥ E · Σ s_k²``; the kind with
  fewer MACs at that rank.

Ranks are rounded up to the rank multiple (1 unless asked). A pair that would not cut the layer's MACs is
not written unless ``force`` (at full rank, the exactness check); the reason says so.
"""

from __future__ import annotations

from ..config import PolicyConfig
from ..factorization import Kind
from ..ranks import energy_rank
from .interface import LayerChoice, Plan, PlanInputs, Planner
from .units import Unit, round_rank

__all__ = ["PerLayerPlanner"]


class PerLayerPlanner(Planner):
    """``--rank``, ``--energy`` or ``--ranks``: each layer on its own."""

    def __init__(self, policy: PolicyConfig) -> None:
        assert policy.name != "budget"
        self.policy = policy

    def plan(self, inputs: PlanInputs) -> Plan:
        return Plan({unit.key: self.choose(unit) for unit in inputs.units}, by=None)

    def choose(self, unit: Unit) -> LayerChoice:
        policy, multiple = self.policy, self.policy.multiple
        kind: Kind
        if policy.rank is not None or policy.ranks is not None:
            if policy.ranks is not None:
                rank, wanted = policy.rank_requests[unit.key]
                if wanted is not None and wanted not in unit.kinds:
                    return LayerChoice.keep(f"ranks file asks for kind {wanted!r}, which this layer does not allow")
                kind = wanted or unit.kinds[0]
            else:
                rank, kind = int(policy.rank), unit.kinds[0]  # type: ignore[arg-type]
            r = round_rank(rank, unit.decomposition(kind).full_rank, multiple)
        else:
            energy = float(policy.energy)  # type: ignore[arg-type]
            candidates = []
            for k in unit.kinds:
                full = unit.decomposition(k).full_rank
                r_k = round_rank(energy_rank(unit.decomposition(k).s, energy), full, multiple)
                candidates.append((unit.rank_macs[k] * r_k, k, r_k))
            _, kind, r = min(candidates)
        pair = unit.rank_macs[kind] * r
        if pair >= unit.macs and not policy.force:
            return LayerChoice(None, r, f"{kind} rank {r} would not cut MACs ({pair:,} >= {unit.macs:,}); --force decomposes anyway")
        return LayerChoice(kind, r)
