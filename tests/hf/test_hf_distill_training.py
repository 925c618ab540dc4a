"""Distillation in the transformers family's training path (`distill:` in an hf recipe): the step's loss through
the real forward passes (`hf_loop.DistilledLoss`), the stages (align trains the heads only), the recipes end to
end through `hf_train.train` with a teacher saved as users save one, bad input named, and resume."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aurora_pet import AuroraConfig, get_aurora_model
from aurora_pet.data import write_retrieval_dataset, write_vqa_dataset
from aurora_pet.distill import STAGES, DistillConfig
from aurora_pet.families.hf.build import blip_processor, blip_tokenizer, build_blip
from aurora_pet.families.hf.distill import vqa_distillation, vqa_responses
from aurora_pet.families.hf.retrieval import BlipRetrievalLoss
from aurora_pet.training import hf_loop
from aurora_pet.training.data import dataset_options
from aurora_pet.training.hf_data import Collate
from aurora_pet.training.hf_loop import DistilledLoss, VQALoss
from aurora_pet.training.hf_recipe import load_hf_recipe
from aurora_pet.training.hf_train import train
from aurora_pet.training.recipe import RecipeError
from aurora_pet.training.run_state import ResumeError

from .conftest import pixels

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
RETRIEVAL = RECIPES / "hf_retrieval_flickr30k_distill.yaml"
VQA = RECIPES / "hf_vqav2.yaml"
IMAGE_SIZE = 32
CAPTIONS = ["a red circle", "two blue squares", "a green star above a square", "a yellow triangle and a star"]
QUESTIONS = ["what color?", "how many squares?", "where is the star?", "is there a triangle on the left?"]
ANSWERS = ["red", "two", "above the square", "yes"]


def wider(task: str) -> torch.nn.Module:
    """A teacher 1.5x as wide as the tiny student, text and vision (BLIP's VQA decoder reads the question
    encoder with the vision width, so both grow together)."""
    return build_blip(task, "tiny", seed=1, text_hidden_size=96, text_intermediate_size=192, vision_hidden_size=96,
                      vision_intermediate_size=192)


def save(model: torch.nn.Module, directory: Path, processor=None) -> Path:
    model.save_pretrained(directory)
    (processor or blip_processor(IMAGE_SIZE)).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Students and teachers saved with their processors: the retrieval teacher another random BLIP of the same
    shape, the VQA teacher a wider one (the terms are width-free)."""
    root = tmp_path_factory.mktemp("models")
    save(build_blip("retrieval", "tiny"), root / "retrieval")
    save(build_blip("retrieval", "tiny", seed=1), root / "retrieval_teacher")
    save(build_blip("vqa", "tiny"), root / "vqa")
    save(wider("vqa"), root / "vqa_teacher")
    return root


@pytest.fixture(scope="module")
def flickr(tmp_path_factory):
    return write_retrieval_dataset(tmp_path_factory.mktemp("flickr"), style="flickr30k", image_size=IMAGE_SIZE,
                                   n_train=8, n_val=4, n_test=4)


def options(written: dict, models: Path, out: Path, *, epochs: int, stages: str, teacher: str | None = None,
            **run) -> list[str]:
    """A seconds-long CPU run of a real recipe with a `distill:` section: tiny models, generated data."""
    task = "vqa" if written["builder"] == "coco_vqa" else "retrieval"
    settings = {"device": "cpu", "max_epoch": epochs, "batch_size_train": 4, "batch_size_eval": 8, "num_workers": 0,
                "output_dir": out, "init_lr": 1e-2, "progress": False, "plot": False,
                **({"k_test": 4} if task == "retrieval" else {"num_ans_candidates": 8}), **run}
    return [*dataset_options(written, image_size=IMAGE_SIZE), f"model.pretrained={models / task}", "aurora.rank=8",
            "aurora.dropout=0.0", f"distill.teacher={models / (teacher or f'{task}_teacher')}",
            f"distill.stages={stages}", *(f"run.{k}={v}" for k, v in settings.items())]


def adapter(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter_model.safetensors"))


def wrap(model: torch.nn.Module, preset: str) -> torch.nn.Module:
    return get_aurora_model(model, AuroraConfig.from_preset(preset, rank=4, dropout=0.0))


# -- one training step through the real forward passes ------------------------------------------------

def retrieval_batch(tokenizer) -> dict[str, torch.Tensor]:
    text = tokenizer(CAPTIONS, padding="longest", return_tensors="pt")
    return {"input_ids": text.input_ids, "attention_mask": text.attention_mask,
            "pixel_values": pixels(len(CAPTIONS), IMAGE_SIZE), "image_ids": torch.arange(len(CAPTIONS))}


def vqa_batch(tokenizer, model) -> dict[str, torch.Tensor]:
    collate = Collate(tokenizer, 35, "vqa", bos_token_id=model.config.text_config.bos_token_id,
                      enc_token_id=tokenizer.convert_tokens_to_ids("[ENC]"))
    images = pixels(len(QUESTIONS), IMAGE_SIZE)
    return collate([{"pixel_values": image, "text": q, "answer": a}
                    for image, q, a in zip(images, QUESTIONS, ANSWERS)])


def objective(task: str, student: torch.nn.Module, teacher: torch.nn.Module, stage: str = "distill",
              **config) -> DistilledLoss:
    criterion = BlipRetrievalLoss(student) if task == "retrieval" else VQALoss(student)
    loss = DistilledLoss(criterion, teacher, DistillConfig(**config), task)
    loss.stage = STAGES[stage]
    return loss.train()


@pytest.mark.parametrize("task", ["retrieval", "vqa"])
def test_a_teacher_identical_to_the_student_gives_zero_terms_in_a_training_step(task):
    """An adapter at its start (ΔW = 0, fusion off) is its base model: every distillation term is 0 while the
    task loss is the plain model's, and the step's loss is task + the (zero) terms."""
    tokenizer = blip_tokenizer()
    base = build_blip(task, "tiny")
    student = wrap(copy.deepcopy(base), f"hf_blip_{task}/cross-attention")
    batch = retrieval_batch(tokenizer) if task == "retrieval" else vqa_batch(tokenizer, base)
    torch.manual_seed(0)
    out = objective(task, student, base.eval())(**batch)
    terms = ("itc", "itm", "relation") if task == "retrieval" else ("answer", "relation")
    assert set(out.parts) == {"task", *terms, "distill", "loss"}
    for term in terms:
        assert abs(out.parts[term]) < 1e-6, (term, out.parts)
    if task == "vqa":
        with torch.no_grad():
            assert out.parts["task"] == pytest.approx(base(**batch).loss.item(), rel=1e-6)
    assert out.loss.item() == pytest.approx(out.parts["task"] + out.parts["distill"], rel=1e-6)


@pytest.mark.parametrize("task", ["retrieval", "vqa"])
def test_gradients_reach_the_student_only(task):
    tokenizer = blip_tokenizer()
    teacher = wider(task).eval()
    teacher.requires_grad_(True)  # not even an unfrozen teacher gets a gradient
    student = wrap(build_blip(task, "tiny"), f"hf_blip_{task}/cross-attention")
    with torch.no_grad():  # a trained adapter's stand-in: every factor non-zero
        for parameter in student.aurora_factors.parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(3)))
    batch = retrieval_batch(tokenizer) if task == "retrieval" else vqa_batch(tokenizer, student)
    loss = objective(task, student, teacher)
    out = loss(**batch)
    out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.aurora_factors.parameters())
    if task == "retrieval":
        assert loss.criterion.temp.grad is not None and loss.criterion.temp.grad != 0
    # what an optimizer over the loss sees: the task loss's tensors, in its order; never the teacher's
    assert [id(p) for p in loss.parameters()] == [id(p) for p in loss.criterion.parameters()]


def test_vqa_distillation_is_token_kl_on_the_answer_and_relation_on_the_question(tokenizer):
    """`vqa_distillation`'s terms equal the core losses on `vqa_responses`, and its answer term is the KL at
    exactly the positions the model's own loss scores."""
    from aurora_pet.distill import relation_distillation, token_distillation

    student, teacher = build_blip("vqa", "tiny"), build_blip("vqa", "tiny", seed=1)
    batch = vqa_batch(tokenizer, student)
    with torch.no_grad():
        parts = vqa_distillation(student, teacher, DistillConfig(temperature=2.0), **batch)
        mine, theirs = vqa_responses(student, **batch), vqa_responses(teacher, **batch)
        assert mine.loss.item() == pytest.approx(student(**batch).loss.item(), rel=1e-6)
    assert mine.answer_mask.sum() == (batch["labels"][:, 1:] != -100).sum()
    torch.testing.assert_close(parts["answer"], token_distillation(mine.logits, theirs.logits, mine.answer_mask, 2.0))
    torch.testing.assert_close(parts["relation"], relation_distillation(mine.tokens, theirs.tokens,
                                                                        batch["attention_mask"]))
    assert parts["answer"] > 0 and parts["relation"] > 0


# -- the recipes end to end -----------------------------------------------------------------------------

def rows(out: Path) -> list[dict]:
    return json.loads((out / "metrics.json").read_text())["epochs"]


@pytest.fixture(scope="module")
def retrieval_run(flickr, models, tmp_path_factory):
    out = tmp_path_factory.mktemp("distill_run") / "run"
    result = train(RETRIEVAL, options(flickr, models, out, epochs=3, stages="[1,1,1]"), quiet=True)
    return out, result


def test_retrieval_recipe_with_distill_end_to_end(retrieval_run, models):
    out, result = retrieval_run
    epochs = rows(out)
    assert [row["train_stage"] for row in epochs] == ["align", "supervised", "distill"]
    assert {"train_itc", "train_itm", "train_relation", "train_distill"} <= set(epochs[0]) and \
        "train_task" not in epochs[0]
    assert "train_task" in epochs[1] and "train_itc" not in epochs[1]
    assert {"train_task", "train_itc", "train_itm", "train_relation", "train_distill"} <= set(epochs[2])
    assert epochs[2]["train_loss"] == pytest.approx(epochs[2]["train_task"] + epochs[2]["train_distill"], rel=1e-5)
    assert all(row["train_itc"] > 0 for row in (epochs[0], epochs[2]))  # another teacher: not zero
    assert "train_stage" in (out / "metrics.csv").read_text().splitlines()[0]
    assert {"test_txt_r1", "test_agg_metrics"} <= set(result.final)
    assert load_hf_recipe(out / "recipe.yaml").fingerprint()["distill"]["stages"] == [1, 1, 1]
    teacher_size = sum(p.numel() for p in build_blip("retrieval", "tiny").parameters())
    for checkpoint in ("epoch_0", "epoch_2"):  # the teacher is never saved: an adapter-sized checkpoint
        files = sorted((out / "checkpoints" / checkpoint).iterdir())
        assert sum(f.stat().st_size for f in files) < 4 * teacher_size
        assert all(not k.startswith(("teacher", "model.")) for k in adapter(out / "checkpoints" / checkpoint))


def test_evaluating_a_distilled_adapter_needs_no_teacher(retrieval_run, flickr, models, tmp_path):
    out, result = retrieval_run
    again = train(RETRIEVAL, options(flickr, models, tmp_path / "eval", epochs=3, stages="[1,1,1]", evaluate=True,
                                     teacher="no-such-teacher") + [f"aurora.adapter={out / 'adapter'}"], quiet=True)
    assert {k: v for k, v in again.final.items() if k.startswith("test_")} == \
        {k: v for k, v in result.final.items() if k.startswith("test_")}


def test_align_trains_the_heads_and_leaves_the_adapter_unchanged(retrieval_run, models):
    """Epoch 0 (align): the factors and ICE/GQT are the adapter's initial values bit for bit (no optimizer step,
    no weight decay) while the heads moved; the next epochs train the adapter."""
    from transformers import BlipForImageTextRetrieval

    out, _ = retrieval_run
    recipe = load_hf_recipe(out / "recipe.yaml")
    start = get_aurora_model(BlipForImageTextRetrieval.from_pretrained(models / "retrieval"),
                             recipe.aurora).adapter_state_dict()
    aligned, supervised = adapter(out / "checkpoints" / "epoch_0"), adapter(out / "checkpoints" / "epoch_1")
    heads = [key for key in start if key.startswith("heads.")]
    rest = [key for key in start if not key.startswith("heads.")]
    assert heads and any(key.startswith("factors.") for key in rest) and any(key.startswith("fusion.") for key in rest)
    for key in rest:
        assert torch.equal(aligned[key], start[key]), f"align changed the adapter's {key}"
    assert all(not torch.equal(aligned[key], start[key]) for key in heads)
    assert any(not torch.equal(supervised[key], start[key]) for key in rest if key.startswith("factors."))
    state = torch.load(out / "checkpoints" / "epoch_0" / "training_state.pt", weights_only=False)
    stepped = [len(s) for s in state["optimizer"]["state"].values()]
    n_trainable = len(heads) + 1  # the heads' tensors and the loss's temperature: the adapter has no Adam state
    assert len(stepped) == n_trainable, (len(stepped), n_trainable)


def test_vqa_recipe_with_distill_and_a_wider_teacher_end_to_end(tmp_path, models):
    written = write_vqa_dataset(tmp_path / "data", n_train=8, n_val=4, n_test=4, image_size=IMAGE_SIZE,
                                questions_per_image=2)
    out = tmp_path / "run"
    result = train(VQA, options(written, models, out, epochs=2, stages="[supervised,distill]",
                                valid_splits="[val]", max_len=4), quiet=True)
    epochs = rows(out)
    assert [row["train_stage"] for row in epochs] == ["supervised", "distill"]
    assert {"train_task", "train_answer", "train_relation", "train_distill"} <= set(epochs[1])
    assert epochs[1]["train_answer"] > 0 and "train_itc" not in epochs[1]
    assert 0.0 <= result.final["test_agg_metrics"] <= 100.0


def test_kill_after_a_checkpoint_resumes_in_the_same_stage(flickr, models, tmp_path, monkeypatch, capsys):
    """A run stopped right after epoch 1's checkpoint (trained, not yet evaluated) is resumed: epoch 1 is
    evaluated, epoch 2 trains in its stage, and the run ends where the uninterrupted one does, bit for bit."""
    def run_options(out: Path) -> list[str]:
        return options(flickr, models, out, epochs=3, stages="[align,distill]", valid_splits="[val]")

    full, killed = tmp_path / "full", tmp_path / "killed"
    train(RETRIEVAL, run_options(full), quiet=True)

    class Killed(Exception):
        pass

    save_epoch = hf_loop.HFRunner._save_epoch

    def save_then_die(runner, epoch, record):
        save_epoch(runner, epoch, record)
        if epoch == 1:
            raise Killed

    monkeypatch.setattr(hf_loop.HFRunner, "_save_epoch", save_then_die)
    with pytest.raises(Killed):
        train(RETRIEVAL, run_options(killed), quiet=True)
    monkeypatch.undo()
    assert json.loads((killed / "checkpoints" / "latest.json").read_text())["epoch"] == 1
    resumed = train(RETRIEVAL, run_options(killed), resume=True, quiet=True)
    assert resumed.resumed_from == killed / "checkpoints" / "epoch_1"
    assert "trained, not evaluated" in capsys.readouterr().out
    assert [row["train_stage"] for row in rows(killed)] == ["align", "distill", "distill"]
    assert rows(killed) == rows(full)
    for name in ("epoch_2", "best"):
        expected, got = adapter(full / "checkpoints" / name), adapter(killed / "checkpoints" / name)
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected), name
    with pytest.raises(ResumeError, match=r"Differences: .*distill"):  # another scheme is another run
        train(RETRIEVAL, run_options(killed) + ["distill.stages=[distill]"], resume=True, quiet=True)


# -- bad input ------------------------------------------------------------------------------------------

def test_bad_distill_sections_are_named(flickr, models, tmp_path):
    out = tmp_path / "run"
    base = options(flickr, models, out, epochs=2, stages="[1,0,1]")
    nowhere = tmp_path / "no-such-teacher"
    cases = [
        (f"distill.teacher={nowhere}", re.escape(f"distill.teacher={nowhere}: directory not found")),
        ("distill.tacher=x", re.escape("unknown key 'distill.tacher' (did you mean 'teacher'?)")),
        (f"distill.teacher={models / 'vqa'}", "config.json is a BlipForQuestionAnswering, this recipe's task needs a "
                                              "BlipForImageTextRetrieval"),
        ("distill.stages=[1,2,3]", re.escape("distill.stages [1, 2, 3] takes 6 epochs but the run has max_epoch=2")),
        ("distill.stages=[align,supervsed]", re.escape("unknown stage 'supervsed' (did you mean 'supervised'?)")),
        ("distill.teacher=null", "distill.teacher is required"),
        ("distill.answer_weight=-1", re.escape("distill.answer_weight must be a finite number ≥ 0, got -1")),
    ]
    for option, message in cases:
        with pytest.raises(RecipeError, match=message):
            train(RETRIEVAL, base + [option], quiet=True)
        assert not out.exists(), option  # stopped before the output directory was made
    with pytest.raises(RecipeError, match=re.escape(f"{RETRIEVAL}: ") + ".*distill.itc_weight must be"):
        load_hf_recipe(RETRIEVAL, base + ["distill.itc_weight=inf"])
    with pytest.raises(RecipeError, match="every weight of run.task=retrieval's terms is 0"):
        train(RETRIEVAL, base + ["distill.itc_weight=0", "distill.itm_weight=0", "distill.relation_weight=0"],
              quiet=True)


def test_a_teacher_with_another_tokenizer_or_image_processing_is_refused(flickr, models, tmp_path):
    from aurora_pet.families.hf.build import VOCAB

    words = VOCAB.read_text().splitlines()
    words[200], words[201] = words[201], words[200]  # the same size, two tokens' ids swapped
    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("\n".join(words) + "\n")
    other = save(build_blip("retrieval", "tiny", seed=1), tmp_path / "other_vocab",
                 blip_processor(IMAGE_SIZE, vocab_file=vocab_file))
    base = options(flickr, models, tmp_path / "run", epochs=1, stages="[distill]")
    message = re.escape(f"distill.teacher={other}: the teacher must read the student's batches")
    message += ".*another vocabulary.*token id 200 is " + re.escape(repr(words[200]))
    with pytest.raises(RecipeError, match=message):
        train(RETRIEVAL, base + [f"distill.teacher={other}"], quiet=True)
    bigger = save(build_blip("retrieval", "tiny", seed=1, vision_image_size=64), tmp_path / "bigger_images",
                  blip_processor(64))
    with pytest.raises(RecipeError, match="it takes 64-pixel images, the student 32-pixel ones"):
        train(RETRIEVAL, base + [f"distill.teacher={bigger}"], quiet=True)


def test_align_needs_heads_to_train(tmp_path, models):
    """The VQA preset has no task heads: an align epoch would train nothing, so the run does not start."""
    written = write_vqa_dataset(tmp_path / "data", n_train=8, n_val=4, n_test=4, image_size=IMAGE_SIZE,
                                questions_per_image=2)
    with pytest.raises(RecipeError, match=re.escape("has align epochs, which train the task heads only, but the "
                                                    "adapter has no task heads (aurora.modules_to_save)")):
        train(VQA, options(written, models, tmp_path / "run", epochs=1, stages="[align]"), quiet=True)


# -- two processes (slow) -------------------------------------------------------------------------------

DRIVER = """
import os, sys
from safetensors.torch import save_file
from aurora_pet.training.hf_train import train
result = train(sys.argv[1], sys.argv[3:], quiet=True)
state = {k: v.contiguous() for k, v in result.model.adapter_state_dict().items()}
save_file(state, f"{sys.argv[2]}/rank{os.environ['RANK']}.safetensors")
"""


@pytest.mark.slow
@pytest.mark.parametrize("all_ranks", [False, True])
def test_two_process_distill_run_keeps_ranks_identical(tmp_path, flickr, models, all_ranks):
    """Under DDP (no find_unused_parameters): an align epoch (the task loss unused, the adapter's gradients
    dropped after the all-reduce) and a distill epoch, with hard negatives from this rank's batch or from every
    rank's (then the ITM terms take the positive pairs); both ranks end with the same adapter."""
    import os
    import subprocess
    import sys

    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / "run"
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc_per_node=2", str(driver), str(RETRIEVAL), str(tmp_path),
               *options(flickr, models, out, epochs=2, stages="[1,0,1]", valid_splits="[]", test_splits="[test]"),
               f"model.negative_all_rank={all_ranks}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    assert [row["train_stage"] for row in rows(out)] == ["align", "distill"]
    assert all(row["train_itm"] > 0 for row in rows(out))
