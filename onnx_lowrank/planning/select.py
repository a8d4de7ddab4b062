"""Which planner makes a conversion's plan, and the fall-backs between them.

* a per-layer policy (``--rank``, ``--energy``, ``--ranks``): :class:`~.per_layer.PerLayerPlanner`;
* ``--speedup S`` alone: by latency measured here (:class:`~.latency.LatencyPlanner`) when asked
  (``--by latency``) or by default wherever the model can be timed — a reference input exists and every
  layer to plan has a known size on it; by MACs (:class:`~.mac_budget.MacBudgetPlanner`) when asked
  (``--by macs``), when the model cannot be timed, when ``--branches all`` sized branches the reference
  input does not run (a timing on it sees one path), or when onnxruntime fails to time a layer (then the
  reason is reported). ``--by latency`` on a model that cannot be timed is refused with the reason;
* ``--params-ratio R`` (with or without S): by counts (:class:`~.mac_budget.MacBudgetPlanner`).
"""

from __future__ import annotations

import onnx

from ..config import PolicyConfig, SpeedConfig
from ..errors import LowRankError
from ..run_shapes import ModelShapes
from ..timing import Timing, start_timing
from ..timing_cache import open_store
from .interface import Plan, PlanInputs
from .latency import LatencyPlanner, TimingFailed, untimeable_reason
from .mac_budget import MacBudgetPlanner
from .per_layer import PerLayerPlanner

__all__ = ["make_plan"]


def make_plan(
    inputs: PlanInputs, policy: PolicyConfig, speed: SpeedConfig, proto: onnx.ModelProto, shapes: ModelShapes
) -> tuple[Plan, Timing | None, str | None]:
    """The plan; the timing a plan by latency made (the original's session, for the result's figures), else
    None; and why a ``--speedup`` budget was planned by MACs although latency is the default, else None."""
    if policy.name != "budget":
        return PerLayerPlanner(policy).plan(inputs), None, None
    why: str | None = None
    warnings: list[str] = []
    if policy.speedup_alone and speed.by != "macs" and inputs.units:
        threads = speed.resolved_threads
        why = untimeable_reason(shapes, [site for unit in inputs.units for site in unit.sites])
        if why is None and shapes.branch_runs:
            why = "--branches all sized If branches the reference input does not run, and a timing on it sees one path"
        timing = None
        if why is None:
            timing, why = start_timing(proto, shapes, threads, open_store(threads, speed.timing_cache), speed.large_model_bytes)
        if why is not None and speed.by == "latency":
            raise LowRankError(f"--by latency times the model on this machine, and cannot: {why}; --by macs plans by MAC count")
        if timing is not None:
            assert timing.store is not None
            latency_plan: Plan | None = None
            try:
                latency_plan = LatencyPlanner(proto, shapes, timing, policy).plan(inputs)
            except TimingFailed as exc:
                if speed.by == "latency":
                    raise
                why = str(exc)
            finally:  # the layers timed so far are kept, also when the target is refused
                timing.store.save()
                if latency_plan is None:
                    timing.close()  # its sessions and shared weights: no plan by latency to report them
            warnings += timing.store.warnings
            if latency_plan is not None:
                latency_plan.warnings += warnings
                return latency_plan, timing, None
    plan = MacBudgetPlanner(policy).plan(inputs)
    plan.warnings += warnings
    return plan, None, why
