"""The transformers family's recipes end to end: a tiny BLIP saved with `save_pretrained` (what users point
`model.pretrained` at), generated Flickr30k / COCO / VQAv2 files, and the user's code path (`aurora-pet train`,
`hf_train.train`): published settings, metrics and checkpoints, kill and resume, two processes, evaluation
against brute force, and bad input named as the LAVIS recipes name it."""

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
import yaml
from PIL import Image
from safetensors.torch import load_file

from aurora_pet.cli import main as cli
from aurora_pet.data import write_retrieval_dataset, write_vqa_dataset
from aurora_pet.families.hf.build import blip_processor, build_blip
from aurora_pet.training.data import DataError, dataset_options
from aurora_pet.training.hf_recipe import load_hf_recipe
from aurora_pet.training.hf_train import train
from aurora_pet.training.recipe import RecipeError

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
IMAGE_SIZE = 32
LAVIS_TWIN = {"hf_retrieval_flickr30k": "retrieval_flickr30k", "hf_retrieval_coco": "retrieval_coco",
              "hf_vqav2": "vqav2"}
RETRIEVAL_METRICS = {f"test_{d}_r{k}" for d in ("txt", "img") for k in (1, 5, 10)} | {"test_agg_metrics"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny retrieval and a tiny VQA BLIP, each saved with its processor, as users save real checkpoints."""
    root = tmp_path_factory.mktemp("models")
    for task in ("retrieval", "vqa"):
        build_blip(task, "tiny").save_pretrained(root / task)
        blip_processor(IMAGE_SIZE).save_pretrained(root / task)
    return root


@pytest.fixture(scope="module")
def flickr(tmp_path_factory):
    return write_retrieval_dataset(tmp_path_factory.mktemp("flickr"), style="flickr30k", image_size=IMAGE_SIZE,
                                   n_train=8, n_val=4, n_test=4)


def retrieval_data(root: Path, style: str = "flickr30k") -> dict:
    return write_retrieval_dataset(root, style=style, image_size=IMAGE_SIZE, n_train=8, n_val=4, n_test=4)


def options(written: dict, models: Path, out: Path, *, epochs: int = 1, **run) -> list[str]:
    """What turns a real hf recipe into a seconds-long CPU run: the tiny model, generated data, short epochs."""
    task = "vqa" if written["builder"] == "coco_vqa" else "retrieval"
    settings = {"device": "cpu", "max_epoch": epochs, "batch_size_train": 4, "batch_size_eval": 8, "num_workers": 0,
                "output_dir": out, "init_lr": 1e-2, "progress": False,
                **({"k_test": 4} if task == "retrieval" else {"num_ans_candidates": 8}), **run}
    return [*dataset_options(written, image_size=IMAGE_SIZE), f"model.pretrained={models / task}", "aurora.rank=8",
            *(f"run.{k}={v}" for k, v in settings.items())]


def adapter(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter_model.safetensors"))


def assert_same_adapter(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs"


# -- the recipes as shipped ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(LAVIS_TWIN))
def test_hf_recipe_has_the_lavis_recipes_published_settings(name):
    hf = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    lavis = yaml.safe_load((RECIPES / f"{LAVIS_TWIN[name]}.yaml").read_text())
    assert hf["family"] == "hf" and "family" not in lavis
    shared = ("task", "lr_sched", "init_lr", "min_lr", "weight_decay", "max_epoch", "batch_size_train",
              "batch_size_eval", "train_splits", "valid_splits", "test_splits", "k_test", "max_len", "min_len",
              "num_beams", "num_ans_candidates", "inference_method", "seed", "evaluate", "device")
    assert {k: hf["run"].get(k) for k in shared} == {k: lavis["run"].get(k) for k in shared}
    assert hf["aurora"] == lavis["aurora"]
    (builder, data), = hf["datasets"].items()
    assert list(lavis["datasets"]) == [builder]
    for kind in ("vis_processor", "text_processor"):
        assert data[kind] == lavis["datasets"][builder][kind]
    recipe = load_hf_recipe(RECIPES / f"{name}.yaml")
    assert recipe.aurora.rank == 64 and recipe.aurora.target_modules == f"{recipe.arch}/cross-attention"
    assert recipe.model["enc_token"] == "[ENC]" and recipe.run_cfg.mixed_precision == "no"


@pytest.mark.parametrize("option, message", [
    ("run.init_lrr=1e-3", "unknown key 'run.init_lrr' (did you mean 'init_lr'?)"),
    ("aurora.rnak=8", "unknown key 'aurora.rnak' (did you mean 'rank'?)"),
    ("model.pretraind=x", "unknown key 'model.pretraind' (did you mean 'pretrained'?)"),
    ("datasets.flikr30k.data_type=images", "unknown dataset builder 'flikr30k' (did you mean 'flickr30k'?)"),
    ("datasets.flickr30k.vis_processor.eval.name=blip_image_evl", "did you mean 'blip_image_eval'?"),
    ("run.mixed_precision=fp32", "unknown value 'fp32'"),
    ("run.max_epoch=0", "run.max_epoch must be a positive integer"),
    ("family=hff", "unknown model family 'hff' (did you mean 'hf'?)"),
])
def test_typos_and_bad_values_are_named(option, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_hf_recipe(RECIPES / "hf_retrieval_flickr30k.yaml", [option])


# -- end to end ----------------------------------------------------------------------------------------

def check_run(out: Path, metric_keys: set[str], epochs: int) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    assert metric_keys <= set(metrics["final"]), metrics["final"]
    assert len(metrics["epochs"]) == epochs and "train_loss" in metrics["epochs"][0]
    assert (out / "metrics.png").stat().st_size > 0 and (out / "metrics.csv").is_file()
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["dir"] == f"epoch_{epochs - 1}"
    files = {p.name for p in (out / "checkpoints" / "epoch_0").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "training_state.pt", "checksums.json"} <= files
    weights = adapter(out / "adapter")
    assert any(k.startswith("factors.") for k in weights) and not any("vision_model" in k for k in weights)
    return metrics


@pytest.fixture(scope="module")
def flickr_run(flickr, models, tmp_path_factory):
    out = tmp_path_factory.mktemp("flickr_run") / "run"
    rng = torch.get_rng_state()
    result = train(RECIPES / "hf_retrieval_flickr30k.yaml", options(flickr, models, out, epochs=2,
                                                                   valid_splits="[val]"), quiet=True)
    assert torch.equal(torch.get_rng_state(), rng)  # a library call leaves the caller's RNG as it was
    return out, result


def test_flickr30k_recipe_end_to_end(flickr_run):
    out, result = flickr_run
    metrics = check_run(out, RETRIEVAL_METRICS, epochs=2)
    assert result.final == metrics["final"] and result.final["epoch"] == "best"
    assert "val_agg_metrics" in metrics["epochs"][1] and result.weights_dir == out / "adapter"
    assert result.parameter_report["groups"]["factors"] > 0
    loss = [row["train_loss"] for row in metrics["epochs"]]
    assert loss[1] < loss[0]


def test_retrieval_metrics_are_the_adapters_evaluated_by_hand(flickr_run, flickr, models):
    """The run's test metrics equal `evaluate_retrieval` of its exported adapter on a freshly loaded model,
    unmerged, with the split's images and captions prepared here by hand (LAVIS's processing)."""
    from transformers import BlipForImageTextRetrieval, BlipProcessor

    from aurora_pet import AuroraModel
    from aurora_pet.families.hf.retrieval_eval import evaluate_retrieval

    out, result = flickr_run
    model = AuroraModel.from_pretrained(BlipForImageTextRetrieval.from_pretrained(models / "retrieval"),
                                        out / "adapter").eval()
    processor = BlipProcessor.from_pretrained(models / "retrieval")
    entries = json.loads(Path(flickr["annotations"]["test"][0]).read_text())
    images = processor.image_processor([Image.open(Path(flickr["images"], e["image"])).convert("RGB")
                                        for e in entries], return_tensors="pt", resample=3).pixel_values
    captions = [re.sub(r"\s{2,}", " ", re.sub(r"([.!\"()*#:;~])", " ", c.lower())).strip()
                for e in entries for c in e["caption"]]
    text = processor.tokenizer(captions, padding="longest", return_tensors="pt")
    owner = [i for i, e in enumerate(entries) for _ in e["caption"]]
    expected = evaluate_retrieval(model, images, text.input_ids, text.attention_mask, owner, k_test=4,
                                  itm_token_id=processor.tokenizer.convert_tokens_to_ids("[ENC]"), progress=False)
    assert {f"test_{k}": v for k, v in expected.items()} == {k: v for k, v in result.final.items()
                                                             if k.startswith("test_")}


def test_a_saved_adapter_evaluates_to_the_runs_test_metrics(flickr_run, flickr, models, tmp_path):
    out, result = flickr_run
    again = train(RECIPES / "hf_retrieval_flickr30k.yaml",
                  options(flickr, models, tmp_path / "eval", evaluate=True) + [f"aurora.adapter={out / 'adapter'}"],
                  quiet=True)
    assert {k: v for k, v in again.final.items() if k.startswith("test_")} == \
        {k: v for k, v in result.final.items() if k.startswith("test_")}
    assert not (tmp_path / "eval" / "checkpoints").exists()  # evaluation writes no checkpoint


def test_learning_rate_follows_lavis_linear_warmup_cosine():
    from omegaconf import OmegaConf

    from aurora_pet.training.hf_loop import learning_rate

    run = OmegaConf.create({"init_lr": 1e-3, "min_lr": 1e-5, "warmup_lr": 1e-6, "warmup_steps": 4, "max_epoch": 4})
    assert [learning_rate(run, 0, step) for step in (0, 2, 4, 9)] == pytest.approx([1e-6, 5.005e-4, 1e-3, 1e-3])
    assert [learning_rate(run, epoch, 0) for epoch in (1, 2, 3)] == pytest.approx(
        [1e-5 + (1e-3 - 1e-5) * (1 + c) / 2 for c in (2 ** -0.5, 0.0, -(2 ** -0.5))])
    assert learning_rate(OmegaConf.merge(run, {"warmup_lr": -1}), 0, 0) == 1e-3  # LAVIS: no warmup


def test_momentum_distillation_weight_ramps_up_over_two_epochs_as_lavis(tmp_path, flickr, models, monkeypatch):
    """α_step = α · min(1, (epoch · n + step) / 2n) with n steps per epoch (LAVIS's `_rampup_factor`)."""
    from aurora_pet.families.hf.retrieval import BlipRetrievalLoss

    seen, forward = [], BlipRetrievalLoss.forward

    def recording(self, *args, alpha=None, **kwargs):
        seen.append(alpha)
        return forward(self, *args, alpha=alpha, **kwargs)

    monkeypatch.setattr(BlipRetrievalLoss, "forward", recording)
    train(RECIPES / "hf_retrieval_flickr30k.yaml",
          [*options(flickr, models, tmp_path / "run", epochs=3), "model.alpha=0.4"], quiet=True)
    n = len(seen) // 3
    assert n >= 1 and seen == pytest.approx([0.4 * min(1.0, i / (2 * n)) for i in range(3 * n)])


@pytest.mark.parametrize("inference", ["rank", "generate"])
def test_vqa_recipe_end_to_end(tmp_path, models, inference):
    written = write_vqa_dataset(tmp_path / "data", n_train=8, n_val=4, n_test=4, image_size=IMAGE_SIZE,
                                questions_per_image=2)
    out = tmp_path / "run"
    result = train(RECIPES / "hf_vqav2.yaml", options(written, models, out, valid_splits="[val]",
                                                      inference_method=inference, max_len=4), quiet=True)
    metrics = check_run(out, {"test_agg_metrics", "test_other"}, epochs=1)
    assert 0.0 <= result.final["test_agg_metrics"] <= 100.0 and "val_agg_metrics" in metrics["epochs"][0]
    answers = json.loads((out / "result" / "test_vqa_result.json").read_text())
    assert len(answers) == 8  # 4 test images x 2 questions
    if inference == "rank":
        assert {a["answer"] for a in answers} <= set(json.loads(Path(written["annotations"]["test"][1]).read_text()))


def test_cli_dispatches_on_the_family_and_refuses_to_start_over_a_run(tmp_path, models, capsys):
    written = retrieval_data(tmp_path / "data", style="coco")
    out = tmp_path / "run"
    command = ["train", "--cfg-path", str(RECIPES / "hf_retrieval_coco.yaml"), "--options",
               *options(written, models, out)]
    assert cli(command) == 0
    printed = capsys.readouterr().out
    assert "total trainable" in printed and f"weights: {out / 'adapter'}" in printed
    check_run(out, RETRIEVAL_METRICS, epochs=1)
    assert cli(command) == 2
    assert "pass --resume" in capsys.readouterr().err


# -- evaluation against brute force ---------------------------------------------------------------------

def test_answer_ranking_is_the_most_likely_answer_among_the_first_token_candidates(models):
    """`rank_answers` = argmax of Σ log p(answer tokens) over the k answers whose first token is most likely,
    each computed here through the model's own forward pass, one (question, answer) pair at a time."""
    from transformers import BlipForQuestionAnswering

    from aurora_pet import AuroraConfig, get_aurora_model
    from aurora_pet.training.hf_data import Collate
    from aurora_pet.training.hf_eval import rank_answers

    from .conftest import perturb, pixels

    model = get_aurora_model(BlipForQuestionAnswering.from_pretrained(models / "vqa"),
                             AuroraConfig.from_preset("cross-attention", rank=4)).eval()
    perturb(model)
    tokenizer = blip_processor(IMAGE_SIZE).tokenizer
    collate = Collate(tokenizer, 35, "vqa", bos_token_id=model.config.text_config.bos_token_id)
    answers = ["red", "blue", "two squares", "left", "a big green star", "no"]
    candidates = collate.answers(answers)
    questions = tokenizer(["what color is the circle?", "how many shapes are there?", "where is it?"],
                          padding="longest", return_tensors="pt")
    images = pixels(3, IMAGE_SIZE, seed=3)
    def log_likelihood(q: int, a: int, tokens: int | None = None) -> float:
        """log p(the first `tokens` tokens of answer a | question q, image q), from the model's own mean
        `labels` loss (no label smoothing) times the number of predicted tokens."""
        ids = candidates["decoder_input_ids"][a:a + 1, :int(candidates["decoder_attention_mask"][a].sum())]
        ids = ids[:, :1 + tokens] if tokens else ids
        with torch.no_grad():
            loss = model(input_ids=questions.input_ids[q:q + 1], attention_mask=questions.attention_mask[q:q + 1],
                         pixel_values=images[q:q + 1], labels=ids).loss
        return -loss.item() * (ids.shape[1] - 1)

    assert model.config.text_config.label_smoothing == 0.0
    for k in (len(answers), 3):
        best = rank_answers(model, images, questions.input_ids, questions.attention_mask,
                            candidates["decoder_input_ids"], candidates["decoder_attention_mask"], k)
        for q in range(3):
            first = [log_likelihood(q, a, tokens=1) for a in range(len(answers))]
            shortlist = sorted(range(len(answers)), key=lambda a: -first[a])[:k]
            assert best[q].item() == max(shortlist, key=lambda a: log_likelihood(q, a))


def test_vqa_accuracy_is_the_official_scripts(tmp_path):
    """Per-question and overall numbers of the official VQA evaluation (LAVIS's vqa_tools on the same files)."""
    from aurora_pet.training.hf_vqa_accuracy import vqa_accuracy

    cases = [  # (question id, answer type, ten human answers, prediction, the official accuracy)
        (1, "yes/no", ["yes"] * 10, "yes", 100.0),
        (2, "yes/no", ["yes"] * 7 + ["no"] * 3, "no", 90.0),
        (3, "number", ["2"] * 4 + ["two"] * 4 + ["3"] * 2, "two", 100.0),
        (4, "number", ["1,000"] * 5 + ["1000"] * 5, "1,000", 100.0),
        (5, "other", ["the red one"] * 2 + ["red"] * 8, "The red.", 100.0),
        (6, "other", ["dont know"] * 10, "don't know", 0.0),
        (7, "other", ["t-shirt"] * 5 + ["t shirt"] * 3 + ["shirt"] * 2, "t-shirt", 100.0),
        (8, "other", ["isnt"] * 10, "isnt", 0.0),
        (9, "other", ["a dog"] + ["dog"] * 9, "a dog", 100.0),
        (10, "other", ["left"] * 10, "right", 0.0),
    ]

    def files(subset):
        questions, annotations = tmp_path / "q.json", tmp_path / "a.json"
        questions.write_text(json.dumps({"questions": [{"question_id": q, "image_id": q, "question": "?"}
                                                       for q, *_ in subset]}))
        annotations.write_text(json.dumps({"annotations": [
            {"question_id": q, "image_id": q, "question_type": "what", "answer_type": t,
             "answers": [{"answer": x, "answer_confidence": "yes", "answer_id": j + 1} for j, x in enumerate(a)]}
            for q, t, a, *_ in subset]}))
        return [{"question_id": q, "answer": p} for q, _, _, p, _ in subset], questions, annotations

    for case in cases:
        assert vqa_accuracy(*files([case]))["agg_metrics"] == case[-1], case
    assert vqa_accuracy(*files(cases)) == {"agg_metrics": 69.0, "yes/no": 95.0, "number": 100.0, "other": 50.0}
    results, questions, annotations = files(cases)
    with pytest.raises(DataError, match="the results answer 9 questions"):
        vqa_accuracy(results[1:], questions, annotations)


# -- bad input: the LAVIS recipes' errors, nothing written ----------------------------------------------

@pytest.fixture
def damaged(tmp_path, models):
    """Fresh generated data to damage, and a run over it (returns written, out, run)."""
    written = retrieval_data(tmp_path / "data")
    out = tmp_path / "run"

    def run(*extra: str) -> None:
        train(RECIPES / "hf_retrieval_flickr30k.yaml", [*options(written, models, out), *extra], quiet=True)

    return written, out, run


def test_missing_and_malformed_annotation_files_are_named(damaged):
    written, out, run = damaged
    ann = Path(written["annotations"]["train"][0])
    original = ann.read_text()
    entries = json.loads(original)
    del entries[7]["caption"]
    ann.write_text("[\n" + ",\n".join(json.dumps(e) for e in entries) + "\n]\n")  # one entry per line
    with pytest.raises(DataError, match=re.escape(f"{ann}:9: malformed annotation (entry 7): missing key 'caption'")):
        run()
    ann.write_text(ann.read_text().replace('"image_id"', '"image_id":', 1))  # broken JSON
    with pytest.raises(DataError, match=re.escape(f"{ann}:2:") + ".*malformed annotation file"):
        run()
    ann.write_text(original)
    val = Path(written["annotations"]["val"][0])
    val.unlink()
    with pytest.raises(DataError, match=re.escape(f"annotation file not found: {val}")):
        run()
    assert not (out / "checkpoints").exists()


def test_missing_and_unreadable_images_are_named(damaged):
    written, out, run = damaged
    images = Path(written["images"], "flickr30k-images")
    cut, missing = images / "100013.jpg", images / "100001.jpg"
    cut.write_bytes(cut.read_bytes()[:100])
    with pytest.raises(DataError, match=r"^1 of 16 images cannot be read:\n  " + re.escape(str(cut))):
        run()
    missing.unlink()
    with pytest.raises(DataError, match=re.escape(str(missing))):
        run()
    assert not (out / "checkpoints").exists()


def test_missing_or_wrong_model_directory_is_named(damaged, models, tmp_path, capsys):
    written, out, run = damaged
    nowhere = tmp_path / "no-such-model"
    with pytest.raises(RecipeError, match=re.escape(f"model.pretrained={nowhere}: directory not found")):
        run(f"model.pretrained={nowhere}")
    with pytest.raises(RecipeError, match=f"config.json is a BlipForQuestionAnswering, this recipe's task needs a "
                                          "BlipForImageTextRetrieval"):
        run(f"model.pretrained={models / 'vqa'}")
    command = ["train", "--cfg-path", str(RECIPES / "hf_retrieval_flickr30k.yaml"), "--options",
               *options(written, models, out), f"model.pretrained={nowhere}"]
    assert cli(command) == 2
    assert f"aurora-pet train: error: model.pretrained={nowhere}: directory not found" in capsys.readouterr().err
    assert not (out / "checkpoints").exists()


def test_missing_hf_extra_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "accelerate.utils", None)  # as if accelerate were not installed
    assert cli(["train", "--cfg-path", str(RECIPES / "hf_vqav2.yaml")]) == 2
    err = capsys.readouterr().err
    assert "recipes of the hf family need the hf extra, and the module 'accelerate.utils' is not installed: " \
           "pip install 'aurora-pet[hf]'" in err


# -- kill and resume, two processes (slow) -------------------------------------------------------------

def subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}  # one thread, as this process


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_adapter(tmp_path, flickr, models, capsys):
    epochs = 3

    def run_options(out: Path) -> list[str]:
        return options(flickr, models, out, epochs=epochs, valid_splits="[val]") + ["aurora.dropout=0.1"]

    full, killed = tmp_path / "full", tmp_path / "killed"
    recipe = RECIPES / "hf_retrieval_flickr30k.yaml"
    command = [sys.executable, "-m", "aurora_pet.cli", "train", "--cfg-path", str(recipe), "--options",
               *run_options(killed)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=subprocess_env(),
                               start_new_session=True)
    latest = killed / "checkpoints" / "latest.json"
    deadline = time.time() + 300
    while not latest.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)  # as a crash or a pre-empted job: no clean-up runs
    process.wait()
    first = json.loads(latest.read_text())["epoch"]
    assert first < epochs - 1, "the run finished before it could be killed"
    assert not (killed / "adapter").exists()

    train(recipe, run_options(full), quiet=True)  # uninterrupted
    resumed = train(recipe, run_options(killed), resume=True, quiet=True)
    assert resumed.resumed_from == killed / "checkpoints" / f"epoch_{first}"
    assert "resumed from" in capsys.readouterr().out
    for name in (f"epoch_{epochs - 1}", "best"):
        assert_same_adapter(adapter(full / "checkpoints" / name), adapter(killed / "checkpoints" / name), name)
    assert_same_adapter(adapter(full / "adapter"), adapter(killed / "adapter"), "adapter")
    history = [json.loads((d / "metrics.json").read_text()) for d in (full, killed)]
    assert history[0] == history[1] and len(history[0]["epochs"]) == epochs  # no epoch lost or repeated


DRIVER = """
import os, sys
from safetensors.torch import save_file
from aurora_pet.training.hf_train import train
result = train(sys.argv[1], sys.argv[3:], quiet=True)
state = {k: v.contiguous() for k, v in result.model.adapter_state_dict().items()}
save_file(state, f"{sys.argv[2]}/rank{os.environ['RANK']}.safetensors")
"""


@pytest.mark.slow
def test_two_process_run_ends_with_identical_adapters_on_both_ranks(tmp_path, flickr, models):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / "run"
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc_per_node=2", str(driver),
               str(RECIPES / "hf_retrieval_flickr30k.yaml"), str(tmp_path),
               *options(flickr, models, out, epochs=2, valid_splits="[val]")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=subprocess_env(), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    assert_same_adapter(ranks[0], ranks[1], "rank 1")
    state = torch.load(out / "checkpoints" / "epoch_1" / "training_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert len(json.loads((out / "metrics.json").read_text())["epochs"]) == 2
    assert_same_adapter(ranks[0], adapter(out / "adapter"), "the exported adapter")
