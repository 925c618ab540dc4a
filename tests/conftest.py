"""Test-wide settings: one torch thread, since the suite's models are tiny and CI has 2 cores
(two threads fighting over them make tiny ops many times slower).

`tests/core` runs in both environments; `tests/lavis` and `tests/hf` need their family's environment and
are skipped elsewhere, unless AURORA_PET_TEST_FAMILIES names the family (as `make test` does), in which
case a missing dependency is an error, never a silent skip."""

import importlib
import os

import pytest
import torch

torch.set_num_threads(1)


def require_family(name: str, module: str, minversion: str | None = None) -> None:
    """Skip the calling test directory when `module` is missing, or fail when `make test` requires it."""
    required = name in os.environ.get("AURORA_PET_TEST_FAMILIES", "").split(",")
    if required:
        imported = importlib.import_module(module)
        version = getattr(imported, "__version__", "0")
        if minversion and int(version.split(".")[0]) < int(minversion):
            raise RuntimeError(f"the {name} tests need {module}>={minversion}, found {version}")
        return
    pytest.importorskip(module, minversion=minversion, reason=f"the {name} family's environment is not active")


class Stopped(Exception):
    """Raised in place of a function replaced by the `stop_at` fixture; ``args`` are what it was called with."""


@pytest.fixture
def stop_at(monkeypatch):
    """``stop_at(module, name)``: calling ``module.name`` raises `Stopped` with its arguments — a command runs
    up to that call (say, the runner) and the test reads what it was about to do, without training."""
    def install(module, name: str) -> type[Stopped]:
        def stop(*args, **kwargs):
            raise Stopped(*args)

        monkeypatch.setattr(module, name, stop)
        return Stopped

    return install
