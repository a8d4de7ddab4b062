"""What a conversion does to the model's answers: measured on held-back calibration samples, and said when extreme.

With calibration data the last few samples are held back from the statistics, the refit and any fine-tune
(:func:`onnx_lowrank.calibration.hold_back`); the converted model and the original are run on them and each
output compared in the measure that fits it (:mod:`onnx_lowrank.agreement`: top-1 or string agreement,
relative L2). The report's ``answers`` holds the result, or why nothing was measured. A plan whose damage is
extreme — measured agreement below :data:`AGREEMENT_WARNING`, or without a measurement a MAC cut beyond
:data:`DAMAGE_CUT` times the speedup asked for — gets a warning in the summary before the model is written.
A fine-tune (:func:`finetune_and_measure`) is measured on the same held-back samples before and after.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import onnx

from .agreement import higher_is_better
from .calibration.data import HELD_BACK_MIN_SAMPLES
from .config import DecomposeConfig
from .errors import LowRankError
from .report import Report
from .timing import LARGE_MODEL
from .verify import answers

__all__ = [
    "AGREEMENT_WARNING",
    "DAMAGE_CUT",
    "NO_DATA",
    "RELATIVE_L2_WARNING",
    "finetune_and_measure",
    "measure_answers",
    "warn_of_damage",
]

Progress = Callable[[int, int, str], None]

NO_DATA = "no data: --calibration holds some of its samples back to measure them, --verify-inputs measures them on yours"


def measure_answers(
    source: onnx.ModelProto, new: onnx.ModelProto, held: Mapping[str, Any], threads: int | None, large_model: int = LARGE_MODEL
) -> dict[str, Any]:
    """The converted model's answers against the original's on the held-back calibration samples, or why not (the
    two sessions share the weights the models have in common; above ``large_model`` bytes, without prepacking)."""
    if not held:
        return {"not_measured": f"fewer than {HELD_BACK_MIN_SAMPLES} calibration samples: none held back to measure them on"}
    samples = min(len(v) for v in held.values())
    try:
        outputs = answers(source, new, held, threads=threads, large_model=large_model)
    except LowRankError as exc:  # the model is converted; its answers could not be compared
        return {"not_measured": str(exc)}
    return {"data": "held-back calibration samples", "samples": samples, "outputs": [o.to_dict() for o in outputs]}


# answers below this agreement (or a relative error above RELATIVE_L2_WARNING) on held-back samples, or a MAC cut
# beyond DAMAGE_CUT times the speedup asked for, are warned of before the model is written
AGREEMENT_WARNING = 0.9
RELATIVE_L2_WARNING = 0.3
DAMAGE_CUT = 2.5


_CHANGED = "the answers changed: "
_CUT = "the plan cuts MACs "


def warn_of_damage(report: Report, config: DecomposeConfig) -> None:
    """A warning when the plan's damage to the answers is extreme: measured, or from the MACs it cuts. Said again
    from the latest answers when it was said before (a fine-tune after the conversion measured them anew)."""
    report.warnings = [w for w in report.warnings if not w.startswith((_CHANGED, _CUT))]
    tuned = bool(report.finetune) and "skipped" not in report.finetune
    advice = f"a lower --speedup{' or' if tuned else ','} --by macs{'' if tuned else ' or --finetune'} keeps more of them"
    for output in report.answers.get("outputs", []):
        value, measure = output["value"], output["measure"]
        if (higher_is_better(measure) and value < AGREEMENT_WARNING) or (not higher_is_better(measure) and value > RELATIVE_L2_WARNING):
            report.warnings.append(
                f"{_CHANGED}{measure} of output {output['output']!r} is {value:.1%} on {output['samples']} held-back "
                f"samples (MACs cut {report.mac_ratio:.2f}x); {advice}"
            )
            return
    target = config.policy.speedup
    if target and report.macs_after and report.mac_ratio > DAMAGE_CUT * target:
        report.warnings.append(f"{_CUT}{report.mac_ratio:.2f}x for --speedup {target:g}: expect the answers to change much; {advice}")


def finetune_and_measure(
    source: onnx.ModelProto,
    new: onnx.ModelProto,
    report: Report,
    config: DecomposeConfig,
    progress: Progress | None,
    split: tuple[dict[str, Any], dict[str, Any]] | None = None,
) -> onnx.ModelProto:
    """The fine-tune of the converted model on the calibration samples it may train on (``split``: those and the
    held-back ones, else read again), with the answers on the held-back samples measured before and after."""
    from .calibration import hold_back, load_calibration
    from .finetune import finetune_conversion

    data, held = split if split is not None else hold_back(load_calibration(config.calibration.source, source), source)
    threads, large = config.speed.resolved_threads, config.speed.large_model_bytes
    before = measure_answers(source, new, held, threads, large)
    new, report.finetune = finetune_conversion(source, new, report, data, config.finetune, config.speed.threads, progress)
    if "skipped" in report.finetune:
        report.answers = before
        return new
    report.answers = measure_answers(source, new, held, threads, large)
    measured = {key: value for key, value in before.items() if key != "outputs"}  # the data and samples, or why not measured
    report.finetune["answers"] = {**measured, "before": before.get("outputs"), "after": report.answers.get("outputs")}
    return new
