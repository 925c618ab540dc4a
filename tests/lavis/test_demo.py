"""The embedded demo: generated data, the cached pre-trained tiny BLIP, Aurora adaptation through the
recipes' code path, and a clear gain on the shifted domain."""

from __future__ import annotations

import json

import pytest
import torch

from aurora_pet.cli import main
from aurora_pet.cli.demo import run_demo
from aurora_pet.demo.pretrained import PRETRAIN, PretrainedTiny, pretrained_tiny_blip
from aurora_pet.demo.recipe import ADAPT_RUN, IMAGE_SIZE, TINY_MODEL, demo_recipe, write_demo_data
from aurora_pet.training import load_recipe, write_recipe
from aurora_pet.training.evaluate import evaluate, evaluate_model


def test_demo_recipe_is_a_valid_recipe(tmp_path):
    written = write_demo_data(tmp_path / "data", "shifted", n_train=4, n_val=2, n_test=2)
    pretrained = PretrainedTiny("blip_retrieval", tmp_path / "model.safetensors", dict(TINY_MODEL))
    path = write_recipe(tmp_path / "demo.yaml", demo_recipe(written, tmp_path / "run", pretrained=pretrained))
    recipe = load_recipe(path)
    assert recipe.arch == "blip_retrieval" and recipe.aurora.target_modules == "blip_retrieval/cross-attention"
    assert recipe.model_settings["pretrained"] == str(tmp_path / "model.safetensors")
    assert recipe.cfg.datasets_cfg.flickr30k.vis_processor.train.name == "blip_image_eval"  # no flips
    full = load_recipe(write_recipe(tmp_path / "full.yaml", demo_recipe(written, tmp_path / "r", pretrained=None,
                                                                         aurora=None)))
    assert full.aurora is None


def test_demo_command_line(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "--cache-dir" in capsys.readouterr().out


@pytest.mark.parametrize("epochs", ["0", "-3"])
def test_demo_refuses_fewer_than_one_epoch(tmp_path, capsys, epochs):
    """``--epochs 0`` once ran the default 12 epochs: now a usage error (exit 2) before anything is written."""
    with pytest.raises(SystemExit) as exited:
        main(["demo", "--epochs", epochs, "--output-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path)])
    assert exited.value.code == 2
    assert f"aurora-pet demo: error: argument --epochs: must be a positive integer, got {epochs}" in \
        capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_shipped_pretrained_model_matches_the_settings(tmp_path):
    pretrained = pretrained_tiny_blip(cache_dir=tmp_path)  # the package's weights: nothing trains
    assert pretrained.source == "shipped" and not list(tmp_path.iterdir())
    assert pretrained.metrics["test_txt_r1"] > 30 and pretrained.metrics["test_img_r1"] > 30  # it learned
    meta = json.loads(pretrained.checkpoint.with_suffix(".json").read_text())
    assert meta["pretrain"] == PRETRAIN and meta["model"] == TINY_MODEL
    rng = torch.get_rng_state()
    model = pretrained.build()  # strict load: every key of the tiny BlipRetrieval
    assert type(model).__name__ == "BlipRetrieval"
    assert torch.equal(torch.get_rng_state(), rng)  # its random initialisation leaves the caller's RNG alone


@pytest.mark.slow
def test_pretraining_is_reproducible_from_the_function(tmp_path):
    """``pretrained_tiny_blip`` trains through the recipes' code path and caches (1 epoch here)."""
    first = pretrained_tiny_blip(cache_dir=tmp_path, epochs=1)
    assert first.source == "trained" and first.checkpoint.parent == tmp_path
    assert {"test_txt_r1", "test_img_r1"} <= set(first.metrics)
    again = pretrained_tiny_blip(cache_dir=tmp_path, epochs=1)
    assert again.source == "cache" and again.checkpoint == first.checkpoint
    assert type(again.build()).__name__ == "BlipRetrieval"


def test_shipped_vqa_model_matches_the_settings(tmp_path):
    """The tiny BlipVQA of the VQA learning benchmark ships with the package: nothing trains, and it answers
    source-domain questions well above the answer priors (measured 55.9 %; the priors alone score 31-35 %)."""
    from aurora_pet.demo.pretrained import VQA_PRETRAIN
    from aurora_pet.demo.recipe import VQA_TINY_MODEL

    pretrained = pretrained_tiny_blip("blip_vqa", cache_dir=tmp_path)
    assert pretrained.source == "shipped" and not list(tmp_path.iterdir())
    meta = json.loads(pretrained.checkpoint.with_suffix(".json").read_text())
    assert meta["pretrain"] == VQA_PRETRAIN and meta["model"] == VQA_TINY_MODEL
    assert pretrained.metrics["test_agg_metrics"] > 45
    assert type(pretrained.build()).__name__ == "BlipVQA"  # strict load: every key of the tiny BlipVQA


@pytest.mark.slow
def test_vqa_pretraining_is_cached_by_its_settings_hash(tmp_path):
    """The tiny BlipVQA pre-trains on source-domain questions through the same machinery (1 epoch here: about
    15 s) into an entry named by the hash of its settings; the shipped retrieval model keeps its name."""
    from aurora_pet.demo.pretrained import VQA_PRETRAIN, _settings_hash, pretrain_settings
    from aurora_pet.demo.recipe import VQA_TINY_MODEL

    settings = pretrain_settings(1, "blip_vqa")
    first = pretrained_tiny_blip("blip_vqa", cache_dir=tmp_path, epochs=1)
    assert first.source == "trained" and first.checkpoint.parent == tmp_path
    assert first.checkpoint.stem == f"tiny-blip_vqa-{_settings_hash('blip_vqa', VQA_TINY_MODEL, settings)}"
    assert 0 <= first.metrics["test_agg_metrics"] <= 100
    meta = json.loads(first.checkpoint.with_suffix(".json").read_text())
    assert meta["pretrain"] == settings != VQA_PRETRAIN and meta["model"] == VQA_TINY_MODEL
    again = pretrained_tiny_blip("blip_vqa", cache_dir=tmp_path, epochs=1)
    assert again.source == "cache" and again.checkpoint == first.checkpoint
    assert type(again.build()).__name__ == "BlipVQA"
    retrieval = pretrained_tiny_blip("blip_retrieval", cache_dir=tmp_path)
    assert retrieval.source == "shipped" and retrieval.checkpoint.stem == "tiny-blip_retrieval-87480acffb0b"


@pytest.mark.slow
def test_demo_adaptation_beats_the_pretrained_model(tmp_path):
    lines = []
    result = run_demo(tmp_path / "demo", tmp_path / "cache", print_fn=lines.append)
    before, after = result.before, result.after
    r1 = lambda m: (m["txt_r1"] + m["img_r1"]) / 2  # noqa: E731
    assert r1(after) >= r1(before) + 8.0, (before, after)  # measured: 3.5 -> 17.1
    assert after["r_mean"] >= before["r_mean"] + 15.0, (before, after)  # measured: 8.6 -> 35.4
    text = "\n".join(map(str, lines))
    assert "total trainable" in text and "before" in text and str(result.adapter) in text and str(result.plot) in text
    assert "preset cross-attention" in text and "--preset reference" in text  # says which preset adapts better
    assert (result.adapter / "adapter_model.safetensors").is_file() and result.plot.is_file()
    report = result.parameter_report
    assert report["groups"]["factors"] > 0 and report["trainable"] < report["base"] / 10
    rows = json.loads((tmp_path / "demo" / "run" / "metrics.json").read_text())["epochs"]
    assert len(rows) == ADAPT_RUN["max_epoch"]


def test_evaluate_model_matches_the_recipe_evaluation(tmp_path):
    """The in-memory evaluation (for benchmarks) gives exactly what a recipe run in evaluate mode reports."""
    written = write_demo_data(tmp_path / "data", "source", n_train=2, n_val=2, n_test=8)
    pretrained = pretrained_tiny_blip(cache_dir=tmp_path / "cache")
    direct = evaluate_model(pretrained.build(), written, k_test=4, image_size=IMAGE_SIZE)
    assert set(direct) >= {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean", "agg_metrics"}
    recipe = write_recipe(tmp_path / "eval.yaml", demo_recipe(written, tmp_path / "run", pretrained=pretrained,
                                                              run={"k_test": 4}))
    assert evaluate(recipe) == direct


@pytest.mark.parametrize("preset", ["reference", "text-attention"])
def test_demo_preset_reaches_the_recipe(tmp_path, stop_at, preset):
    """``--preset`` changes Aurora's targets in the recipe the demo trains, nothing else (stopped before the
    evaluation: no training here)."""
    import aurora_pet.training.evaluate as evaluate_module

    stopped = stop_at(evaluate_module, "evaluate")
    with pytest.raises(stopped) as raised:
        main(["demo", "--preset", preset, "--output-dir", str(tmp_path / "demo"), "--cache-dir", str(tmp_path / "c")])
    recipe = load_recipe(raised.value.args[0])
    assert recipe.aurora.target_modules == f"blip_retrieval/{preset}" and recipe.aurora.rank == 64


def test_demo_refuses_an_unknown_preset(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["demo", "--preset", "everything", "--output-dir", str(tmp_path / "out")])
    assert exited.value.code == 2 and "--preset: invalid choice: 'everything'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown preset 'everything'; choose one of cross-attention"):
        run_demo(tmp_path / "out", preset="everything")
    assert not list(tmp_path.iterdir())


def test_demo_never_deletes_a_directory_it_did_not_write(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an earlier demo's output"):
        run_demo(tmp_path, tmp_path / "cache", print_fn=lambda *a: None)
    assert (tmp_path / "notes.txt").read_text() == "mine"
