"""The retrieval recipe under torchrun: two processes, DDP on CPU (gloo), LAVIS's runner end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from aurora_pet.training import dataset_options

from .test_recipes import IMAGE_SIZE, RECIPES, retrieval_data, tiny_options


@pytest.mark.slow
def test_torchrun_two_processes_retrieval(tmp_path):
    written = retrieval_data(tmp_path / "data", n_train=8)
    out = tmp_path / "run"
    # global batch 2 x 4 = 8 divides the queue (16), as LAVIS requires
    options = dataset_options(written, image_size=IMAGE_SIZE) + tiny_options(out, epochs=2) + ["run.valid_splits=[val]"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(RECIPES / "train.py"), "--cfg-path", str(RECIPES / "retrieval_flickr30k.yaml"), "--options", *options]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "distributed init (rank 0, world 2, gloo)" in done.stdout
    assert "distributed init (rank 1, world 2, gloo)" in done.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics["epochs"]] == [0, 1]
    assert {"test_txt_r1", "test_img_r1", "test_agg_metrics"} <= set(metrics["final"])
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["dir"] == "epoch_1"
    state = torch.load(out / "checkpoints" / "epoch_1" / "training_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2  # every rank's RNG, for an exact resume
    assert load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert '"train_loss"' in (out / "log.txt").read_text()  # LAVIS's own log, written by rank 0 only
