"""Layer timings kept across conversions, per machine: a second conversion of a similar model is nearly free.

Planning by latency times every candidate split of every layer in onnxruntime
(:class:`onnx_lowrank.layer_timing.LayerTimer`); that costs seconds per model, and the
same geometries come back in every conversion (a model converted twice, at two
targets; the 3×3 256→256 conv at 14×14 of every ResNet). A timing depends on
the layer and on what runs it, so a store holds the timings of one *machine
key* — the CPU (its model name and the vector extensions onnxruntime's kernels
dispatch on), the onnxruntime version, the intra-op thread count and the graph
optimization level — and within it one entry per layer geometry, dtype, kind
and rank (the entry keys are built by the timer).

Where: ``$ONNX_LOWRANK_CACHE_DIR`` when set, else ``$XDG_CACHE_HOME/onnx-lowrank``,
else ``~/.cache/onnx-lowrank``; one file ``timings-<hash of the machine key>.json``.

Writes are atomic and merge: under an exclusive lock on a ``.lock`` file beside
the store (``fcntl.flock``, where the platform has it), the file is read again,
this run's new entries are added, and the result is written to a temporary
file in the same folder and renamed over the old one. A reader therefore sees
the old file or the new one, never half of one, and two conversions that save
at once both keep their entries. A file that cannot be read (truncated, not
JSON, another format) is ignored with a warning and replaced at the next save;
a folder that cannot be written gives a warning and the conversion goes on
without persisting. Nothing here raises.

A timing taken on a busy machine must not steer a plan on a quiet one. Each
entry keeps, beside its milliseconds, the spread of its runs and the *load
probe* of its moment — the milliseconds of a fixed small conv
(:meth:`onnx_lowrank.timing.Clock.load`) timed when the conversion began —
and the file keeps the quietest probe it has seen. A conversion that begins
with a probe ``p`` on a store whose quietest is ``q`` runs at load ``p / q``;
an entry timed at a load more than :data:`LOAD_SLACK` times today's, or whose
runs spread more than :data:`MAX_SPREAD`, is timed again (``stale``). The
planner also *discards* entries a whole-model measurement contradicts (they
are timed again, and dropped from the file), and *holds* a run's new entries —
writes none of them — when its own measurements say the machine was busy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CACHE_ENV", "FORMAT", "TimingStore", "cache_folder", "cpu_description", "machine_key", "open_store"]

CACHE_ENV = "ONNX_LOWRANK_CACHE_DIR"
FORMAT = 2  # entries: [milliseconds, unix time, spread, load probe ms]; format 1 held the first two
# an entry timed at more than this times today's load (its probe against the quietest probe) is timed again
LOAD_SLACK = 1.25
# an entry whose runs spread more than this (interquartile range / median) is timed again on a quiet machine
MAX_SPREAD = 0.5
# a store is pruned to its newest entries beyond this size (a few MB of JSON); timings are cheap to redo
MAX_ENTRIES = 50_000
# the vector extensions onnxruntime's CPU kernels choose between (x86 and Arm); other flags do not change timings
_ISA_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "amx_tile", "asimd", "sve", "sve2")


def cache_folder() -> Path:
    """The folder of the timing stores (see the module docstring)."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "onnx-lowrank"


def cpu_description() -> dict[str, Any]:
    """The CPU's model name and the vector extensions it has (``/proc/cpuinfo`` where there is one)."""
    name, flags = "", set[str]()
    with contextlib.suppress(OSError, UnicodeDecodeError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "hardware", "cpu model") and not name:
                name = value.strip()
            elif key in ("flags", "features") and not flags:
                flags = set(value.split())
    return {"model": name or platform.processor() or platform.machine(), "isa": sorted(flags.intersection(_ISA_FLAGS))}


def machine_key(threads: int, optimization: str = "default") -> dict[str, Any]:
    """What a layer timing depends on besides the layer: CPU, onnxruntime version, threads, optimization level."""
    import onnxruntime

    return {
        "format": FORMAT,
        "cpu": cpu_description(),
        "onnxruntime": onnxruntime.__version__,
        "threads": threads,
        "optimization": optimization,
    }


def _digest(machine: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(machine, sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created if needed) for the block; no lock where fcntl does not exist."""
    try:
        import fcntl
    except ImportError:  # Windows: the rename alone keeps the file whole; concurrent saves may drop entries
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


Entry = list[float]  # [milliseconds, unix time, spread, load probe ms]


def _entry(value: Any) -> Entry | None:
    """A well-formed entry, or None."""
    if not (isinstance(value, list) and len(value) == 4 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)):
        return None
    ms, when, spread, probe = (float(x) for x in value)
    return [ms, when, spread, probe] if ms > 0 and spread >= 0 and probe > 0 else None


@dataclass
class TimingStore:
    """The timings of one machine key: read once when opened, new entries written back by :meth:`save`.

    ``path`` None keeps the timings in memory only (the persistent store disabled). ``hits`` counts the
    entries earlier runs answered, ``misses`` those that had to be timed, ``stale`` those timed again because
    they were taken on a busier machine or spread too much, ``discarded`` those a whole-model measurement
    contradicted; each entry once however often it is looked up (the layers of one geometry share one).
    ``warnings`` says what went wrong with the file.
    """

    path: Path | None
    machine: dict[str, Any]
    entries: dict[str, Entry] = field(default_factory=dict)
    new: dict[str, Entry] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    misses: int = 0
    served: set[str] = field(default_factory=set)  # the keys earlier runs answered in this one
    stale: set[str] = field(default_factory=set)
    dropped: set[str] = field(default_factory=set)  # discarded: removed from the file at the next save
    quiet: float | None = None  # the quietest load probe the store has seen (ms)
    probe: float | None = None  # this run's load probe (ms)
    held: str | None = None  # why this run's new entries are not written

    @property
    def hits(self) -> int:
        return len(self.served)

    @property
    def load(self) -> float | None:
        """This run's load: its probe against the quietest probe (1.0 on the quietest machine seen)."""
        if self.probe is None or not self.quiet:
            return None
        return self.probe / self.quiet

    @classmethod
    def open(cls, machine: Mapping[str, Any], folder: Path | None) -> TimingStore:
        """The store of ``machine`` in ``folder`` (None: an in-memory store that is never written)."""
        if folder is None:
            return cls(None, dict(machine))
        store = cls(folder / f"timings-{_digest(machine)}.json", dict(machine))
        store.entries, store.quiet = store._read(warn=True)
        return store

    def begin(self, probe_ms: float) -> None:
        """This run's load probe; the quietest probe is the least the store has seen, this one included."""
        self.probe = probe_ms
        self.quiet = min(self.quiet, probe_ms) if self.quiet else probe_ms

    def _read(self, warn: bool) -> tuple[dict[str, Entry], float | None]:
        assert self.path is not None
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}, None
        except (OSError, UnicodeDecodeError) as exc:
            if warn:
                self.warnings.append(f"timing cache {self.path} cannot be read ({exc}); layers are timed afresh")
            return {}, None
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("machine") != self.machine:
                raise ValueError("not a timing cache of this format and machine")
            entries = data["entries"]
            if not isinstance(entries, dict):
                raise ValueError("entries is not an object")
            quiet = data.get("quiet_probe")
            if quiet is not None and not (isinstance(quiet, (int, float)) and quiet > 0):
                raise ValueError("quiet_probe is not a positive number")
            good = {str(k): e for k, v in entries.items() if (e := _entry(v)) is not None}
        except (ValueError, KeyError, TypeError) as exc:
            if warn:
                self.warnings.append(f"timing cache {self.path} is damaged ({exc}): ignored, and replaced when this run saves")
            return {}, None
        return good, float(quiet) if quiet is not None else None

    def _usable(self, entry: Entry) -> bool:
        """An entry timed at about today's load or a quieter one, with a steady spread (when the load is known)."""
        load = self.load
        if load is None or not self.quiet:
            return True
        timed_load = entry[3] / self.quiet
        return timed_load <= LOAD_SLACK * load and (entry[2] <= MAX_SPREAD or load > LOAD_SLACK)

    def get(self, key: str) -> float | None:
        """Milliseconds stored for ``key``, or None (a miss, which the caller then times and :meth:`put` s)."""
        if key in self.new:
            return self.new[key][0]
        entry = self.entries.get(key)
        if entry is None or key in self.dropped:
            self.misses += 1
            return None
        if not self._usable(entry):
            self.stale.add(key)
            return None
        self.served.add(key)
        return entry[0]

    def put(self, key: str, ms: float, spread: float = 0.0) -> None:
        self.new[key] = [float(ms), time.time(), float(spread), float(self.probe or 1.0)]

    def discard(self, keys: Iterable[str]) -> None:
        """Forget ``keys``: the next lookup times them again, and the file loses them at the next save."""
        for key in keys:
            self.dropped.add(key)
            self.new.pop(key, None)
            self.served.discard(key)

    def hold(self, why: str) -> None:
        """Write none of this run's new entries (``why``: what showed the machine was busy)."""
        self.held = why

    def save(self) -> None:
        """Merge this run's new entries into the file (see the module docstring); a failure is a warning."""
        if self.path is None or ((not self.new or self.held) and not self.dropped):
            return
        folder = self.path.parent
        new = {} if self.held else self.new
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with _locked(folder / f"{self.path.name}.lock"):
                on_file, quiet = self._read(warn=False)
                merged = {k: v for k, v in on_file.items() if k not in self.dropped or k in new}
                merged.update(new)
                if len(merged) > MAX_ENTRIES:  # keep the newest
                    merged = dict(sorted(merged.items(), key=lambda item: item[1][1])[-MAX_ENTRIES:])
                quiet = min(q for q in (quiet, self.quiet) if q) if (quiet or self.quiet) else None
                fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=folder)
                try:
                    with os.fdopen(fd, "w") as f:
                        json.dump({"format": FORMAT, "machine": self.machine, "quiet_probe": quiet, "entries": merged}, f)
                    umask = os.umask(0)
                    os.umask(umask)
                    os.chmod(tmp, 0o666 & ~umask)
                    os.replace(tmp, self.path)
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise
        except OSError as exc:
            self.warnings.append(f"timing cache {self.path} not written ({exc.strerror or exc}); the next run times these layers again")
            return
        self.entries.update(new)
        self.new = {}

    def summary(self) -> dict[str, Any]:
        """For the report: where the store is, this run's hits, misses, stale and discarded entries, its load, and
        why its new timings were not kept (None: they were)."""
        return {
            "path": str(self.path) if self.path else None,
            "hits": self.hits,
            "misses": self.misses,
            "stale": len(self.stale),
            "discarded": len(self.dropped),
            "load": self.load,
            "not_kept": self.held,
        }


def open_store(threads: int, timing_cache: bool | str | os.PathLike[str]) -> TimingStore:
    """The timing store of this machine and thread count: in the user's cache folder, a given folder, or memory only."""
    machine = machine_key(threads)
    if timing_cache is False:
        return TimingStore.open(machine, None)
    folder = cache_folder() if timing_cache is True else Path(timing_cache)
    return TimingStore.open(machine, folder)
