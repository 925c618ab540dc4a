"""Checkpoints: atomic commits, refusal to resume another configuration, and a killed run that resumes
to exactly the adapter an uninterrupted run produces."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aurora_pet.training import CheckpointStore, RecipeError, ResumeError, dataset_options, load_recipe, train
from aurora_pet.training.run_state import config_differences, save_state

from .test_recipes import IMAGE_SIZE, RECIPES, retrieval_data, tiny_options

FLICKR = RECIPES / "retrieval_flickr30k.yaml"


# -- atomic commits -----------------------------------------------------------------------------------

def _write_files(directory: Path, payload: str = "x") -> None:
    (directory / "adapter_model.safetensors").write_text(payload)
    (directory / "training_state.pt").write_text(payload)


def test_a_crash_while_writing_leaves_latest_on_the_previous_checkpoint(tmp_path):
    store = CheckpointStore(tmp_path)
    first = store.commit("epoch_0", _write_files)
    store.set_latest(first, 0)

    def crash(directory: Path) -> None:
        (directory / "adapter_model.safetensors").write_text("half")
        raise KeyboardInterrupt  # killed half-way through the second checkpoint

    with pytest.raises(KeyboardInterrupt):
        store.commit("epoch_1", crash)
    assert store.latest() == first and not (tmp_path / "checkpoints" / "epoch_1").exists()
    assert not list((tmp_path / "checkpoints").glob(".*.tmp-*"))  # the partial directory is gone
    # a crash between committing the directory and moving latest.json: latest still names epoch_0
    store.commit("epoch_1", _write_files)
    assert store.latest() == first
    # re-committing an existing name replaces it whole
    store.commit("epoch_1", lambda d: _write_files(d, "new"))
    assert (tmp_path / "checkpoints" / "epoch_1" / "training_state.pt").read_text() == "new"


def test_damaged_latest_pointer_is_reported(tmp_path):
    store = CheckpointStore(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest.json").write_text("{")
    with pytest.raises(ResumeError, match="damaged"):
        store.latest()


def test_config_differences_are_listed():
    saved = {"aurora": {"rank": 8, "ice": True, "modules_to_save": ["a"]}, "model": {"size": "tiny"}}
    current = {"aurora": {"rank": 16, "ice": True, "modules_to_save": ["a", "b"]}, "model": {"size": "tiny"}}
    assert config_differences(saved, current) == ["aurora.modules_to_save: checkpoint ['a'] vs recipe ['a', 'b']",
                                                  "aurora.rank: checkpoint 8 vs recipe 16"]


# -- refusing what would lose work ---------------------------------------------------------------------

def _fake_run(out: Path, options: list[str]) -> None:
    """A committed checkpoint as a run with ``options`` would leave it (without training one)."""
    recipe = load_recipe(FLICKR, options)
    store = CheckpointStore(out)
    directory = store.commit("epoch_0", lambda d: save_state(d, {"epoch": 0, "fingerprint": recipe.fingerprint()}))
    store.set_latest(directory, 0)


def test_resume_with_another_aurora_config_is_refused(tmp_path):
    written = retrieval_data(tmp_path / "data")
    out = tmp_path / "run"
    options = dataset_options(written, image_size=IMAGE_SIZE) + tiny_options(out)
    _fake_run(out, options)
    with pytest.raises(ResumeError) as error:
        train(FLICKR, options + ["aurora.rank=16", "aurora.gqt=False"], resume=True)
    message = str(error.value)
    assert "refusing to resume" in message and str(out / "checkpoints" / "epoch_0") in message
    assert "aurora.rank: checkpoint 8 vs recipe 16" in message and "aurora.gqt: checkpoint True vs recipe False" in message
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_0", "latest.json"]  # untouched


def test_starting_over_an_existing_run_is_refused(tmp_path):
    written = retrieval_data(tmp_path / "data")
    out = tmp_path / "run"
    options = dataset_options(written, image_size=IMAGE_SIZE) + tiny_options(out)
    _fake_run(out, options)
    with pytest.raises(RecipeError, match="pass --resume"):
        train(FLICKR, options)


# -- kill and resume -------------------------------------------------------------------------------------

def _command(options: list[str], *extra: str) -> list[str]:
    return [sys.executable, "-m", "aurora_pet.cli", "train", "--cfg-path", str(FLICKR), *extra, "--options", *options]


def _adapter(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter_model.safetensors"))


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_adapter(tmp_path):
    written = retrieval_data(tmp_path / "data")
    data = dataset_options(written, image_size=IMAGE_SIZE)
    epochs = 3
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def options(out: Path) -> list[str]:
        return data + tiny_options(out, epochs=epochs) + ["run.init_lr=1e-2", "aurora.dropout=0.1",
                                                          "run.valid_splits=[val]"]

    full, killed = tmp_path / "full", tmp_path / "killed"
    done = subprocess.run(_command(options(full)), capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]

    process = subprocess.Popen(_command(options(killed)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=env, start_new_session=True)
    latest = killed / "checkpoints" / "latest.json"
    deadline = time.time() + 600
    while not latest.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # as a crash or a pre-empted job: no clean-up runs
    process.wait()
    first = json.loads(latest.read_text())["epoch"]
    assert first < epochs - 1, "the run finished before it could be killed"
    assert not (killed / "adapter").exists()

    resumed = subprocess.run(_command(options(killed), "--resume"), capture_output=True, text=True, timeout=900,
                             env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {killed / 'checkpoints' / f'epoch_{first}'}" in resumed.stdout

    last = f"epoch_{epochs - 1}"
    for name in (last, "best"):
        a, b = _adapter(full / "checkpoints" / name), _adapter(killed / "checkpoints" / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key} differs after resuming"
    assert _adapter(full / "adapter").keys() == _adapter(killed / "adapter").keys()
    history = [json.loads((d / "metrics.json").read_text())["epochs"] for d in (full, killed)]
    assert history[0] == history[1] and len(history[0]) == epochs  # no epoch lost or repeated
    assert re.search(r"resume_state", " ".join(p.name for p in (killed / "checkpoints" / last).iterdir()))
    assert not (killed / "checkpoints" / "epoch_0" / "resume_state.safetensors").exists()  # kept for the latest only
