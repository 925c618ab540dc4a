"""The real recipes: published settings, key checking, data checks, and end-to-end runs through the same
code path users run (``aurora-pet train`` = ``recipes/train.py``) with a tiny BLIP on generated data."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aurora_pet.data import write_retrieval_dataset, write_vqa_dataset
from aurora_pet.training import DataError, RecipeError, dataset_options, load_recipe, train

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
IMAGE_SIZE = 32


def tiny_options(output_dir: Path, *, arch: str = "blip_retrieval", epochs: int = 1) -> list[str]:
    """What turns a real recipe into a seconds-long CPU run: a tiny random BLIP, one short epoch."""
    options = [
        "model.size=tiny", f"model.image_size={IMAGE_SIZE}", "model.pretrained=null", "model.vit_grad_ckpt=False",
        "run.device=cpu", f"run.max_epoch={epochs}", "run.batch_size_train=4", "run.batch_size_eval=8",
        "run.num_workers=0", "run.log_freq=1000", f"run.output_dir={output_dir}", "aurora.rank=8",
    ]
    if arch == "blip_retrieval":
        options += ["model.queue_size=16", "run.k_test=4"]
    else:
        options += ["run.num_ans_candidates=8", "run.valid_splits=[val]"]
    return options


def retrieval_data(root: Path, style: str = "flickr30k", **sizes) -> dict:
    return write_retrieval_dataset(root, style=style, image_size=IMAGE_SIZE,
                                   **{"n_train": 8, "n_val": 4, "n_test": 4, **sizes})


# -- the recipes as shipped ------------------------------------------------------------------------

PUBLISHED = {
    # recipe: (arch, dataset builder, lr, epochs, batch per GPU, k_test)
    "retrieval_flickr30k": ("blip_retrieval", "flickr30k", 1e-4, 4, 16, 128),
    "retrieval_coco": ("blip_retrieval", "coco_retrieval", 1e-5, 6, 16, 256),
    "vqav2": ("blip_vqa", "coco_vqa", 2e-5, 5, 16, None),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_recipe_has_the_published_settings(name):
    arch, builder, lr, epochs, batch, k_test = PUBLISHED[name]
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    run, model = recipe.cfg.run_cfg, recipe.cfg.model_cfg
    assert model.arch == arch and list(recipe.cfg.datasets_cfg) == [builder]
    assert (float(run.init_lr), run.max_epoch, run.batch_size_train) == (lr, epochs, batch)
    assert run.lr_sched == "linear_warmup_cosine_lr" and float(run.weight_decay) == 0.05
    assert run.get("k_test") == k_test
    assert model.load_finetuned is False and "model_base_capfilt_large" in model.pretrained  # pre-trained BLIP
    assert model.get("size", "base") == "base"
    assert model.vocab_file is None and model.allow_download is False  # BERT's vocabulary from the HF cache
    cfg = recipe.aurora
    assert cfg.rank == 64 and cfg.core == "cp" and cfg.ice and cfg.gqt and cfg.scale == 1.0
    assert cfg.target_modules == f"{arch}/cross-attention"
    if arch == "blip_retrieval":
        assert sorted(cfg.modules_to_save) == ["itm_head", "text_proj", "vision_proj"]
        assert model.queue_size % (8 * batch) == 0  # 8 GPUs
        assert recipe.cfg.datasets_cfg[builder].vis_processor.train.image_size == 384
    else:
        assert "vg_vqa" not in recipe.cfg.datasets_cfg and run.inference_method == "rank"


# -- key and value checks (nothing runs) ------------------------------------------------------------

@pytest.mark.parametrize("option, message", [
    ("aurora.rnak=8", "unknown key 'aurora.rnak' (did you mean 'rank'?)"),
    ("aurora.preset=cross-atention", "did you mean 'blip_retrieval/cross-attention'"),
    ("run.init_lrr=1e-3", "unknown key 'run.init_lrr' (did you mean 'init_lr'?)"),
    ("model.queue_sise=16", "unknown key 'model.queue_sise' (did you mean 'queue_size'?)"),
    ("datasets.flickr30k.vis_procesor.train.name=x", "did you mean 'vis_processor'?"),
    ("datasets.flikr30k.data_type=images", "unknown dataset builder 'flikr30k' (did you mean 'flickr30k'?)"),
    ("runn.seed=1", "unknown key 'runn' (did you mean 'run'?)"),
    ("run.task=retreival", "did you mean 'retrieval'?"),
    ("aurora.core=tensor", "core must be one of"),
    ("model.size=small", "model.size must be 'base' or 'tiny'"),
])
def test_typos_and_bad_values_are_named(option, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_recipe(RECIPES / "retrieval_flickr30k.yaml", [option])


def test_typo_in_the_recipe_file(tmp_path):
    text = (RECIPES / "vqav2.yaml").read_text().replace("  rank: 64", "  rnak: 64").replace("  max_epoch:", "  max_epochs:")
    path = tmp_path / "vqav2.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    assert "'aurora.rnak' (did you mean 'rank'?)" in str(error.value)
    assert "'run.max_epochs' (did you mean 'max_epoch'?)" in str(error.value)
    assert str(path) in str(error.value)


def test_missing_recipe_and_bad_options(tmp_path):
    with pytest.raises(RecipeError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="key=value"):
        load_recipe(RECIPES / "vqav2.yaml", ["run.seed=1", "run.max_epoch"])


def test_options_reach_lavis_config_and_model_settings():
    recipe = load_recipe(RECIPES / "retrieval_coco.yaml", ["model.size=tiny", "run.init_lr=3e-3", "aurora.rank=8",
                                                         "aurora.ice=False"])
    assert float(recipe.cfg.run_cfg.init_lr) == 3e-3 and recipe.model_settings["size"] == "tiny"
    assert recipe.aurora.rank == 8 and not recipe.aurora.ice and recipe.aurora.gqt
    assert recipe.cfg.config.aurora.rank == 8  # logged with LAVIS's config
    assert recipe.fingerprint()["aurora"]["rank"] == 8


# -- bad data: clear error, nothing written ---------------------------------------------------------

def test_missing_image_is_named_before_anything_runs(tmp_path):
    written = retrieval_data(tmp_path / "data")
    missing = Path(written["images"], "flickr30k-images/100001.jpg")
    missing.unlink()
    out = tmp_path / "run"
    with pytest.raises(DataError, match=re.escape(str(missing))):
        train(RECIPES / "retrieval_flickr30k.yaml", dataset_options(written, image_size=IMAGE_SIZE) + tiny_options(out))
    assert not (out / "checkpoints").exists()


def test_malformed_annotation_line_is_named(tmp_path):
    written = retrieval_data(tmp_path / "data")
    ann = Path(written["annotations"]["train"][0])
    entries = json.loads(ann.read_text())
    del entries[7]["caption"]
    ann.write_text("[\n" + ",\n".join(json.dumps(e) for e in entries) + "\n]\n")  # one entry per line
    options = dataset_options(written, image_size=IMAGE_SIZE) + tiny_options(tmp_path / "run")
    with pytest.raises(DataError, match=re.escape(f"{ann}:9: malformed annotation (entry 7): missing key 'caption'")):
        train(RECIPES / "retrieval_flickr30k.yaml", options)
    ann.write_text(ann.read_text().replace('"image_id"', '"image_id":', 1))  # broken JSON
    with pytest.raises(DataError, match=re.escape(f"{ann}:2:") + ".*malformed annotation file"):
        train(RECIPES / "retrieval_flickr30k.yaml", options)


def test_cpu_only_machine_gets_a_clear_device_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is available")
    written = retrieval_data(tmp_path / "data")
    options = dataset_options(written, image_size=IMAGE_SIZE) + tiny_options(tmp_path / "run") + ["run.device=cuda"]
    with pytest.raises(RecipeError, match="run.device=cpu"):
        train(RECIPES / "retrieval_flickr30k.yaml", options)


# -- end to end --------------------------------------------------------------------------------------

def _check_run(out: Path, metric_keys: set[str]) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    assert metric_keys <= set(metrics["final"]), metrics["final"]
    assert (out / "metrics.png").stat().st_size > 0 and (out / "metrics.csv").is_file()
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["dir"] == "epoch_0"
    epoch = out / "checkpoints" / "epoch_0"
    assert {p.name for p in epoch.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors",
                                                 "training_state.pt"}
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any(k.startswith("factors.") for k in adapter) and all(not k.startswith("base") for k in adapter)
    return metrics


RETRIEVAL_METRICS = {f"test_{d}_r{k}" for d in ("txt", "img") for k in (1, 5, 10)} | {"test_agg_metrics"}


@pytest.mark.slow
@pytest.mark.parametrize("name, style", [("retrieval_flickr30k", "flickr30k"), ("retrieval_coco", "coco")])
def test_retrieval_recipe_end_to_end(name, style, tmp_path):
    written = retrieval_data(tmp_path / "data", style=style)
    out = tmp_path / "run"
    rng, handlers = torch.get_rng_state(), list(logging.getLogger().handlers)
    result = train(RECIPES / f"{name}.yaml", dataset_options(written, image_size=IMAGE_SIZE) + tiny_options(out))
    # a library call: the run seeded every RNG and LAVIS set up logging, and both are as they were
    assert torch.equal(torch.get_rng_state(), rng) and logging.getLogger().handlers == handlers
    metrics = _check_run(out, RETRIEVAL_METRICS)
    assert result.final == metrics["final"] and result.final["epoch"] == "best"
    assert {"train_loss", "val_agg_metrics"} <= set(metrics["epochs"][0])
    assert result.parameter_report["groups"]["factors"] > 0


@pytest.mark.slow
def test_vqa_recipe_end_to_end(tmp_path):
    written = write_vqa_dataset(tmp_path / "data", n_train=8, n_val=4, n_test=4, image_size=IMAGE_SIZE,
                                questions_per_image=2)
    out = tmp_path / "run"
    options = dataset_options(written, image_size=IMAGE_SIZE) + tiny_options(out, arch="blip_vqa")
    result = train(RECIPES / "vqav2.yaml", options)
    metrics = _check_run(out, {"test_agg_metrics", "test_other"})
    assert 0.0 <= result.main_metric <= 100.0 and "val_agg_metrics" in metrics["epochs"][0]
    answers = json.loads((out / "result" / "test_vqa_result.json").read_text())
    assert len(answers) == 8  # 4 test images x 2 questions, ranked over the answer list


@pytest.mark.slow
def test_cli_and_recipes_train_py_are_the_same_entry(tmp_path):
    """``recipes/train.py`` (what torchrun launches) and ``aurora-pet train`` run the same code."""
    written = retrieval_data(tmp_path / "data")
    out = tmp_path / "run"
    options = dataset_options(written, image_size=IMAGE_SIZE) + tiny_options(out)
    command = [sys.executable, str(RECIPES / "train.py"), "--cfg-path", str(RECIPES / "retrieval_flickr30k.yaml"),
               "--options", *options]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "total trainable" in done.stdout and f"weights: {out / 'adapter'}" in done.stdout
    # a second start over the same output directory is refused (nothing is overwritten)
    again = subprocess.run([sys.executable, "-m", "aurora_pet.cli", "train", *command[2:]], capture_output=True,
                           text=True, timeout=600, cwd=tmp_path)
    assert again.returncode == 2 and "pass --resume" in again.stderr
