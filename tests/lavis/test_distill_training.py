"""Distillation in the LAVIS training path (a recipe's `distill:` section): the training step through the real
forward passes of tiny BLIP models, the stages, and whole recipes run by `aurora_pet.training.train`."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch

from aurora_pet.data import write_vqa_dataset
from aurora_pet.distill import DistillConfig
from aurora_pet.families.lavis.build import build_blip
from aurora_pet.families.lavis.distill import DistillBlipRetrieval, Distiller, retrieval_responses
from aurora_pet.families.lavis.wrap import wrap_blip
from aurora_pet.training import RecipeError, dataset_options, load_recipe, train

from .test_recipes import IMAGE_SIZE, RECIPES, retrieval_data, tiny_options

HEADS = ["itm_head", "vision_proj", "text_proj"]


def tiny(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model_type = "flickr" if arch == "blip_retrieval" else "vqav2"
    return build_blip(arch, model_type, size="tiny", image_size=IMAGE_SIZE, **overrides)


def retrieval_batch(batch: int = 4) -> dict:
    torch.manual_seed(1)
    return {"image": torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE), "image_id": torch.arange(batch),
            "text_input": ["a red square", "a blue circle on grey", "two green lines", "a dark dot"][:batch],
            "epoch": 0, "iters": 0, "num_iters_per_epoch": 10}


def vqa_batch() -> dict:
    torch.manual_seed(1)
    return {"image": torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE), "text_input": ["what color is it", "how many dots"],
            "answer": ["red", "dark red", "two"], "weight": torch.tensor([0.5, 0.5, 1.0]),
            "n_answers": torch.tensor([2, 1]), "epoch": 0, "iters": 0, "num_iters_per_epoch": 10}


def student_of(base: torch.nn.Module, arch: str):
    """(the wrapped student, its LAVIS model): an Aurora adapter (ICE/GQT on) over a copy of `base`."""
    lavis = copy.deepcopy(base)
    if arch == "blip_retrieval":
        lavis = DistillBlipRetrieval.from_model(lavis)
    heads = HEADS if arch == "blip_retrieval" else []
    return wrap_blip(lavis, "reference", rank=8, modules_to_save=heads), lavis


def distiller(student, lavis, teacher, max_epoch: int = 1, **settings) -> Distiller:
    config = DistillConfig(**settings)
    return Distiller(config, teacher, lavis, list(student.heads.values()), student, max_epoch)


# -- the training step -----------------------------------------------------------------------------

@pytest.fixture
def one_process_group(tmp_path):
    """A one-process gloo group, as `train` sets up: `negative_all_rank` gathers over it."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("all_ranks", [False, True])
def test_distill_forward_is_lavis_loss(all_ranks, one_process_group):
    """The student's forward computes LAVIS's own ITC + ITM (same RNG stream, same hard negatives), and an
    identical teacher answers the same on the pairs it drew."""
    base = tiny("blip_retrieval", negative_all_rank=all_ranks)
    lavis_model, ours = copy.deepcopy(base), DistillBlipRetrieval.from_model(copy.deepcopy(base))
    torch.manual_seed(5)
    expected = lavis_model(retrieval_batch())
    torch.manual_seed(5)
    got = ours(retrieval_batch())
    torch.testing.assert_close(got.loss_itc, expected.loss_itc)
    torch.testing.assert_close(got.loss_itm, expected.loss_itm)
    torch.testing.assert_close(got.itm_logits, expected.intermediate_output.itm_logits)
    assert torch.equal(lavis_model.image_queue, ours.image_queue)  # the queues advanced alike
    assert got.pair_texts.shape == got.pair_images.shape == (12,) and got.tokens.shape[:2] == got.token_mask.shape
    with torch.no_grad():  # without dropout, the same weights answer the same on the drawn pairs
        got = ours.eval()(retrieval_batch())
        theirs = retrieval_responses(base.eval(), retrieval_batch()["image"], got.text_ids, got.text_mask,
                                     got.pair_texts, got.pair_images, all_ranks=all_ranks)
    torch.testing.assert_close(theirs.itm_logits, got.itm_logits.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs.similarity, got.similarity.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["blip_retrieval", "blip_vqa"])
def test_identical_teacher_gives_zero_response_distillation(arch):
    base = tiny(arch)
    student, lavis = student_of(base, arch)
    student.eval()  # no dropout: the student computes exactly the teacher's function (a fresh adapter is 0)
    step = distiller(student, lavis, copy.deepcopy(base))
    step.start_epoch(0)
    samples = retrieval_batch() if arch == "blip_retrieval" else vqa_batch()
    loss = step.train_step(student, samples)
    stats = step.epoch_stats()
    parts = ["itc", "itm", "relation"] if arch == "blip_retrieval" else ["answer", "relation"]
    for part in parts:
        assert abs(stats[f"loss_{part}"]) < 1e-5, (part, stats)
    assert stats["stage"] == "distill" and stats["loss_task"] > 0
    torch.testing.assert_close(loss.detach(), torch.tensor(stats["loss_task"] + stats["loss_distill"]))


@pytest.mark.parametrize("arch", ["blip_retrieval", "blip_vqa"])
def test_gradients_reach_only_the_student(arch):
    base = tiny(arch)
    student, lavis = student_of(base, arch)
    teacher = tiny(arch, seed=1)  # another model: every term is > 0
    step = distiller(student, lavis, teacher, stages=["align"] if arch == "blip_retrieval" else ["distill"])
    step.start_epoch(0)
    loss = step.train_step(student, retrieval_batch() if arch == "blip_retrieval" else vqa_batch())
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is None for p in base.parameters())
    trained = [p for p in student.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for p in trained)
    if arch == "blip_retrieval":  # align: the heads alone train, and the distillation terms reach every one
        assert {id(p) for p in trained} == {id(p) for head in student.heads.values() for p in head.parameters()}


def test_align_stage_freezes_the_adapter_and_moves_the_heads():
    base = tiny("blip_retrieval")
    student, lavis = student_of(base, "blip_retrieval")
    step = distiller(student, lavis, tiny("blip_retrieval", seed=1), max_epoch=3, stages=[1, 1, 1])
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.05)
    adapter = [p for p in step.adapter_parameters]
    heads = [p for head in student.heads.values() for p in head.parameters()]
    assert adapter and heads
    before_adapter, before_heads = [p.detach().clone() for p in adapter], [p.detach().clone() for p in heads]
    assert [step.stage_of(e).name for e in range(4)] == ["align", "supervised", "distill", "distill"]
    step.start_epoch(0)
    for _ in range(2):
        step.train_step(student, retrieval_batch()).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(adapter, before_adapter))  # weight decay included
    assert any(not torch.equal(a, b) for a, b in zip(heads, before_heads))
    assert set(step.epoch_stats()) == {"stage", "loss_itc", "loss_itm", "loss_relation", "loss_distill"}
    step.start_epoch(2)  # a resumed run enters the stage of its epoch number: the adapter trains again
    assert step.stage.name == "distill" and all(p.requires_grad for p in adapter)
    step.train_step(student, retrieval_batch()).backward()
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(adapter, before_adapter))


# -- recipes ---------------------------------------------------------------------------------------

def teacher_file(path: Path, arch: str = "blip_retrieval", **overrides) -> Path:
    """A tiny 'fine-tuned' teacher checkpoint (LAVIS's .pth layout) matching the tiny recipes' settings."""
    settings = {"queue_size": 16} if arch == "blip_retrieval" else {}
    model = tiny(arch, seed=3, **{**settings, **overrides})
    torch.save({"model": model.state_dict()}, path)
    return path


DISTILL_RECIPE = RECIPES / "retrieval_flickr30k_distill.yaml"


def test_distill_recipe_is_the_flickr_recipe_plus_a_teacher():
    recipe, plain = load_recipe(DISTILL_RECIPE, _no_teacher_check()), load_recipe(RECIPES / "retrieval_flickr30k.yaml")
    assert recipe.aurora == plain.aurora and recipe.model_settings == plain.model_settings
    assert recipe.raw["datasets"] == plain.raw["datasets"]
    assert {k: v for k, v in recipe.raw["run"].items() if k != "output_dir"} \
        == {k: v for k, v in plain.raw["run"].items() if k != "output_dir"}
    assert recipe.distill.stages == [1, 1, 2] and recipe.teacher_model == {}
    assert [s.name for s in recipe.distill.schedule(4)] == ["align", "supervised", "distill", "distill"]


def _no_teacher_check() -> list[str]:
    """Options that point the example recipe's teacher at a file that exists (the shipped path is a placeholder)."""
    return [f"distill.teacher={Path(__file__)}"]


@pytest.mark.parametrize("option, message", [
    ("distill.techer=x.pth", "unknown key 'distill.techer' (did you mean 'teacher'?)"),
    ("distill.itc_weight=-1", "distill.itc_weight must be a finite number ≥ 0"),
    ("distill.stages=[alignn]", "did you mean 'align'?"),
    ("distill.stages=[1,1,5]", "takes 7 epochs but the run has max_epoch=4"),
    ("distill.teacher_model.vision_widht=96", "unknown key 'distill.teacher_model.vision_widht'"),
    ("distil.teacher=x", "unknown key 'distil' (did you mean 'distill'?)"),
])
def test_bad_distill_settings_are_named(option, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_recipe(DISTILL_RECIPE, _no_teacher_check() + [option])


def test_missing_teacher_file_and_headless_align_are_named(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(RecipeError, match=re.escape(f"distill.teacher={missing}: checkpoint not found")) as error:
        load_recipe(DISTILL_RECIPE, [f"distill.teacher={missing}"])
    assert str(DISTILL_RECIPE) in str(error.value)
    with pytest.raises(RecipeError, match="aurora.modules_to_save is empty"):
        load_recipe(RECIPES / "vqav2.yaml", [f"distill.teacher={Path(__file__)}", "distill.stages=[align,distill]"])
    assert load_recipe(DISTILL_RECIPE, ["distill=null"]).distill is None  # an option turns it off


def _retrieval_options(tmp_path: Path, teacher: Path, epochs: int = 2) -> list[str]:
    written = retrieval_data(tmp_path / "data")
    return (dataset_options(written, image_size=IMAGE_SIZE) + tiny_options(tmp_path / "run", epochs=epochs)
            + [f"distill.teacher={teacher}", "run.valid_splits=[val]"])


@pytest.mark.parametrize("arch, overrides, message", [
    ("blip_vqa", {}, "it holds a blip_vqa model; the recipe trains blip_retrieval"),
    ("blip_retrieval", {"hidden_size": 96, "intermediate_size": 192}, "shape-mismatched key(s)"),
])
def test_wrong_teacher_is_named_before_training(tmp_path, arch, overrides, message):
    teacher = teacher_file(tmp_path / "teacher.pth", arch, **overrides)
    with pytest.raises(RecipeError, match=re.escape(message)) as error:
        train(DISTILL_RECIPE, _retrieval_options(tmp_path, teacher) + ["distill.stages=[distill]"], quiet=True)
    assert f"distill.teacher={teacher}" in str(error.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_retrieval_recipe_with_distill_end_to_end(tmp_path):
    """align (heads only) then distil, through LAVIS's runner; a wider teacher given by teacher_model (~20 s)."""
    teacher = teacher_file(tmp_path / "teacher.pth", hidden_size=96, intermediate_size=192)
    options = _retrieval_options(tmp_path, teacher) + [
        "distill.stages=[1,0,1]", "distill.teacher_model.hidden_size=96", "distill.teacher_model.intermediate_size=192"]
    result = train(DISTILL_RECIPE, options, quiet=True)
    out = tmp_path / "run"
    rows = json.loads((out / "metrics.json").read_text())["epochs"]
    assert [row["train_stage"] for row in rows] == ["align", "distill"]
    assert {"train_loss_itc", "train_loss_itm", "train_loss_relation", "train_loss_distill"} <= set(rows[0])
    assert "train_loss_task" not in rows[0] and rows[1]["train_loss_task"] > 0
    assert rows[0]["train_loss_itc"] > 0 and "train_stage" in (out / "metrics.csv").read_text()
    assert result.final["test_agg_metrics"] >= 0
    from safetensors.torch import load_file

    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert not any("teacher" in key for key in saved) and any(key.startswith("factors.") for key in saved)
    assert result.parameter_report["groups"]["factors"] > 0
    assert type(result.model.base_model).__name__ == "DistillBlipRetrieval"


def test_vqa_recipe_with_distill_end_to_end(tmp_path):
    written = write_vqa_dataset(tmp_path / "data", n_train=8, n_val=4, n_test=4, image_size=IMAGE_SIZE,
                                questions_per_image=2)
    teacher = teacher_file(tmp_path / "teacher.pth", "blip_vqa")
    options = dataset_options(written, image_size=IMAGE_SIZE) + tiny_options(tmp_path / "run", arch="blip_vqa") + [
        f"distill.teacher={teacher}", "distill.relation_weight=0.5"]
    result = train(RECIPES / "vqav2.yaml", options, quiet=True)
    row = json.loads((tmp_path / "run" / "metrics.json").read_text())["epochs"][0]
    assert row["train_stage"] == "distill" and row["train_loss_answer"] > 0 and row["train_loss_relation"] > 0
    assert row["train_loss_task"] > 0 and 0.0 <= result.main_metric <= 100.0
