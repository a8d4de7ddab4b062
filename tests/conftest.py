"""Shared test setup: the layer-timing cache of the tests lives in a temporary folder, never the user's."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from onnx_lowrank.timing_cache import CACHE_ENV


@pytest.fixture(autouse=True, scope="session")
def _private_timing_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("timing-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(folder))  # subprocesses of the CLI tests inherit it
        yield folder
