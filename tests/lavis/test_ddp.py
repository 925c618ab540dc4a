"""Two-process DistributedDataParallel training of a wrapped tiny BLIP retrieval model (gloo, CPU).

LAVIS's RunnerBase wraps the model in DDP without find_unused_parameters, so every trainable parameter must
take part in every step; retrieval's forward gathers features across ranks (concat_all_gather, and
GatherLayer with negative_all_rank). The ranks see different data; DDP must leave them with one adapter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aurora_pet.adapter_files import WEIGHTS_NAME

from .ddp_worker import CASES, STEPS

WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}  # LAVIS's imports are noisy
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
               str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_ranks_end_with_one_adapter(runs, case):
    ranks = [load_file(runs / case / f"rank{r}" / WEIGHTS_NAME) for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys() and any(k.startswith("factors_m.") for k in ranks[0])
    for key, value in ranks[0].items():
        assert torch.equal(value, ranks[1][key]), key
    assert ranks[0]["factors.V"].abs().sum() > 0  # trained, not just equal at initialisation


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_ranks_saw_different_data(runs, case):
    losses = [json.loads((runs / case / f"rank{r}" / "losses.json").read_text()) for r in range(2)]
    assert len(losses[0]) == STEPS and losses[0] != losses[1]
