"""The options of a conversion, in groups that mirror the command line's.

Each group is a frozen dataclass that checks itself when it is made
(``__post_init__``), so a bad option is refused once, before any work, with a
one-line :class:`~onnx_lowrank.errors.LowRankError` that names the flag:

* :class:`PolicyConfig` — which layers are decomposed and at which ranks;
* :class:`ShapeConfig` — the input the plan is sized on (a sample, or sizes for a random one) and its branches;
* :class:`CalibrationConfig` — calibration data and what the conversion does with it;
* :class:`SpeedConfig` — what ``--speedup`` plans by, the threads, the timing of the result;
* :class:`MobileConfig` — mobile execution providers and INT8;
* :class:`FinetuneConfig` — the distillation fine-tune of the converted model on the calibration samples.

:class:`DecomposeConfig` holds one of each, checks what one group cannot check
alone (``--by latency`` needs a ``--speedup`` budget alone, say), and is what
:func:`onnx_lowrank.decompose`, :func:`onnx_lowrank.sweep.sweep` and the CLI
pass on. The keyword arguments of :func:`onnx_lowrank.decompose`
(``decompose(model, speedup=2)``) are built into the same objects by
:meth:`DecomposeConfig.from_keywords`; :meth:`DecomposeConfig.to_dict` writes
the options as JSON (the report's ``policy`` and the sweep's results keep them).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, TypedDict, cast

import numpy.typing as npt

from .errors import LowRankError
from .factorization import Kind
from .ranks import OBJECTIVES
from .threads import available_cpus, default_threads

__all__ = [
    "ALL_KINDS",
    "BRANCH_CHOICES",
    "BY_CHOICES",
    "CHECK_RUNS",
    "DEFAULT_KINDS",
    "DEFAULT_OBJECTIVE",
    "DEFAULT_RANK_MULTIPLE",
    "DEFAULT_SPEEDUP",
    "FINETUNE_MINUTES",
    "FINETUNE_STEPS",
    "FINETUNE_TRAINABLE",
    "LARGE_MODEL_MIB",
    "QUANTIZE_MODES",
    "CalibrationConfig",
    "CalibrationSource",
    "DecomposeConfig",
    "DecomposeKeywords",
    "FinetuneConfig",
    "MobileConfig",
    "PolicyConfig",
    "SampleSource",
    "ShapeConfig",
    "SpeedConfig",
    "is_whole",
]

DEFAULT_SPEEDUP = 2.0
# ranks chosen by the budget allocation are multiples of this: onnxruntime's blocked CPU kernels run such
# channel counts fastest (VGG-16 and ResNet-50 at speedup 2: 1.62x and 1.61x measured with any rank,
# 1.76x and 1.91x with multiples of 16, one thread; benchmarks/results/studies.json)
DEFAULT_RANK_MULTIPLE = 16
ALL_KINDS: tuple[Kind, ...] = ("spatial", "channel")
DEFAULT_KINDS: tuple[Kind, ...] = ALL_KINDS
# what the data-free budget allocation minimises (onnx_lowrank.ranks.weigh_errors); chosen by benchmarks/calibration.py
DEFAULT_OBJECTIVE = "sum"
BY_CHOICES = ("latency", "macs")
# the check of a plan not made by latency (its rounds time it already): at most CHECK_RUNS interleaved runs of
# each model, fewer (down to 3) when a run of both takes long — a quick look, a few seconds on VGG-16
CHECK_RUNS = 10
# MiB of weights above which a model is large: its check runs without onnxruntime's prepacking (a copy of every
# matrix weight per session) and says first what it costs
LARGE_MODEL_MIB = 256
QUANTIZE_MODES = ("dynamic", "static")
# which If branches a plan sizes: those the reference input runs, or every one (each by a run of its own)
BRANCH_CHOICES = ("run", "all")
# what a fine-tune trains: the decomposed layers' factors and biases, or every float weight
FINETUNE_TRAINABLE = ("factors", "all")
# the fine-tune's budget when none is given, whichever ends first: the steps end it on the models of models/ (the
# text line: about 3 minutes at one thread), so the same inputs give the same file; the minutes bound a large model
FINETUNE_STEPS = 300
FINETUNE_MINUTES = 10.0

CalibrationSource = str | os.PathLike[str] | Mapping[str, npt.ArrayLike] | Iterable[Mapping[str, npt.ArrayLike]]
SampleSource = str | os.PathLike[str] | Mapping[str, npt.ArrayLike]
RankRequest = tuple[int, Kind | None]


def is_whole(value: object, minimum: int) -> bool:
    """``value`` is an int (not a bool) of at least ``minimum``."""
    return not isinstance(value, bool) and isinstance(value, int) and value >= minimum


def _parse_ranks(ranks: Mapping[str, Any]) -> dict[str, RankRequest]:
    parsed: dict[str, RankRequest] = {}
    for node, value in ranks.items():
        kind: Any = None
        if isinstance(value, tuple) and len(value) == 2:  # parsed already (a config made again by ``replace``)
            value, kind = value
        elif isinstance(value, Mapping):
            kind = value.get("kind")
            value = value.get("rank")
        if not is_whole(value, 1):
            raise LowRankError(f"ranks: node {node!r} has rank {value!r}; ranks must be whole numbers >= 1")
        if kind is not None and kind not in ALL_KINDS:
            raise LowRankError(f"ranks: node {node!r} has kind {kind!r}; kinds are {', '.join(ALL_KINDS)}")
        parsed[str(node)] = (value, kind)
    return parsed


def _regex(pattern: str | None, flag: str) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise LowRankError(f"{flag}: invalid regular expression {pattern!r} ({exc})") from None


@dataclass(frozen=True)
class PolicyConfig:
    """Policy: which layers are decomposed and at which ranks.

    One per-layer policy — ``rank`` (every layer, clipped to its full rank), ``energy`` (per layer, the
    least rank keeping that share of Σ s²) or ``ranks`` (node name → rank, or ``{"rank": K, "kind": ...}``;
    other layers are left alone) — or the budgets ``speedup`` (S times faster) and/or ``params_ratio``
    (parameters after/before ≤ R). With none given: ``speedup`` :data:`DEFAULT_SPEEDUP`.
    ``kinds``: the splits offered; ``include``/``exclude``: regular expressions searched in node names;
    ``force``: decompose even where the pair costs more MACs; ``rank_multiple``: ranks rounded up to a
    multiple (default :data:`DEFAULT_RANK_MULTIPLE` for a budget, 1 for a per-layer policy); ``fold_bn``:
    fold BatchNormalization into the Conv before it first; ``pad_ranks`` (per-layer policies): zero filters
    up to the next channel block of onnxruntime's blocked CPU convolution; ``objective``: what the
    data-free budget allocation minimises (:data:`onnx_lowrank.ranks.OBJECTIVES`).
    """

    rank: int | None = None
    energy: float | None = None
    speedup: float | None = None
    params_ratio: float | None = None
    ranks: Mapping[str, Any] | None = None
    kinds: Sequence[str] = DEFAULT_KINDS
    include: str | None = None
    exclude: str | None = None
    force: bool = False
    rank_multiple: int | None = None
    fold_bn: bool = True
    pad_ranks: bool = False
    objective: str = DEFAULT_OBJECTIVE

    def __post_init__(self) -> None:
        per_layer = [k for k, v in (("rank", self.rank), ("energy", self.energy), ("ranks", self.ranks)) if v is not None]
        budgets = [k for k, v in (("speedup", self.speedup), ("params-ratio", self.params_ratio)) if v is not None]
        if len(per_layer) > 1 or (per_layer and budgets):
            raise LowRankError(f"choose one rank policy, got {' and '.join('--' + k for k in [*per_layer, *budgets])}")
        if self.rank is not None and not is_whole(self.rank, 1):
            raise LowRankError(f"--rank must be a whole number >= 1, got {self.rank!r}")
        if self.energy is not None and not (isinstance(self.energy, (int, float)) and 0.0 < float(self.energy) <= 1.0):
            raise LowRankError(f"--energy must be in (0, 1], got {self.energy!r}")
        speedup = self.speedup
        if speedup is not None and not (
            isinstance(speedup, (int, float)) and not isinstance(speedup, bool) and math.isfinite(speedup) and float(speedup) >= 1.0
        ):
            raise LowRankError(f"--speedup must be a number >= 1, got {speedup!r}")
        ratio = self.params_ratio
        if ratio is not None and not (isinstance(ratio, (int, float)) and 0.0 < float(ratio) <= 1.0):
            raise LowRankError(f"--params-ratio must be in (0, 1], got {ratio!r}")
        if self.ranks is not None:
            if not isinstance(self.ranks, Mapping) or not self.ranks:
                raise LowRankError("ranks must be a non-empty mapping of node name to rank")
            object.__setattr__(self, "ranks", _parse_ranks(self.ranks))
        if not per_layer and not budgets:
            object.__setattr__(self, "speedup", DEFAULT_SPEEDUP)
        kinds = tuple(dict.fromkeys(self.kinds))
        bad = [k for k in kinds if k not in ALL_KINDS]
        if bad or not kinds:
            raise LowRankError(f"--kinds: unknown kind(s) {', '.join(map(str, bad)) or '(none)'}; choose from {', '.join(ALL_KINDS)}")
        object.__setattr__(self, "kinds", kinds)
        _regex(self.include, "--include")
        _regex(self.exclude, "--exclude")
        if self.rank_multiple is not None and not is_whole(self.rank_multiple, 1):
            raise LowRankError(f"rank multiple must be a whole number >= 1, got {self.rank_multiple!r}")
        if self.objective not in OBJECTIVES:
            raise LowRankError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")

    @property
    def allowed(self) -> tuple[Kind, ...]:
        """``kinds`` as checked: the splits offered, each once."""
        return cast(tuple[Kind, ...], self.kinds)

    @property
    def name(self) -> str:
        """``"rank"``, ``"energy"``, ``"ranks"`` or ``"budget"`` (``speedup`` and/or ``params_ratio``)."""
        if self.rank is not None:
            return "rank"
        if self.energy is not None:
            return "energy"
        if self.ranks is not None:
            return "ranks"
        return "budget"

    @property
    def speedup_alone(self) -> bool:
        """A ``speedup`` budget without ``params_ratio``: what a plan by latency can meet."""
        return self.name == "budget" and self.speedup is not None and self.params_ratio is None

    @property
    def multiple(self) -> int:
        """The rank multiple in force: the one asked for, else 16 for a budget and 1 for a per-layer policy."""
        if self.rank_multiple is not None:
            return self.rank_multiple
        return DEFAULT_RANK_MULTIPLE if self.name == "budget" else 1

    @property
    def rank_requests(self) -> Mapping[str, RankRequest]:
        """``ranks`` as parsed: node → (rank, kind or None)."""
        return self.ranks or {}

    def include_pattern(self) -> re.Pattern[str] | None:
        return _regex(self.include, "--include")

    def exclude_pattern(self) -> re.Pattern[str] | None:
        return _regex(self.exclude, "--exclude")

    def describe(self) -> dict[str, Any]:
        """The policy's name and the values given (the report's ``policy``)."""
        out: dict[str, Any] = {"name": self.name}
        for key in ("rank", "energy", "speedup", "params_ratio"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


@dataclass(frozen=True)
class ShapeConfig:
    """Shapes: the input the plan is sized on, and which branches it sizes.

    ``sample``: one input set as the model takes it — an ``.npz`` or a mapping of input name to array, no
    sample axis, a scalar input as a 0-d array — that sizes every layer and picks the branches that count;
    it is also what the latency plan, the result check and the mobile check run. Without it the first
    calibration sample serves, else random values of ``input_shapes`` (input name → shape; it fixes symbolic
    dims). ``branches``: ``"run"`` sizes the If branches the reference input runs (the others have no size
    and a budget leaves them whole); ``"all"`` sizes every branch by a run of its own — a further sample that
    takes it (``sample`` may then be a list, the first the reference), else a run of the reference input with
    the If's condition forced — and plans them all. ``allow_unknown_shapes`` plans even when an input has a
    symbolic dim and no size (layers of unknown size then count at one output pixel).
    """

    input_shapes: Mapping[str, Sequence[int]] = field(default_factory=dict)
    allow_unknown_shapes: bool = False
    sample: SampleSource | Sequence[SampleSource] | None = None
    branches: str = "run"

    def __post_init__(self) -> None:
        shapes: dict[str, tuple[int, ...]] = {}
        for name, dims in (self.input_shapes or {}).items():
            if isinstance(dims, (str, bytes)) or not all(is_whole(d, 1) for d in dims):
                raise LowRankError(f"--input-shape {name}: expected whole dims >= 1, got {dims!r}")
            shapes[str(name)] = tuple(int(d) for d in dims)
        object.__setattr__(self, "input_shapes", shapes)
        if self.branches not in BRANCH_CHOICES:
            raise LowRankError(f"--branches must be one of {', '.join(BRANCH_CHOICES)}, got {self.branches!r}")
        samples = self.samples
        for sample in samples:
            if not isinstance(sample, (str, os.PathLike, Mapping)):
                raise LowRankError(f"a sample is a path to an .npz or a mapping of input name to array, not a {type(sample).__name__}")
        if len(samples) > 1 and self.branches != "all":
            raise LowRankError("more than one --sample: the others size the If branches the first does not run, with --branches all")

    @property
    def samples(self) -> list[SampleSource]:
        """The samples given, the reference first (empty when none)."""
        if self.sample is None:
            return []
        if isinstance(self.sample, (str, os.PathLike, Mapping)) or not isinstance(self.sample, Sequence):
            return [self.sample]  # (anything else is refused by the check)
        return list(self.sample)


@dataclass(frozen=True)
class CalibrationConfig:
    """Calibration: data-aware ranks and factors from the model's own inputs.

    ``data``: an ``.npz`` or a folder of ``<input>.npy`` (arrays keyed by input name, samples on axis 0),
    a mapping, or an iterable of such batches. ``refit``: refit each decomposed layer's second factor and
    bias to the original outputs (default on); ``sensitivity``: weigh each layer's output error by its gain
    to the model's outputs under a budget (default on); ``options``: the passes' knobs
    (:class:`onnx_lowrank.calibration.CalibrationOptions`; None: the defaults).
    """

    data: CalibrationSource | None = None
    refit: bool | None = None
    sensitivity: bool | None = None
    options: Any = None

    def __post_init__(self) -> None:
        if self.data is None and (self.refit or self.sensitivity):
            raise LowRankError("refit and sensitivity allocation need calibration data")

    @property
    def given(self) -> bool:
        return self.data is not None

    @property
    def source(self) -> CalibrationSource:
        """The data, when given (:attr:`given`)."""
        if self.data is None:
            raise LowRankError("no calibration data given")
        return self.data


@dataclass(frozen=True)
class SpeedConfig:
    """Speed: what ``--speedup`` plans by, and how the result is timed.

    ``by``: ``"latency"`` (every layer's splits timed in onnxruntime here, the whole model re-timed until it
    meets the target), ``"macs"`` (a plan by MAC count, portable to other hardware) or None (latency
    wherever the model can be timed, MACs otherwise). ``threads``: onnxruntime intra-op threads to time and
    plan with (None: onnxruntime's default here, the physical cores). ``timing_cache``: keep layer timings
    across runs (True: the user's cache folder; a folder; False: keep nothing). ``check_runs``: interleaved
    runs of the final timing of a plan not made by latency (0 skips it). ``large_model``: MiB of weights above
    which the check (and the plan's rounds) run without onnxruntime's prepacking, and the check says first
    what it costs.
    """

    by: str | None = None
    threads: int | None = None
    timing_cache: bool | str | os.PathLike[str] = True
    check_runs: int = CHECK_RUNS
    large_model: float = LARGE_MODEL_MIB

    def __post_init__(self) -> None:
        if self.by is not None and self.by not in BY_CHOICES:
            raise LowRankError(f"--by must be one of {', '.join(BY_CHOICES)}, got {self.by!r}")
        if self.threads is not None and not is_whole(self.threads, 1):
            raise LowRankError(f"--threads must be a whole number >= 1, got {self.threads!r}")
        if self.threads is not None and self.threads > available_cpus():
            # more threads than CPUs time the scheduler, not the model: a plan for them means nothing here
            raise LowRankError(f"--threads {self.threads}: this machine gives the process {available_cpus()} CPU(s); plan for at most that")
        if not is_whole(self.check_runs, 0):
            raise LowRankError(f"check runs must be a whole number >= 0, got {self.check_runs!r}")
        if isinstance(self.large_model, bool) or not isinstance(self.large_model, int | float) or not 0 <= self.large_model < math.inf:
            raise LowRankError(f"--large-model must be a size in MiB >= 0, got {self.large_model!r}")

    @property
    def resolved_threads(self) -> int:
        """The thread count to time with: the one asked for, else onnxruntime's default here."""
        return self.threads if self.threads is not None else default_threads()

    @property
    def large_model_bytes(self) -> int:
        return int(self.large_model * 2**20)


@dataclass(frozen=True)
class MobileConfig:
    """Mobile: execution providers and INT8 (onnxruntime's own tools).

    ``mobile_safe`` keeps whole every layer whose pair NNAPI or CoreML would refuse where they take the
    original; ``quantize`` (``"dynamic"`` or ``"static"``) quantizes the result to INT8 afterwards.
    """

    mobile_safe: bool = False
    quantize: str | None = None

    def __post_init__(self) -> None:
        if self.quantize is not None and self.quantize not in QUANTIZE_MODES:
            raise LowRankError(f"--quantize must be one of {', '.join(QUANTIZE_MODES)}, got {self.quantize!r}")

    @property
    def wanted(self) -> bool:
        return self.mobile_safe or self.quantize is not None


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tune: distil the converted model toward the original on the calibration samples (no labels).

    ``enabled`` runs it after the rewrite (and the refit), before the answers are measured: it trains on the
    calibration samples except those held back to measure the answers, which it never sees, and stops early
    on agreement with the original over a slice of its own samples. ``trainable``: ``"factors"`` (the
    decomposed layers' factors and biases; every other weight stays byte-identical) or ``"all"`` (every float
    weight). ``steps`` / ``minutes``: the budget; with neither, :data:`FINETUNE_STEPS` steps or
    :data:`FINETUNE_MINUTES` minutes, whichever ends first; with one, that one alone. The same inputs give the
    same file whenever the steps end the run (a time budget ends it where the clock says). ``seed``: the
    split, the batches and torch's generator. ``features``: also fit the decomposed layers' outputs to the
    original's (the feature term). ``options``: the loop's other knobs
    (:class:`onnx_lowrank.finetune.FinetuneOptions`, whose budget, seed, threads and features these fields
    replace; None: its defaults). Needs torch (``pip install 'onnx-lowrank[finetune]'``).
    """

    enabled: bool = False
    trainable: str = "factors"
    steps: int | None = None
    minutes: float | None = None
    seed: int = 0
    features: bool = False
    options: Any = None

    def __post_init__(self) -> None:
        if self.trainable not in FINETUNE_TRAINABLE:
            raise LowRankError(f"fine-tune trainable must be one of {', '.join(FINETUNE_TRAINABLE)}, got {self.trainable!r}")
        if self.steps is not None and not is_whole(self.steps, 1):
            raise LowRankError(f"--finetune-steps must be a whole number >= 1, got {self.steps!r}")
        minutes = self.minutes
        if minutes is not None and not (
            isinstance(minutes, (int, float)) and not isinstance(minutes, bool) and math.isfinite(minutes) and minutes > 0
        ):
            raise LowRankError(f"--finetune-minutes must be a number > 0, got {minutes!r}")
        if not is_whole(self.seed, 0):
            raise LowRankError(f"fine-tune seed must be a whole number >= 0, got {self.seed!r}")
        if not self.enabled:
            given = [
                flag
                for flag, on in (
                    ("--finetune-all", self.trainable != "factors"),
                    ("--finetune-steps", self.steps is not None),
                    ("--finetune-minutes", self.minutes is not None),
                    ("--finetune-features", self.features),
                    ("finetune_options", self.options is not None),
                )
                if on
            ]
            if given:
                raise LowRankError(f"{given[0]} needs --finetune (finetune=True)")

    @property
    def budget(self) -> tuple[int | None, float | None]:
        """``(steps, minutes)`` in force (see the class docstring)."""
        if self.steps is None and self.minutes is None:
            return FINETUNE_STEPS, FINETUNE_MINUTES
        return self.steps, self.minutes


class DecomposeKeywords(TypedDict, total=False):
    """The keyword arguments :func:`onnx_lowrank.decompose` takes for the common cases, each a field of one group."""

    rank: int | None
    energy: float | None
    speedup: float | None
    params_ratio: float | None
    ranks: Mapping[str, Any] | None
    kinds: Sequence[str] | None
    include: str | None
    exclude: str | None
    force: bool
    rank_multiple: int | None
    fold_bn: bool
    pad_ranks: bool
    objective: str | None
    input_shapes: Mapping[str, Sequence[int]] | None
    allow_unknown_shapes: bool
    sample: SampleSource | Sequence[SampleSource] | None
    branches: str | None
    calibration: CalibrationSource | None
    refit: bool | None
    sensitivity: bool | None
    calibration_options: Any
    by: str | None
    threads: int | None
    timing_cache: bool | str | os.PathLike[str]
    check_runs: int | None
    large_model: float | None
    mobile_safe: bool
    quantize: str | None
    finetune: bool | FinetuneConfig
    finetune_all: bool
    finetune_steps: int | None
    finetune_minutes: float | None
    finetune_seed: int | None
    finetune_features: bool
    finetune_options: Any


# keyword → (group, field); a keyword given as None takes the field's default
_KEYWORDS: dict[str, tuple[str, str]] = {
    **{name: ("policy", name) for name in (f.name for f in fields(PolicyConfig))},
    "input_shapes": ("shapes", "input_shapes"),
    "allow_unknown_shapes": ("shapes", "allow_unknown_shapes"),
    "sample": ("shapes", "sample"),
    "branches": ("shapes", "branches"),
    "calibration": ("calibration", "data"),
    "refit": ("calibration", "refit"),
    "sensitivity": ("calibration", "sensitivity"),
    "calibration_options": ("calibration", "options"),
    **{name: ("speed", name) for name in (f.name for f in fields(SpeedConfig))},
    "mobile_safe": ("mobile", "mobile_safe"),
    "quantize": ("mobile", "quantize"),
    "finetune": ("finetune", "enabled"),
    "finetune_all": ("finetune", "trainable"),
    "finetune_steps": ("finetune", "steps"),
    "finetune_minutes": ("finetune", "minutes"),
    "finetune_seed": ("finetune", "seed"),
    "finetune_features": ("finetune", "features"),
    "finetune_options": ("finetune", "options"),
}
_DEFAULTED_WHEN_NONE = {"kinds", "objective", "input_shapes", "check_runs", "large_model", "branches", "finetune_seed"}
_POLICY_CHOICE = ("rank", "energy", "speedup", "params_ratio", "ranks")


@dataclass(frozen=True)
class DecomposeConfig:
    """Every option of a conversion, one group each (see the module docstring)."""

    policy: PolicyConfig = field(default_factory=PolicyConfig)
    shapes: ShapeConfig = field(default_factory=ShapeConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    mobile: MobileConfig = field(default_factory=MobileConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def __post_init__(self) -> None:
        policy = self.policy
        if self.speed.by == "latency" and not policy.speedup_alone:
            raise LowRankError("--by latency plans a --speedup budget alone, not --rank/--energy/--ranks or --params-ratio")
        if self.speed.by == "latency" and self.shapes.branches == "all":
            raise LowRankError("--by latency times the branches the reference input runs; --branches all plans every branch by MACs")
        if self.calibration.sensitivity and policy.name != "budget":
            raise LowRankError(f"--sensitivity allocates ranks under a budget: it needs --speedup or --params-ratio, not --{policy.name}")
        if self.mobile.quantize == "static" and not self.calibration.given:
            raise LowRankError("--quantize static needs calibration data (--calibration FILE.npz|FOLDER)")
        if self.finetune.enabled and not self.calibration.given:
            raise LowRankError(
                "--finetune needs --calibration FILE.npz|FOLDER: it trains on the calibration samples (no labels), "
                "those held back to measure the answers excepted"
            )

    @classmethod
    def from_keywords(cls, base: DecomposeConfig | None = None, **keywords: Any) -> DecomposeConfig:
        """``base`` (default: all defaults) with the fields the keyword arguments name replaced.

        ``measure`` is gone: it names ``by="latency"`` in its refusal. An unknown keyword is a ``TypeError``,
        as for any Python function."""
        if "measure" in keywords:
            raise LowRankError("measure was removed: plan by latency with by='latency' (--by latency)")
        unknown = sorted(set(keywords) - set(_KEYWORDS))
        if unknown:
            raise TypeError(f"unexpected keyword argument(s): {', '.join(unknown)}")
        base = base or cls()
        changes: dict[str, dict[str, Any]] = {}
        # finetune= may be a whole group, which the other finetune_ keywords tune
        whole = keywords.pop("finetune") if isinstance(keywords.get("finetune"), FinetuneConfig) else None
        for key, value in keywords.items():
            group, name = _KEYWORDS[key]
            if value is None and key in _DEFAULTED_WHEN_NONE:
                continue
            if key == "kinds" and isinstance(value, str):
                value = [k.strip() for k in value.split(",") if k.strip()]
            if key == "finetune_all":
                value = "all" if value else "factors"
            changes.setdefault(group, {})[name] = value
        groups = {name: replace(getattr(base, name), **values) for name, values in changes.items() if name not in ("policy", "finetune")}
        if whole is not None or "finetune" in changes:
            groups["finetune"] = replace(whole or base.finetune, **changes.get("finetune", {}))
        if "policy" in changes:
            given = changes["policy"]
            values = {f.name: getattr(base.policy, f.name) for f in fields(PolicyConfig)}
            if any(given.get(k) is not None for k in _POLICY_CHOICE):
                # a policy given replaces the base's choice, its default speedup included
                values.update(dict.fromkeys(_POLICY_CHOICE))
            groups["policy"] = PolicyConfig(**{**values, **given})
        return replace(base, **groups)

    def to_dict(self) -> dict[str, Any]:
        """The options as JSON-able values (calibration data by its path, or ``"given"``)."""
        out: dict[str, Any] = {}
        for group in fields(self):
            values: dict[str, Any] = {}
            for f in fields(getattr(self, group.name)):
                value = getattr(getattr(self, group.name), f.name)
                if group.name == "shapes" and f.name == "sample":
                    value = [os.fspath(v) if isinstance(v, (str, os.PathLike)) else "given" for v in self.shapes.samples] or None
                elif isinstance(value, os.PathLike):
                    value = os.fspath(value)
                elif group.name == "calibration" and f.name == "data" and value is not None and not isinstance(value, str):
                    value = "given"
                elif group.name in ("calibration", "finetune") and f.name == "options" and value is not None:
                    value = {k.name: getattr(value, k.name) for k in fields(value)}
                elif isinstance(value, Mapping):
                    value = {k: list(v) if isinstance(v, tuple) else v for k, v in value.items()}
                elif isinstance(value, tuple):
                    value = list(value)
                values[f.name] = value
            out[group.name] = values
        return out
