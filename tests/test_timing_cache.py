"""The layer-timing cache kept across conversions: where it lives, what it is keyed by, hits and misses, and
that a damaged, unwritable or concurrently written store never breaks a conversion.

Layer timings are faked (a deterministic function of the layer's weights and input size), so no assertion
depends on how fast anything ran; the whole-model checks still run in onnxruntime, on tiny models.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import onnx
import pytest
from fake_clock import FakeClock, install
from test_measure import wide_chain

from onnx_lowrank import decompose
from onnx_lowrank.timing import LayerTime
from onnx_lowrank.timing_cache import CACHE_ENV, FORMAT, TimingStore, cache_folder, machine_key

TARGET = 1.05


@pytest.fixture
def timed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A fake clock (tests/fake_clock.py: milliseconds proportional to weights x pixels, the same on every run);
    returns the list of layer models timed."""
    calls: list[int] = []
    clock = install(monkeypatch, FakeClock())
    real = clock.layer

    def layer(model: onnx.ModelProto, *args: Any) -> LayerTime:
        calls.append(len(model.graph.node))
        return real(model, *args)

    monkeypatch.setattr(clock, "layer", layer)
    return calls


def test_folder_from_env_then_xdg_then_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_folder() == tmp_path / "mine"
    monkeypatch.delenv(CACHE_ENV)
    assert cache_folder() == tmp_path / "xdg" / "onnx-lowrank"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_folder() == tmp_path / "home" / ".cache" / "onnx-lowrank"


def test_machine_key_holds_what_changes_a_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU, onnxruntime version, threads and optimization level each give their own store file."""
    import onnxruntime

    one = machine_key(1)
    assert one["cpu"]["model"] and one["onnxruntime"] == onnxruntime.__version__ and one["optimization"] == "default"
    files = {TimingStore.open(m, Path("/x")).path for m in (one, machine_key(2), machine_key(1, "extended"))}
    monkeypatch.setattr(onnxruntime, "__version__", "0.0.0-other")
    files.add(TimingStore.open(machine_key(1), Path("/x")).path)
    other_cpu = {**one, "cpu": {"model": "Another CPU", "isa": ["avx512f"]}}
    files.add(TimingStore.open(other_cpu, Path("/x")).path)
    assert len(files) == 5


def test_second_conversion_is_served_from_the_store(timed: list[int], tmp_path: Path) -> None:
    """The first conversion times every geometry (misses), the second times none (all hits), the third of a
    model with one more layer of the same geometry also none."""
    _, first = decompose(wide_chain(layers=2), speedup=TARGET, timing_cache=tmp_path)
    first_cache = first.latency["timing_cache"]
    assert first.policy["by"] == "latency" and first_cache["misses"] == len(timed) > 0 and first_cache["hits"] == 0
    assert first_cache["path"] is not None and Path(first_cache["path"]).parent == tmp_path

    timed.clear()
    _, second = decompose(wide_chain(layers=2), speedup=TARGET, timing_cache=tmp_path)
    assert not timed and second.latency["layers_timed"] == 0
    assert second.latency["timing_cache"]["hits"] == first_cache["misses"] and second.latency["timing_cache"]["misses"] == 0
    _, third = decompose(wide_chain(layers=3), speedup=TARGET, timing_cache=tmp_path)
    assert not timed and third.latency["timing_cache"]["misses"] == 0


def test_thread_counts_are_kept_apart(timed: list[int], tmp_path: Path) -> None:
    """Timings at one thread do not answer for two: each thread count has its own store."""
    decompose(wide_chain(), speedup=TARGET, timing_cache=tmp_path, threads=1)
    timed.clear()
    _, two = decompose(wide_chain(), speedup=TARGET, timing_cache=tmp_path, threads=2)
    assert timed and two.latency["timing_cache"]["hits"] == 0 and two.latency["threads"] == 2
    assert len(list(tmp_path.glob("timings-*.json"))) == 2


def test_disabled_store_writes_nothing(timed: list[int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    decompose(wide_chain(), speedup=TARGET, timing_cache=False)
    assert timed and not list(tmp_path.iterdir())
    timed.clear()
    _, again = decompose(wide_chain(), speedup=TARGET, timing_cache=False)
    cache = again.latency["timing_cache"]
    assert timed and cache["path"] is None and cache["hits"] == 0 and cache["misses"] == len(timed) and cache["not_kept"] is None


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"", b"\xff\xfe\x00binary", b'{"format": 2, "machine": {}, "entries": {}}', b'{"format": 99}', b"[1, 2, 3]"],
    ids=["truncated", "empty", "binary", "other-machine", "other-format", "not-an-object"],
)
def test_damaged_store_is_ignored_with_a_warning_and_replaced(timed: list[int], tmp_path: Path, content: bytes) -> None:
    _, first = decompose(wide_chain(layers=1), speedup=TARGET, timing_cache=tmp_path)
    (path,) = tmp_path.glob("timings-*.json")
    path.write_bytes(content)
    timed.clear()
    _, report = decompose(wide_chain(layers=1), speedup=TARGET, timing_cache=tmp_path)
    assert timed, "a damaged store answered a lookup"
    assert any("timing cache" in w and str(path) in w for w in report.warnings), report.warnings
    data = json.loads(path.read_text())  # replaced by a good one
    assert data["format"] == FORMAT and len(data["entries"]) == first.latency["timing_cache"]["misses"]


def test_store_entries_of_bad_shape_are_dropped(tmp_path: Path) -> None:
    machine = {"format": FORMAT, "threads": 1}
    path = TimingStore.open(machine, tmp_path).path
    assert path is not None
    entries = {
        "good": [1.5, 0.0, 0.1, 2.0],
        "negative": [-1.0, 0.0, 0.1, 2.0],
        "text": ["x", 0.0, 0.1, 2.0],
        "short": [1.0, 0.0],
        "no-probe": [1.0, 0.0, 0.1, 0.0],
    }
    path.write_text(json.dumps({"format": FORMAT, "machine": machine, "quiet_probe": 2.0, "entries": entries}))
    store = TimingStore.open(machine, tmp_path)
    assert store.get("good") == 1.5 and all(store.get(k) is None for k in ("negative", "text", "short", "no-probe"))
    assert not store.warnings


def test_unwritable_folder_is_a_warning_not_a_failure(timed: list[int], tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    _, report = decompose(wide_chain(layers=1), speedup=TARGET, timing_cache=blocker / "cache")
    assert report.decomposed and any("not written" in w for w in report.warnings)


def test_concurrent_saves_keep_every_entry(tmp_path: Path) -> None:
    """Stores opened at once by several conversions, each saving its own timings: the file ends with all of them,
    and no temporary file is left."""
    machine = {"format": FORMAT, "threads": 1}
    stores = [TimingStore.open(machine, tmp_path) for _ in range(8)]
    for i, store in enumerate(stores):
        for j in range(50):
            store.put(f"layer-{i}-{j}", 1.0 + i + j / 100)
    barrier = threading.Barrier(len(stores))

    def save(store: TimingStore) -> None:
        barrier.wait()
        store.save()

    threads = [threading.Thread(target=save, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(not store.warnings for store in stores)
    merged = TimingStore.open(machine, tmp_path)
    assert len(merged.entries) == 8 * 50 and merged.get("layer-7-49") == pytest.approx(8.49)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # temporary files are renamed or removed


def test_keys_name_the_geometry_not_the_weights(timed: list[int], tmp_path: Path) -> None:
    """Two models of the same geometry and other weights share entries; another input size does not."""
    decompose(wide_chain(size=24), speedup=TARGET, timing_cache=tmp_path)
    timed.clear()
    other_weights = wide_chain(size=24)
    for tensor in other_weights.graph.initializer:
        tensor.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensor) * 2, tensor.name))
    decompose(other_weights, speedup=TARGET, timing_cache=tmp_path)
    assert not timed
    decompose(wide_chain(size=20), speedup=TARGET, timing_cache=tmp_path)
    assert timed
    (path,) = tmp_path.glob("timings-*.json")
    keys: dict[str, Any] = json.loads(path.read_text())["entries"]
    assert any('"Conv"' in key and "[1, 48, 20, 20]" in key and '"FLOAT"' in key for key in keys)
