"""Learning efficiency: the demo's pre-trained tiny BLIP adapted to the shifted domain by each method.

What runs: the demo's pieces (``aurora_pet.demo``) — the tiny LAVIS ``BlipRetrieval`` pre-trained on the
generated *source* domain (shipped with the package, or cached), the generated *shifted* domain in
Flickr30k's annotation format, the demo's adaptation settings (``ADAPT_DATA``, ``ADAPT_RUN``,
``DEMO_AURORA``: 256 training images × 5 captions, 12 epochs, batch 16) with the test split enlarged to
96 images — and the recipes' trainer (``aurora_pet.training.train``: LAVIS's runner, ITC + ITM training,
AdamW with the cosine schedule, LAVIS's retrieval evaluation with ITM re-ranking of the top ``k_test``).

``--task vqa`` runs the same protocol on VQA (``Task``: what differs between the tasks): the tiny LAVIS
``BlipVQA`` pre-trained on generated *source*-domain questions (``pretrained_tiny_blip("blip_vqa")``:
shipped with the package, 1.5 MB, reproducible in about 4 minutes; it starts from the retrieval model's vision and text
encoders, see ``aurora_pet.demo.pretrained.VQA_PRETRAIN``), adapted to the *shifted* domain's questions in
VQAv2's format (the same sizes, ``VQA_QUESTIONS`` = 5 questions per image, one of each kind), trained on LAVIS's
answer loss and scored by LAVIS's ``VQATask``: rank inference over the answer list and VQAv2's official accuracy
(``agg_metrics``) on the validation split and on the test split, which the generated data answers and scores
too (``write_vqa_dataset``). Everything below holds for both tasks with "mean recall" read as "VQA accuracy".

Protocol (issue 12), per method:

1. **learning-rate sweep** on the *validation* split: one run (seed 0) at each rate of the method's grid
   (``LR_GRIDS``: three rates, a factor 4 apart); each run is validated after every epoch and scored by its
   best epoch's validation mean recall (R@1/5/10 in both directions); the rate with the best score wins.
   While the winner is the grid's lowest or highest rate, the sweep goes one more factor past it (at most
   ``--max-extend`` times, default 2), so the chosen rate is bracketed; a winner still at the edge is marked.
   The test split plays no part in the choice.
2. **seeds**: the chosen rate again with seeds 1, 2, ... (seed 0 is the sweep's run); the seed sets the data
   order, dropout and the adapter's initialisation (VeRA: also its frozen random projections).
3. **test**: every run is tested once, with the weights of its best validation epoch (the runner's
   selection; this benchmark makes LAVIS's ``agg_metrics`` the mean recall, not image→text alone, so the
   epoch and the rate are chosen on the same number); reported: mean ± std over the seeds of the test mean
   recall, and the **share of full fine-tuning's gain**, ``(method − before) / (full − before)`` on those
   means, ``before`` being the pre-trained model, unadapted.
4. **divergence**: a run whose last epoch validates below the unadapted model (or whose loss is not finite)
   is flagged, at any rate of the sweep; the table shows it.

Methods (all from the same pre-trained weights; retrieval's task heads ``itm_head``, ``vision_proj``,
``text_proj`` train with every method): ``heads`` only; ``aurora`` (the recipe's ``aurora:`` section: CP with a
rank sweep, Tucker, the presets ``cross-attention``, ``reference``, ``text-attention``, the ICE/GQT ablation);
``lora`` and ``vera`` (peft 0.13.2, ``bench._harness.inject_peft``, on exactly Aurora's targets of a preset
and on their momentum twins); ``full`` fine-tuning (the recipe without ``aurora:``). LoRA, VeRA and
heads-only reuse the trainer through its ``prepare_model`` hook.

VQA's plan (``plan(task=VQA)``) is the comparison's core: Aurora CP R=64 +ICE/GQT on each blip_vqa preset
(``cross-attention``: the text encoder's and the answer decoder's cross-attention; ``reference``;
``text-attention``), LoRA r=1 and r=8 and VeRA of Aurora's count on the ``reference`` targets (BlipVQA has no
momentum encoders, so no twins), full fine-tuning, and Aurora distilled. No rank sweep, Tucker, ablation, staged
or LoRA distillation (retrieval's study, ``Task.full_study``), and no "heads only" row: BlipVQA has no task
head — its answer decoder's output layer is tied to the decoder's word embeddings, so training it would train
the embedding table — and the blip_vqa presets save no module, so every method trains its own parameters only.

**Distillation** (group ``distillation``; issue 12 allows it): Aurora, and LoRA r=8 for a fair comparison,
trained with the recipe's ``distill:`` section (``DISTILL``: ITC, ITM and relation distillation at weight 1,
each model's ITC temperature; distillation throughout, or staged, ``STAGED`` epochs of align / supervised /
distill; VQA: Aurora only, ``VQA_DISTILL``: answer and relation distillation at weight 1, throughout). The
teacher is this benchmark's own full fine-tuning: its run at the chosen rate and the first seed, with the weights
of its best validation epoch (the runner's ``model/model.safetensors``, made a whole checkpoint by
``save_teacher``). Full fine-tuning therefore runs first (``select`` adds it when ``--only`` leaves it out);
its first-seed checkpoints are kept under ``--teachers`` (default ``learning-teachers`` in the pre-trained
model's cache, named by a digest of the run's identity), and when ``--resume`` reuses that run without its
checkpoint, the run is trained again to make one. The JSON's ``settings.teacher`` records the teacher (run,
checkpoint, sha256, best epoch, test mean recall, how it was obtained); each distillation run's key names it.

Outputs (``--out``, default ``bench/results``; stem ``--name``, default ``learning`` / ``learning_quick``, VQA
``learning_vqa`` / ``learning_vqa_quick``): ``.json`` (settings — ``settings.task`` names the task, a file
without it is retrieval's —, every run with its per-epoch history, the rows), ``.md`` (the tables),
``_curves.csv`` (validation curves, ``Task.curves``: one line per run and epoch) and ``_accuracy_vs_params.png``
(the test metric and the share of full fine-tuning's gain against trainable parameters, log scale; validation
curves). The ``.json`` is rewritten after every run; ``--resume`` reuses the runs it holds (same settings: the
settings' identity, which for VQA includes the task, so the tasks never mix) and runs only what is missing;
``--report`` reads the task from the files.

``python -m bench.learning`` runs every method (about 100 runs; 4 hours on 2 shared cores); ``--only``
selects methods or groups, ``--seeds`` and ``--lrs`` (rates instead of each selected grid) make a single
check cheap; ``--quick`` runs the whole protocol on a tiny setting (2 epochs of 32 images, 6 methods, one of
them distilled, 3+ rates, 3 seeds) in a few minutes. ``--task vqa`` runs VQA's 8 methods (about 45 runs);
``--task vqa --quick`` its 5 quick ones in about 1.5 minutes once the pre-trained model is cached.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import hashlib
import io
import json
import logging
import math
import os
import shutil
import statistics
import tempfile
import time
import types
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from aurora_pet.demo.pretrained import PretrainedTiny, default_cache_dir, pretrained_tiny_blip
from aurora_pet.demo.recipe import ADAPT_DATA, ADAPT_RUN, ARCH, DEMO_AURORA, IMAGE_SIZE, TINY_MODELS, VQA_ARCH
from aurora_pet.demo.recipe import demo_recipe, write_demo_data
from aurora_pet.training.data import write_recipe
from aurora_pet.training.evaluate import evaluate, evaluate_model
from aurora_pet.training.run_state import FULL_WEIGHTS_NAME
from aurora_pet.training.trainer import train

from . import _harness as H

HEADS = ["itm_head", "vision_proj", "text_proj"]
# Learning-rate grids, three rates a factor 4 apart, centred on each kind's usual rate: the demo's 4e-3 for
# the adapters and the heads, the pre-training rate 5e-4 for full fine-tuning, 1.6e-2 for VeRA (its scaling
# vectors want rates about 10× LoRA's, Kopiczko et al. 2024).
LR_GRIDS: dict[str, tuple[float, ...]] = {"full": (1.25e-4, 5e-4, 2e-3), "vera": (4e-3, 1.6e-2, 6.4e-2)}
DEFAULT_GRID = (1e-3, 4e-3, 1.6e-2)
BEST_PRESET = "reference"  # the preset of the rank sweep, Tucker, the peers and the ICE/GQT ablation
DEFAULT_N_TEST = 96  # the demo's 64 test images enlarged: R@1 over few images moves in coarse steps
QUICK = {"epochs": 2, "n_train": 32, "n_val": 16, "n_test": 16, "batch": 16}
VQA_QUESTIONS = 5  # questions per image of the VQA data: one of each kind (colour, shape, where, count, exists)


@dataclass
class Spec:
    name: str
    kind: str  # heads | aurora | lora | vera | full
    # the method's settings; "distill": the recipe's distill: section without its teacher (the protocol adds
    # "teacher": which run of this benchmark the checkpoint comes from, see `protocol`)
    options: dict[str, Any] = field(default_factory=dict)
    group: str = "methods"  # methods | presets | peers | rank sweep | tucker | ICE/GQT ablation | distillation
    lrs: tuple[float, ...] | None = None  # None: LR_GRIDS / DEFAULT_GRID by kind

    @property
    def grid(self) -> tuple[float, ...]:
        return tuple(self.lrs or LR_GRIDS.get(self.kind, DEFAULT_GRID))

    @property
    def distill(self) -> dict[str, Any] | None:
        """The distillation settings (``DistillConfig``'s keys but ``teacher``), or None: no teacher."""
        return self.options.get("distill")

    @property
    def method_options(self) -> dict[str, Any]:
        """The options of the method itself (Aurora's section, LoRA's rank, ...), without the distillation."""
        return {k: v for k, v in self.options.items() if k != "distill"}

    @property
    def key(self) -> str:
        """What identifies the configuration (not the display name): kind and options."""
        return json.dumps({"kind": self.kind, "options": self.options}, sort_keys=True)


@dataclass
class Settings:
    epochs: int
    n_train: int
    n_val: int
    n_test: int
    batch: int
    k_test: int
    seeds: list[int]
    data_seed: int = int(ADAPT_DATA["seed"])
    task: str = "retrieval"  # a key of TASKS

    @classmethod
    def make(cls, quick: bool, epochs: int | None = None, n_train: int | None = None, n_val: int | None = None,
             n_test: int | None = None, batch: int | None = None, seeds: int | None = None,
             task: str = "retrieval") -> Settings:
        base = QUICK if quick else {"epochs": int(ADAPT_RUN["max_epoch"]), "n_train": int(ADAPT_DATA["n_train"]),
                                    "n_val": int(ADAPT_DATA["n_val"]), "n_test": DEFAULT_N_TEST,
                                    "batch": int(ADAPT_RUN["batch_size_train"])}
        n_val, n_test = n_val or base["n_val"], n_test or base["n_test"]
        return cls(epochs=epochs or base["epochs"], n_train=n_train or base["n_train"], n_val=n_val, n_test=n_test,
                   batch=batch or base["batch"], k_test=min(int(ADAPT_RUN["k_test"]), n_val, n_test),
                   seeds=list(range(seeds or 3)), task=task)

    def identity(self) -> dict[str, Any]:
        """What a run's result depends on (everything but the number of seeds). Retrieval's has no task (it is
        what the result files written before VQA existed hold); another task's names the task and its data."""
        identity = {k: v for k, v in asdict(self).items() if k not in ("seeds", "task")}
        task = TASKS[self.task]
        return identity if task is RETRIEVAL else {**identity, "task": task.name, "data": dict(task.data)}

    def run_cfg(self) -> dict[str, Any]:
        return {"max_epoch": self.epochs, "batch_size_train": self.batch, "k_test": self.k_test,
                "valid_splits": ["val"], "test_splits": ["test"], "save_resume_state": False, "plot": False}


# -- the small interface to the demo and the trainer ------------------------------------------------

@dataclass
class Setup:
    """Pre-trained weights and the written shifted-domain data, shared by every run."""

    pretrained: PretrainedTiny
    written: dict[str, Any]
    work: Path
    settings: Settings
    teachers: Path  # where teacher checkpoints are kept (``teacher_file``)

    @property
    def task(self) -> Task:
        return TASKS[self.settings.task]


def prepare(work: Path, cache_dir: Path | None, settings: Settings, verbose: bool = False,
            teachers: Path | None = None) -> Setup:
    """The demo's pre-trained model of `settings`' task and its shifted-domain data of `settings`' sizes; teacher
    checkpoints go to `teachers` (default: ``learning-teachers`` in the pre-trained model's cache)."""
    task = TASKS[settings.task]
    with H.quiet(not verbose):
        pretrained = pretrained_tiny_blip(task.arch, cache_dir)
        written = write_demo_data(work / "data", "shifted", n_train=settings.n_train, n_val=settings.n_val,
                                  n_test=settings.n_test, seed=settings.data_seed, arch=task.arch, **task.data)
    teachers = teachers or (cache_dir or default_cache_dir()) / "learning-teachers"
    return Setup(pretrained, written, work, settings, teachers)


def demo_aurora(**overrides: Any) -> dict[str, Any]:
    return {**DEMO_AURORA, **overrides}


# -- the tasks -------------------------------------------------------------------------------------------

def _retrieval_r1(metrics: dict[str, float]) -> dict[str, float]:
    """Retrieval's metrics plus ``r1_mean``, the mean of R@1 in both directions."""
    return {**metrics, "r1_mean": (metrics.get("txt_r1", 0.0) + metrics.get("img_r1", 0.0)) / 2}


def _evaluate_retrieval(setup: Setup, split: str) -> dict[str, float]:
    """LAVIS's retrieval evaluation of the unadapted model (``compute_sim_matrix`` with ITM re-ranking of the
    top ``k_test``, ``RetrievalTask``'s metrics), in memory."""
    return evaluate_model(setup.pretrained.build(), setup.written, k_test=setup.settings.k_test,
                          image_size=IMAGE_SIZE, split=split)


def _evaluate_vqa(setup: Setup, split: str) -> dict[str, float]:
    """LAVIS's VQA evaluation of the unadapted model through the runner (``run.evaluate``): rank inference over
    the answer list, ``VQATask``'s official VQAv2 scoring (``agg_metrics``: overall accuracy)."""
    recipe = demo_recipe(setup.written, setup.work / "before" / "run", pretrained=setup.pretrained, aurora=None,
                         run=setup.settings.run_cfg())
    return evaluate(write_recipe(setup.work / "before" / "recipe.yaml", recipe), split=split)


@dataclass(frozen=True)
class Task:
    """What the protocol needs to know of a task; everything else (sweep, seeds, test, share, report) is one.

    ``metric`` is the key of the runner's validation and test results that chooses the epoch and the rate and is
    reported (``label`` in the text); ``curves`` are the validation metrics kept per epoch (``metric`` first);
    ``derive`` adds numbers to a run's test metrics, and the rows summarise ``<name>_mean`` of each of ``also``
    (mean as ``<name>_mean``, std as ``<name>_std``); ``heads`` train with every method (none: no "heads only"
    row); ``data`` are ``write_demo_data``'s options beyond the sizes; ``evaluate`` scores the unadapted model
    on a split; ``lavis_task`` is the LAVIS task whose ``agg_metrics`` is made ``metric`` (None: it is already);
    ``full_study``: the plan adds the retrieval study's rank sweep, Tucker, ICE/GQT ablation, cross-attention
    LoRA pair and staged/LoRA distillation."""

    name: str
    arch: str
    metric: str
    label: str
    detail: str  # the metric in full, for the report
    distill_text: str  # the distillation settings, for the report
    title: str
    data_text: str  # the data in the report's header, formatted with the settings
    curves: tuple[str, ...]
    heads: tuple[str, ...]
    distill: dict[str, Any]  # the recipe's distill: section without its teacher (DistillConfig's keys)
    evaluate: Callable[[Setup, str], dict[str, float]]
    derive: Callable[[dict[str, float]], dict[str, float]] = dict
    also: tuple[str, ...] = ()
    data: dict[str, Any] = field(default_factory=dict)
    lavis_task: str | None = None
    full_study: bool = False

    def extract(self, history: Sequence[dict[str, Any]],
                final: dict[str, Any] | None) -> tuple[list[dict[str, Any]], dict[str, float]]:
        """A run's validation curves and test metrics from the runner's results.

        Parameters
        ----------
        history : sequence of dict
            The runner's per-epoch rows (``train_loss``, ``val_<metric>``, ...).
        final : dict or None
            The runner's test results (``test_<metric>``, ...).

        Returns
        -------
        tuple
            One row per epoch (``epoch``, ``train_loss``, ``val_<curve>`` of each of ``curves``; NaN where
            absent) and the numeric test metrics without their ``test_`` prefix, completed by ``derive``.
        """
        curves = [{"epoch": row.get("epoch"), "train_loss": _float(row.get("train_loss")),
                   **{f"val_{key}": _float(row.get(f"val_{key}")) for key in self.curves}} for row in history]
        metrics = {k[len("test_"):]: float(v) for k, v in (final or {}).items()
                   if k.startswith("test_") and isinstance(v, (int, float))}
        return curves, self.derive(metrics)


# The distillation settings of the plan (DistillConfig's keys, explicit so that a run's key names them all):
# every term of the task at weight 1, each model's own ITC temperature (retrieval).
DISTILL: dict[str, Any] = {"itc_weight": 1.0, "itm_weight": 1.0, "relation_weight": 1.0, "temperature": None,
                           "stages": ["distill"]}
VQA_DISTILL: dict[str, Any] = {"answer_weight": 1.0, "relation_weight": 1.0, "temperature": None,
                               "stages": ["distill"]}
RETRIEVAL = Task(
    "retrieval", ARCH, "r_mean", "mean recall", "mean recall (R@1/5/10, both directions, %)",
    "ITC/ITM/relation weights 1, each model's ITC temperature", "Tiny BLIP retrieval",
    "{n_train} training images × 5 captions, batch {batch}, {n_val} validation / {n_test} test images, "
    "k_test {k_test}", ("r_mean", "txt_r1", "img_r1"), tuple(HEADS), DISTILL, _evaluate_retrieval,
    derive=_retrieval_r1, also=("r1",), lavis_task="lavis.tasks.retrieval.RetrievalTask", full_study=True)
# BlipVQA has no task head: its answer decoder's output layer is tied to the decoder's word embeddings (training
# it trains the embedding table), and the blip_vqa presets save no module. Every method trains its own
# parameters only, and there is no "heads only" row.
VQA = Task(
    "vqa", VQA_ARCH, "agg_metrics", "VQA accuracy",
    "VQA accuracy (VQAv2's official scoring, rank inference over the answer list, %)",
    "answer/relation weights 1, temperature 1", "Tiny BLIP VQA",
    "{n_train} training images × " + f"{VQA_QUESTIONS} questions" + ", batch {batch}, {n_val} validation / "
    "{n_test} test images", ("agg_metrics", "other", "number", "yes/no"), (), VQA_DISTILL, _evaluate_vqa,
    data={"questions_per_image": VQA_QUESTIONS})
TASKS: dict[str, Task] = {task.name: task for task in (RETRIEVAL, VQA)}


def task_of(results: dict[str, Any]) -> Task:
    """The task of a result file (one without ``settings.task`` is retrieval's, written before VQA existed)."""
    return TASKS[results["settings"].get("task", RETRIEVAL.name)]


@contextlib.contextmanager
def lavis_for_selection(task: Task = RETRIEVAL) -> Iterator[None]:
    """Changes to LAVIS inside the benchmark, undone on exit. (1) Retrieval only (``task.lavis_task``):
    retrieval's ``agg_metrics`` (what the runner picks the best epoch by) is LAVIS's image→text mean recall; here
    it is the task's metric, the mean recall of both directions, the number the learning rate is chosen by
    (VQA's ``agg_metrics`` already is its accuracy). (2) ``IterLoader`` sleeps 2 s at every epoch boundary
    against a distributed deadlock; one process has none (wall time only, no result changes)."""
    from lavis.datasets.datasets import dataloader_utils

    with contextlib.ExitStack() as stack:
        if task.lavis_task is not None:
            stack.enter_context(_agg_metrics_is(task.lavis_task, task.metric))
        original_time = dataloader_utils.time
        dataloader_utils.time = types.SimpleNamespace(sleep=lambda seconds: None, time=time.time)
        stack.callback(setattr, dataloader_utils, "time", original_time)
        yield


@contextlib.contextmanager
def _agg_metrics_is(path: str, metric: str) -> Iterator[None]:
    """LAVIS task class `path`'s ``_report_metrics`` (a staticmethod) reports ``agg_metrics`` = `metric`."""
    import importlib

    module, name = path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    original = cls.__dict__["_report_metrics"]

    def report(*args: Any, **kwargs: Any) -> dict[str, Any]:
        result = original.__func__(*args, **kwargs)
        result["agg_metrics"] = result[metric]
        return result

    cls._report_metrics = staticmethod(report)
    try:
        yield
    finally:
        cls._report_metrics = original


def run(setup: Setup, spec: Spec, lr: float, seed: int, index: int, verbose: bool = False,
        teacher: Path | None = None, keep: Path | None = None) -> dict[str, Any]:
    """Train, validate every epoch and test one method at one rate and seed; a spec with ``distill`` options
    distils `teacher` (a checkpoint file); `keep`: where to write the run's best model as a whole checkpoint
    (full fine-tuning: a teacher, ``save_teacher``)."""
    task = setup.task
    out = setup.work / f"run{index:03d}"
    aurora = demo_aurora(**spec.method_options, init_seed=seed, modules_to_save=list(task.heads)) \
        if spec.kind == "aurora" else None
    run_cfg = {**setup.settings.run_cfg(), "seed": seed, "init_lr": lr}
    recipe = demo_recipe(setup.written, out / "run", pretrained=setup.pretrained, aurora=aurora, run=run_cfg)
    if spec.distill is not None:
        if teacher is None:
            raise ValueError(f"{spec.name}: a distillation run needs the teacher's checkpoint")
        recipe["distill"] = {**{k: v for k, v in spec.distill.items() if k != "teacher"}, "teacher": str(teacher)}
    path = write_recipe(out / "recipe.yaml", recipe)
    start = time.perf_counter()
    with H.quiet(not verbose), lavis_for_selection(task):
        result = train(path, quiet=True, prepare_model=_prepare(spec, seed, task.heads))
    seconds = time.perf_counter() - start
    trainable = sum(p.numel() for p in result.model.parameters() if p.requires_grad)
    history, final = task.extract(result.history, result.final)
    val = [h[f"val_{task.metric}"] for h in history]
    if keep is not None:
        save_teacher(setup, Path(result.weights_dir) / FULL_WEIGHTS_NAME, keep)
    shutil.rmtree(out, ignore_errors=True)
    return {"method": spec.name, "group": spec.group, "kind": spec.kind, "key": spec.key, "lr": lr, "seed": seed,
            "trainable": trainable, "history": history, "best_epoch": (result.final or {}).get("best_epoch"),
            "val_best": max(val) if val else float("nan"), "val_last": val[-1] if val else float("nan"),
            "metrics": final, "seconds": seconds}


def _float(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else float("nan")


def evaluate_pretrained(setup: Setup) -> dict[str, dict[str, float]]:
    """The pre-trained model, unadapted, on the shifted validation and test splits (the runs' evaluation:
    ``Task.evaluate``)."""
    return {split: setup.task.derive(setup.task.evaluate(setup, split)) for split in ("val", "test")}


def _prepare(spec: Spec, seed: int, heads: Sequence[str] = tuple(HEADS)) -> Callable[[Any], None] | None:
    """The trainer's `prepare_model` hook that installs LoRA, VeRA or heads-only on the built LAVIS model; the
    task's `heads` train beside them."""
    if spec.kind not in ("lora", "vera", "heads"):
        return None

    def prepare(lavis_model: Any) -> None:
        if spec.kind == "heads":
            lavis_model.requires_grad_(False)
        else:
            H.inject_peft(lavis_model, spec.kind, prng_key=seed, **spec.method_options)
        for name in heads:
            getattr(lavis_model, name).requires_grad_(True)

    return prepare


# -- the teacher of the distillation runs --------------------------------------------------------------

TEACHER_KIND = "full"  # the distillation runs' teacher: full fine-tuning's run at its chosen rate, first seed
STAGED = (1, 4, 1)  # the staged variant's epochs of [align, supervised, distill], the last one continuing


def teacher_file(setup: Setup, spec: Spec, lr: float, seed: int) -> Path:
    """Where the teacher checkpoint made from run (`spec`, `lr`, `seed`) under `setup`'s settings is kept: the
    name holds a digest of everything that run depends on, so a file is only reused for the same run."""
    identity = {"settings": setup.settings.identity(), "pretrained": setup.pretrained.checkpoint.name,
                "key": spec.key, "lr": lr, "seed": seed}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    return setup.teachers / f"teacher-{spec.kind}-lr{lr:.3g}-seed{seed}-{digest}.pth"


def save_teacher(setup: Setup, weights: Path, path: Path) -> None:
    """A full fine-tuning run's best checkpoint (the runner's ``model/model.safetensors``: every trainable tensor
    of the best validation epoch) as the whole checkpoint a recipe's ``distill.teacher`` loads strictly: the
    pre-trained model with those tensors in place. What does not train (the momentum encoders, the queues) keeps
    its pre-trained values; the teacher drops it (``build_teacher``)."""
    import torch
    from safetensors.torch import load_file

    with H.quiet():
        model = setup.pretrained.build()
    trained = load_file(str(weights))
    own = model.state_dict()
    wrong = sorted(k for k in trained if k not in own or own[k].shape != trained[k].shape)
    if wrong or not trained:
        raise RuntimeError(f"{weights} does not fit the pre-trained model: {wrong[:5] or 'no tensors'}")
    model.load_state_dict(trained, strict=False)
    buffer = io.BytesIO()  # not a file: torch.save names the archive after the file, the bytes would vary
    torch.save({"model": model.state_dict()}, buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_bytes(buffer.getvalue())
    os.replace(partial, path)


def _teacher_record(path: Path, result: dict[str, Any], metric: str = RETRIEVAL.metric) -> dict[str, Any]:
    """What identifies a teacher checkpoint: its file and digest, and the run that made it (its test `metric`)."""
    return {"checkpoint": path.name, "path": str(path), "sha256": _sha256(path),
            f"test_{metric}": result["metrics"].get(metric), "val_best": result["val_best"],
            "best_epoch": result["best_epoch"]}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def inject_lora(model, rank: int = 8, alpha: float | None = None, dropout: float = 0.0,
                preset: str = "cross-attention") -> int:
    """peft LoRA on Aurora's targets of `preset` and their momentum twins (``bench._harness.inject_peft``)."""
    return H.inject_peft(model, "lora", preset=preset, rank=rank, alpha=alpha, dropout=dropout)


# -- the plan ----------------------------------------------------------------------------------------

def adapter_count(rank: int, ice: bool = True, gqt: bool = True, d: int = 64, slices: int = 8, sites: int = 2) -> int:
    """Aurora's adapter parameters on the tiny model's cross-attention (d=64, 2 layers × q,k,v,o)."""
    return (2 * d + slices + 1) * rank + sites * ((d if ice else 0) + (4 * d + 1 if gqt else 0))


@functools.lru_cache(maxsize=None)
def _tiny_model(arch: str = ARCH):
    """The tiny architecture `arch` (random weights): for parameter counts only."""
    from aurora_pet.families.lavis.build import ARCHITECTURES, build_blip

    settings = {k: v for k, v in TINY_MODELS[arch].items() if k != "size"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_blip(arch, ARCHITECTURES[arch][0], size="tiny", **settings)


@functools.lru_cache(maxsize=None)
def aurora_adapter_count(preset: str, rank: int, core: str = "cp", ice: bool = True, gqt: bool = True,
                         arch: str = ARCH) -> int:
    """Aurora's adapter parameters (factors + ICE + GQT, no heads) on the tiny `arch` under `preset`."""
    from aurora_pet.families.lavis.wrap import wrap_blip

    model = _tiny_model(arch)
    settings = {k: v for k, v in DEMO_AURORA.items() if k not in ("preset", "modules_to_save")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        aurora = wrap_blip(model, preset, **{**settings, "rank": rank, "core": core, "ice": ice, "gqt": gqt})
    try:
        groups = aurora.parameter_report()["groups"]
        return int(groups.get("factors", 0) + groups.get("ice", 0) + groups.get("gqt", 0))
    finally:
        aurora.unload()
        model.requires_grad_(False)


def plan(quick: bool, rank: int | None = None, best_preset: str = BEST_PRESET, task: Task = RETRIEVAL) -> list[Spec]:
    """Every configuration of the protocol for `task` (``quick``: one of each kind, on `best_preset`, and one
    distilled). A task without heads has no "heads only" row; the retrieval-only studies (``Task.full_study``)
    come in plan order between the others."""
    rank = rank or int(DEMO_AURORA["rank"])
    on_best = {"preset": best_preset}
    vera_rank = H.vera_rank_for(_tiny_model(task.arch),
                                aurora_adapter_count(best_preset, 8 if quick else rank, arch=task.arch), best_preset)
    heads = [Spec("heads only", "heads")] if task.heads else []
    if quick:
        return heads + [
            Spec(f"aurora cp R=8 +ICE/GQT [{best_preset}]", "aurora", {"rank": 8, **on_best}),
            Spec(f"lora r=1 [{best_preset}]", "lora", {"rank": 1, **on_best}),
            Spec(f"vera r={vera_rank} [{best_preset}] (Aurora's count)", "vera", {"rank": vera_rank, **on_best}),
            Spec("full fine-tuning", "full"),
            Spec(f"aurora cp R=8 +ICE/GQT [{best_preset}] + distill", "aurora",
                 {"rank": 8, **on_best, "distill": dict(task.distill)}, group="distillation"),
        ]
    specs = heads + [Spec(f"aurora cp R={rank} +ICE/GQT", "aurora", {"rank": rank})]  # the demo's configuration
    if task.full_study:
        lora_per_rank = 8 * (64 + 64)  # cross-attention: 8 targets of 64×64, r·(d_in + d_out) each
        matched = max(1, round(adapter_count(rank) / lora_per_rank))
        specs += [Spec("lora r=8", "lora", {"rank": 8}),
                  Spec(f"lora r={matched} (Aurora's count)", "lora", {"rank": matched})]
    specs.append(Spec("full fine-tuning", "full"))
    specs += [Spec(f"aurora cp R={rank} +ICE/GQT [{preset}]", "aurora", {"rank": rank, "preset": preset},
                   group="presets") for preset in ("reference", "text-attention")]
    specs += [Spec(f"lora r={r} [{best_preset}]", "lora", {"rank": r, **on_best}, group="peers") for r in (1, 8)]
    specs.append(Spec(f"vera r={vera_rank} [{best_preset}] (Aurora's count)", "vera",
                      {"rank": vera_rank, **on_best}, group="peers"))
    if task.full_study:
        specs += [Spec(f"aurora cp R={r} +ICE/GQT [{best_preset}]", "aurora", {"rank": r, **on_best},
                       group="rank sweep") for r in (4, 16, 32) if r != rank]
        specs.append(Spec(f"aurora tucker R=16 +ICE/GQT [{best_preset}]", "aurora",
                          {"rank": 16, "core": "tucker", **on_best}, group="tucker"))  # R=64 would be R³ = 262k
        ablation = (("no ICE/GQT", False, False), ("ICE only", True, False), ("GQT only", False, True))
        specs += [Spec(f"aurora cp R={rank} {label} [{best_preset}]", "aurora",
                       {"rank": rank, "ice": ice, "gqt": gqt, **on_best}, group="ICE/GQT ablation")
                  for label, ice, gqt in ablation]
    # distilled from this benchmark's full fine-tuning (see `protocol`): distillation throughout, and (full
    # study) staged, and LoRA distilled for a fair comparison
    specs.append(Spec(f"aurora cp R={rank} +ICE/GQT [{best_preset}] + distill", "aurora",
                      {"rank": rank, **on_best, "distill": dict(task.distill)}, group="distillation"))
    if task.full_study:
        staged = {**task.distill, "stages": list(STAGED)}
        specs += [Spec(f"aurora cp R={rank} +ICE/GQT [{best_preset}] + distill {_stages_label(STAGED)}", "aurora",
                       {"rank": rank, **on_best, "distill": staged}, group="distillation"),
                  Spec(f"lora r=8 [{best_preset}] + distill", "lora",
                       {"rank": 8, **on_best, "distill": dict(task.distill)}, group="distillation")]
    return specs


def _stages_label(stages: Sequence[int]) -> str:
    """[1, 4, 1] → "(align 1, supervised 4, distill rest)": the last stage continues to the last epoch."""
    names = ("align", "supervised", "distill")
    return "(" + ", ".join(f"{name} {count}" for name, count in zip(names[:-1], stages[:-1]) if count) \
        + (", " if any(stages[:-1]) else "") + f"{names[len(stages) - 1]} rest)"


def select(specs: Sequence[Spec], only: Sequence[str] | None,
           lrs: Sequence[float] | None = None) -> list[Spec]:
    """The specs named in `only` (exact method names or group names), in plan order, each with the rates `lrs`
    instead of its grid if given; a distillation spec brings its teacher, full fine-tuning (first, on its own
    grid), when `only` leaves it out."""
    if only:
        unknown = set(only) - {s.name for s in specs} - {s.group for s in specs}
        if unknown:
            raise SystemExit(f"--only: unknown method(s) or group(s) {sorted(unknown)}; methods: "
                             f"{[s.name for s in specs]}")
    chosen = [s for s in specs if not only or s.name in only or s.group in only]
    if lrs:
        chosen = [replace(s, lrs=tuple(lrs)) for s in chosen]
    if any(s.distill is not None for s in chosen) and not any(s.kind == TEACHER_KIND for s in chosen):
        chosen.insert(0, next(s for s in specs if s.kind == TEACHER_KIND))
    return chosen


# -- the protocol ------------------------------------------------------------------------------------

def diverged(run: dict[str, Any], before_val: float) -> bool:
    """The last epoch validates below the unadapted model, or the loss is not finite."""
    losses = [h["train_loss"] for h in run["history"]]
    return (not all(math.isfinite(x) for x in losses)) or not math.isfinite(run["val_last"]) \
        or run["val_last"] < before_val


def choose_lr(sweep: Sequence[dict[str, Any]]) -> float:
    """The rate whose seed-0 run has the best validation score (best epoch's validation mean recall)."""
    scored = [r for r in sweep if math.isfinite(r["val_best"])]
    return max(scored or sweep, key=lambda r: r["val_best"] if math.isfinite(r["val_best"]) else -1)["lr"]


def extensions(grid: Sequence[float], sweep: list[dict[str, Any]], max_extend: int) -> Iterator[float]:
    """Rates beyond the grid's edge while the best rate so far is at an edge (at most `max_extend`), the same
    factor apart: the sweep then brackets the optimum unless the extensions run out (the table says so).
    `sweep` grows as the caller runs each yielded rate."""
    if len(grid) < 2:  # one rate given (--lrs): nothing to bracket
        return
    ratio = grid[1] / grid[0]
    for _ in range(max_extend):
        rates = sorted(r["lr"] for r in sweep)
        chosen = choose_lr(sweep)
        if chosen == rates[-1]:
            yield rates[-1] * ratio
        elif chosen == rates[0]:
            yield rates[0] / ratio
        else:
            return


def protocol(setup: Setup, specs: Sequence[Spec], cached: dict[tuple[str, float, int], dict[str, Any]],
             on_run: Callable[[dict[str, Any]], None], verbose: bool = False,
             max_extend: int = 2, teacher_info: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Sweep (extended past an edge that wins, see `extensions`), choose on validation, seeds; every run once
    (`cached` ones are reused).

    Distillation specs (``spec.distill``) are taught by this benchmark's own full fine-tuning: the run of the
    ``full`` spec (which must come earlier in `specs`) at its chosen rate and first seed, whose best checkpoint
    ``save_teacher`` keeps (``teacher_file``) when that run trains; a run reused from `cached` whose checkpoint
    is not kept (or was made by another run: its record differs) is trained again to make it. Each distillation
    spec's options get ``distill.teacher`` = that run (kind, rate, seed), so its runs' key names the teacher;
    `teacher_info` receives the teacher's identity (``_teacher_record``, plus how it was obtained)."""
    runs: list[dict[str, Any]] = []
    seeds = setup.settings.seeds
    metric = setup.task.metric
    teacher: dict[str, Any] = {}  # the resolved teacher: "label" (spec options) and "path"
    trained_now: set[int] = set()  # ids of the runs trained in this call (not reused from `cached`)

    def get(spec: Spec, lr: float, seed: int, stage: str) -> dict[str, Any]:
        key = (spec.key, lr, seed)
        if key in cached:
            result = cached[key]
            result.update(method=spec.name, group=spec.group)
        else:
            keep = teacher_file(setup, spec, lr, seed) if spec.kind == TEACHER_KIND and seed == seeds[0] else None
            result = run(setup, spec, lr, seed, len(runs), verbose, teacher=teacher.get("path"), keep=keep)
            if keep is not None:
                keep.with_suffix(".json").write_text(json.dumps(_teacher_record(keep, result, metric), indent=1)
                                                     + "\n")
            cached[key] = result
            trained_now.add(id(result))
            print(f"  {spec.name:<44} lr {lr:<8.3g} seed {seed}  trainable {result['trainable']:>8,}  "
                  f"val {result['val_best']:5.1f} (last {result['val_last']:5.1f})  "
                  f"test {result['metrics'].get(metric, float('nan')):5.1f}  ({result['seconds']:.0f} s)", flush=True)
        result["stage"] = stage
        runs.append(result)
        on_run(result)
        return result

    def resolve_teacher(spec: Spec) -> None:
        """The teacher of distillation spec `spec`: full fine-tuning's chosen-rate, first-seed run's checkpoint."""
        if not teacher:
            full = next((s for s in done if s.kind == TEACHER_KIND), None)
            if full is None:
                raise ValueError(f"{spec.name}: distillation needs the {TEACHER_KIND!r} spec (the teacher) earlier "
                                 "in the plan")
            sweep = [r for r in runs if r["key"] == full.key and r["seed"] == seeds[0]]
            lr = choose_lr(sweep)
            made = next(r for r in sweep if r["lr"] == lr)
            path = teacher_file(setup, full, lr, seeds[0])
            record_file = path.with_suffix(".json")
            record = json.loads(record_file.read_text()) if path.is_file() and record_file.is_file() else None
            expected = {f"test_{metric}": made["metrics"].get(metric), "val_best": made["val_best"],
                        "best_epoch": made["best_epoch"]}
            if record is not None and record.get("sha256") == _sha256(path) \
                    and all(record.get(k) == v for k, v in expected.items()):
                source = "the run's checkpoint" + ("" if id(made) in trained_now else
                                                   ", kept from the invocation that trained it")
            else:  # the run came from the cache without its checkpoint: train it again to make one
                print(f"  teacher: training {full.name} lr {lr:.3g} seed {seeds[0]} again for its checkpoint",
                      flush=True)
                again = run(setup, full, lr, seeds[0], len(runs), verbose, keep=path)
                record = _teacher_record(path, again, metric)
                record_file.write_text(json.dumps(record, indent=1) + "\n")
                source = ("trained again for its checkpoint (the run came from the cache); same result as the "
                          "cached run: " + str(all(record.get(k) == v for k, v in expected.items())))
            for other in sweep:  # the other rates' checkpoints teach nothing
                if other["lr"] != lr:
                    file = teacher_file(setup, full, other["lr"], seeds[0])
                    file.unlink(missing_ok=True)
                    file.with_suffix(".json").unlink(missing_ok=True)
            teacher.update(path=path, label={"method": full.name, "kind": full.kind, "lr": lr, "seed": seeds[0]})
            if teacher_info is not None:
                teacher_info.update({**teacher["label"], **record, f"run_test_{metric}": expected[f"test_{metric}"],
                                     "source": source})
            print(f"  teacher: {full.name} lr {lr:.3g} seed {seeds[0]} ({path.name}, test "
                  f"{record[f'test_{metric}']:.1f}; {source})", flush=True)
        spec.options["distill"] = {**(spec.distill or {}), "teacher": teacher["label"]}

    done: list[Spec] = []
    for spec in specs:
        if spec.distill is not None:
            resolve_teacher(spec)
        done.append(spec)
        sweep = [get(spec, lr, seeds[0], "sweep") for lr in spec.grid]
        for lr in extensions(spec.grid, sweep, max_extend):
            sweep.append(get(spec, lr, seeds[0], "sweep"))
        chosen = choose_lr(sweep)
        for seed in seeds[1:]:
            get(spec, chosen, seed, "seed")
    return runs


def summarise(specs: Sequence[Spec], runs: Sequence[dict[str, Any]], before: dict[str, dict[str, float]],
              seeds: Sequence[int], task: Task = RETRIEVAL) -> list[dict[str, Any]]:
    """One row per method: the sweep (validation score per rate), the chosen rate, the seeds' test results
    (`task`'s metric, and retrieval's R@1 mean), the share of full fine-tuning's gain, the diverged runs."""
    metric = task.metric
    before_val, before_test = before["val"][metric], before["test"][metric]
    rows = []
    for spec in specs:
        mine = [r for r in runs if r["key"] == spec.key]
        sweep = sorted({r["lr"]: r for r in mine if r["seed"] == seeds[0]}.values(), key=lambda r: r["lr"])
        if not sweep:
            continue
        chosen = choose_lr(sweep)
        final = sorted({r["seed"]: r for r in mine if r["lr"] == chosen and r["seed"] in seeds}.values(),
                       key=lambda r: r["seed"])
        test = [r["metrics"].get(metric, float("nan")) for r in final]
        mean, std = H.mean_std(test)
        also = {}  # retrieval: the R@1 mean's mean and std over the seeds
        for name in task.also:
            also[f"{name}_mean"], also[f"{name}_std"] = \
                H.mean_std([r["metrics"].get(f"{name}_mean", float("nan")) for r in final])
        rows.append({
            "method": spec.name, "group": spec.group, "kind": spec.kind, "options": spec.options,
            "trainable": final[0]["trainable"],
            "sweep": [{"lr": r["lr"], "val": r["val_best"], "val_last": r["val_last"],
                       "diverged": diverged(r, before_val)} for r in sweep],
            "lr": chosen, "lr_at_edge": chosen in (sweep[0]["lr"], sweep[-1]["lr"]), "grid": list(spec.grid),
            "seeds": [r["seed"] for r in final], f"test_{metric}": test, "mean": mean, "std": std, **also,
            "val_mean": statistics.fmean(r["val_best"] for r in final),
            "diverged": sorted({f"lr {r['lr']:.3g} seed {r['seed']}" for r in mine if diverged(r, before_val)}),
            "seconds": statistics.median(r["seconds"] for r in mine),
            "before": before_test,
        })
    full = next((r for r in rows if r["kind"] == "full"), None)
    gain = (full["mean"] - before_test) if full else float("nan")
    for row in rows:
        row["share"] = (row["mean"] - before_test) / gain if full and gain else None
        row["share_spread"] = row["std"] / abs(gain) if full and gain else None
        row["fraction_of_full"] = row["trainable"] / full["trainable"] if full else None
    return rows


def targets(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Issue 12's targets: an Aurora row with ≤ 10% of full fine-tuning's trainable parameters that recovers
    ≥ 90% of its gain, and scores above every LoRA/VeRA row of an equal or larger count beyond the seed
    spread (mean − std > their mean + std)."""
    full = next((r for r in rows if r["kind"] == "full"), None)
    if full is None:
        return {"evaluated": False, "why": "full fine-tuning not in the selection"}
    small = [r for r in rows if r["kind"] == "aurora" and r["trainable"] <= 0.1 * full["trainable"]]
    if not small:
        return {"evaluated": False, "why": "no Aurora configuration with ≤ 10% of full fine-tuning's parameters"}
    best = max(small, key=lambda r: r["mean"])
    peers = [r for r in rows if r["kind"] in ("lora", "vera") and r["trainable"] >= best["trainable"]]
    beats = {p["method"]: best["mean"] - best["std"] > p["mean"] + p["std"] for p in peers}
    return {"evaluated": True, "aurora": best["method"], "share": best["share"],
            "fraction_of_full": best["fraction_of_full"], "share_met": (best["share"] or 0) >= 0.9,
            "peers": beats, "peers_met": bool(peers) and all(beats.values())}


# -- report ------------------------------------------------------------------------------------------

def _lr(value: float) -> str:
    return f"{value:.3g}"


def table(rows: Sequence[dict[str, Any]], before: dict[str, dict[str, float]], task: Task = RETRIEVAL) -> str:
    metric = task.metric
    lines = [["pre-trained, not adapted", "–", "0", "–", "–",
              f"{before['test'][metric]:.1f} (val {before['val'][metric]:.1f})", "0", "–", "–"]]
    for row in rows:
        sweep = " · ".join((f"**{_lr(s['lr'])}: {s['val']:.1f}**" if s["lr"] == row["lr"] else
                            f"{_lr(s['lr'])}: {s['val']:.1f}") + (" ✗" if s["diverged"] else "") for s in row["sweep"])
        share = "–" if row["share"] is None else f"{100 * row['share']:.0f} ± {100 * row['share_spread']:.0f} %"
        fraction = "–" if row["fraction_of_full"] is None else f"{100 * row['fraction_of_full']:.1f} %"
        lines.append([row["method"], row["group"], f"{row['trainable']:,} ({fraction})", sweep,
                      _lr(row["lr"]) + (" (edge)" if row["lr_at_edge"] else ""),
                      f"**{row['mean']:.1f} ± {row['std']:.1f}** (n={len(row['seeds'])})", share,
                      "; ".join(row["diverged"]) or "–", f"{row['seconds']:.0f}"])
    return H.markdown_table(["method", "group", "trainable (of full FT)", f"validation {task.label} per lr (seed 0)",
                             "chosen lr", f"test {task.label}, mean ± std", "share of full FT's gain",
                             "diverged runs ✗", "s/run"], lines)


def render(results: dict[str, Any]) -> str:
    s = results["settings"]
    rows = results["rows"]
    task = task_of(results)
    parts = [f"{task.title} (pre-trained on the source domain) adapted to the shifted domain: "
             f"{s['epochs']} epochs, {task.data_text.format(**s)}; per method a sweep of "
             f"3 learning rates (seed 0) chosen on validation {task.label}, then seeds {s['seeds']} at the chosen "
             f"rate; test {task.detail} at each run's best validation epoch, "
             f"mean ± std over the seeds; share = (method − before) / (full − before). "
             f"✗: the run's last epoch validates below the unadapted model. {len(results['runs'])} runs, "
             f"wall {results['wall_s']:.0f} s.", "", table(rows, results["before"], task)]
    teacher = s.get("teacher")
    if teacher:
        parts += ["", f"Distillation (`+ distill`: the recipe's `distill:` section, {task.distill_text}): the "
                      f"teacher is this benchmark's {teacher['method']} run at lr "
                      f"{_lr(teacher['lr'])}, seed {teacher['seed']} (its best validation epoch, "
                      f"{teacher['best_epoch']}; test {task.label} {teacher[f'test_{task.metric}']:.1f}), checkpoint "
                      f"`{teacher['checkpoint']}` (sha256 {teacher['sha256'][:12]}…; {teacher['source']})."]
    verdict = results.get("targets") or {}
    if verdict.get("evaluated"):
        peers = ", ".join(f"{k}: {'beaten' if v else 'not beaten'}" for k, v in verdict["peers"].items()) or "none"
        parts += ["", f"Targets: {verdict['aurora']} ({100 * verdict['fraction_of_full']:.1f} % of full FT's "
                      f"parameters) recovers {100 * verdict['share']:.0f} % of full fine-tuning's gain "
                      f"(target ≥ 90 %: {'met' if verdict['share_met'] else 'missed'}); against LoRA/VeRA of an "
                      f"equal or larger count, beyond the seed spread: {peers} "
                      f"({'met' if verdict['peers_met'] else 'missed'})."]
    elif verdict:
        parts += ["", f"Targets not evaluated: {verdict['why']}."]
    return "\n".join(parts)


def write_curves(runs: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]], path: Path,
                 task: Task = RETRIEVAL) -> None:
    """The validation curves (`task`'s ``curves``) of every run, one line per run and epoch."""
    chosen = {(r["method"], r["lr"]) for r in rows}
    curves = [f"val_{key}" for key in task.curves]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "group", "lr", "seed", "stage", "chosen_lr", "epoch", "train_loss", *curves])
        for r in runs:
            for h in r["history"]:
                writer.writerow([r["method"], r["group"], r["lr"], r["seed"], r["stage"],
                                 (r["method"], r["lr"]) in chosen, h["epoch"], f"{h['train_loss']:.5f}",
                                 *(f"{h[key]:.3f}" for key in curves)])


COLORS = {"heads": "#888888", "aurora": "#1f77b4", "lora": "#ff7f0e", "vera": "#2ca02c", "full": "#d62728"}


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows, runs, before = results["rows"], results["runs"], results["before"]
    task = task_of(results)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for ax, key in ((axes[0], "mean"), (axes[1], "share")):
        for row in rows:
            if row[key] is None:
                continue
            scale = 100.0 if key == "share" else 1.0
            spread = row["std"] if key == "mean" else row["share_spread"]
            marker = "s" if row["group"] not in ("methods", "presets", "peers") else "o"
            ax.errorbar(row["trainable"], scale * row[key], yerr=scale * spread, fmt=marker, capsize=3,
                        markersize=5, color=COLORS.get(row["kind"], "black"), alpha=0.9)
            ax.annotate(row["method"].replace(" +ICE/GQT", "").replace("aurora ", "Aurora ")
                        .replace(" (Aurora's count)", ""), (row["trainable"], scale * row[key]),
                        textcoords="offset points", xytext=(4, 3), fontsize=6)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log)")
        if key == "mean":
            ax.axhline(before["test"][task.metric], color="black", linestyle=":", linewidth=0.8,
                       label="before adaptation")
            ax.set_ylabel(f"test {task.label} (%), mean ± std over seeds", fontsize=8)
        else:
            ax.axhline(100, color="#d62728", linestyle="--", linewidth=0.8, label="full fine-tuning")
            ax.axhline(90, color="#d62728", linestyle=":", linewidth=0.8, label="90 % (issue 12's target)")
            ax.axhline(0, color="black", linestyle=":", linewidth=0.8, label="before adaptation")
            full = next((r for r in rows if r["kind"] == "full"), None)
            if full:
                ax.axvline(0.1 * full["trainable"], color="grey", linestyle=":", linewidth=0.8,
                           label="10 % of full FT's parameters")
            ax.set_ylabel("share of full fine-tuning's gain (%)", fontsize=8)
        for kind, color in COLORS.items():
            if any(r["kind"] == kind for r in rows):
                ax.plot([], [], "o", color=color, label=kind)
        ax.legend(fontsize=6, loc="upper left")
    ax = axes[2]
    for row in rows:  # validation curves at the chosen rate, mean over seeds
        curves = [[h[f"val_{task.metric}"] for h in r["history"]] for r in runs
                  if r["method"] == row["method"] and r["lr"] == row["lr"]]
        if not curves:
            continue
        length = min(len(c) for c in curves)
        mean = [statistics.fmean(c[i] for c in curves) for i in range(length)]
        ax.plot(range(1, length + 1), mean, color=COLORS.get(row["kind"], "black"), linewidth=1,
                alpha=1.0 if row["group"] in ("methods", "presets", "peers") else 0.4)
        ax.annotate(row["method"].replace(" +ICE/GQT", ""), (length, mean[-1]), fontsize=5)
    ax.axhline(before["val"][task.metric], color="black", linestyle=":", linewidth=0.8, label="before adaptation")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation {task.label} (%), chosen lr, mean over seeds", fontsize=8)
    ax.legend(fontsize=6, loc="lower right")
    s = results["settings"]
    fig.suptitle(f"{task.title} adapted to the shifted domain ({s['epochs']} epochs, {s['n_train']} images, "
                 f"lr chosen on validation, seeds {s['seeds']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def stem(task: Task, quick: bool) -> str:
    """The result files' default stem: ``learning``, ``learning_vqa``, ``learning_quick``, ``learning_vqa_quick``."""
    return "learning" + ("" if task is RETRIEVAL else f"_{task.name}") + ("_quick" if quick else "")


def report_only(paths: Sequence[Path], out: Path, name: str | None = None,
                best_preset: str = BEST_PRESET) -> dict[str, Any]:
    """The report of the runs stored in `paths` (result files of the same settings; a later file's run replaces
    an earlier one's): every planned method of the files' task that has runs, summarised as `main` does. A
    method whose sweep or seeds are unfinished is reported with the runs it has — its row shows the rates tried,
    ``(edge)`` and n. `name`: the stem of the files written to `out` (default: ``stem`` of the task)."""
    results = [json.loads(Path(path).read_text()) for path in paths]
    task, quick = task_of(results[0]), bool(results[0]["settings"].get("quick"))
    identity = results[0]["settings"]["identity"]
    for path, result in zip(paths, results):
        if result["settings"]["identity"] != identity:
            raise SystemExit(f"{path} has other settings than {paths[0]}: {result['settings']['identity']}")
    runs = {(r["key"], r["lr"], r["seed"]): r for result in results
            for r in result.get("runs", []) + result.get("other_runs", [])}
    specs = _stored_specs(plan(quick, best_preset=best_preset, task=task), {key for key, _, _ in runs})
    seeds = results[0]["settings"]["seeds"]
    rows = summarise(specs, list(runs.values()), results[0]["before"], seeds, task)
    report = {**{k: v for k, v in results[0].items() if k in ("settings", "machine", "before")},
              "runs": list(runs.values()), "rows": rows, "targets": targets(rows),
              "wall_s": sum(r["seconds"] for r in runs.values()), "sources": [str(p) for p in paths]}
    teacher = next((r["settings"]["teacher"] for r in results if r["settings"].get("teacher")), None)
    if teacher is not None:
        report["settings"]["teacher"] = teacher
    report["settings"]["lr_grids"] = {spec.name: list(spec.grid) for spec in specs}
    text = render(report)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    name = name or stem(task, quick)
    (out / f"{name}.md").write_text(text + "\n")
    (out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    write_curves(report["runs"], rows, out / f"{name}_curves.csv", task)
    plot(report, out / f"{name}_accuracy_vs_params.png")
    return report


def _stored_specs(specs: Sequence[Spec], keys: set[str]) -> list[Spec]:
    """The specs of `specs` that have runs among the stored `keys`. A stored distillation run's key names its
    teacher, which the plan leaves to the protocol: such a spec matches its stored key without the teacher,
    and takes the teacher from it (runs of one spec taught by two teachers are an error)."""
    def without_teacher(key: str) -> str:
        stored = json.loads(key)
        stored["options"].get("distill", {}).pop("teacher", None)
        return json.dumps(stored, sort_keys=True)

    found = []
    for spec in specs:
        matching = sorted(key for key in keys if without_teacher(key) == spec.key)
        if not matching:
            continue
        if spec.distill is not None:
            teachers = {json.dumps(json.loads(key)["options"]["distill"].get("teacher"), sort_keys=True)
                        for key in matching}
            if len(teachers) > 1:
                raise SystemExit(f"{spec.name}: runs taught by different teachers {sorted(teachers)}; report "
                                 "one teacher's runs at a time")
            spec = replace(spec, options={**spec.options, "distill": json.loads(matching[0])["options"]["distill"]})
        found.append(spec)
    return found


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the whole protocol on a tiny setting: " + str(QUICK))
    parser.add_argument("--task", choices=sorted(TASKS), default=RETRIEVAL.name,
                        help="retrieval (tiny BlipRetrieval, mean recall; the default) or vqa (tiny BlipVQA, VQA "
                             "accuracy)")
    parser.add_argument("--only", nargs="+", default=None, help="method names or groups to run (default: all)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds at the chosen rate (default 3)")
    parser.add_argument("--epochs", type=int, default=None, help="default: the demo's (12; quick 2)")
    parser.add_argument("--n-train", type=int, default=None, help="training images (default: the demo's 256)")
    parser.add_argument("--n-val", type=int, default=None, help="validation images (default: the demo's 32)")
    parser.add_argument("--n-test", type=int, default=None, help=f"test images (default {DEFAULT_N_TEST})")
    parser.add_argument("--batch", type=int, default=None, help="training batch (default: the demo's 16)")
    parser.add_argument("--rank", type=int, default=None, help="Aurora's rank in the comparison (default: the demo's)")
    parser.add_argument("--best-preset", default=BEST_PRESET,
                        help="preset of the rank sweep, Tucker, LoRA/VeRA peers and ICE/GQT ablation")
    parser.add_argument("--cache-dir", type=Path, default=None, help="pre-trained model cache (the demo's)")
    parser.add_argument("--work", type=Path, default=None, help="where runs are written (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=H.RESULTS)
    parser.add_argument("--name", default=None, help="result file stem (default learning[_vqa][_quick])")
    parser.add_argument("--lrs", type=float, nargs="+", default=None,
                        help="learning rates to run instead of each selected method's grid (a teacher that "
                             "--only leaves out keeps its grid)")
    parser.add_argument("--teachers", type=Path, default=None,
                        help="where teacher checkpoints are kept (default: learning-teachers in the cache dir)")
    parser.add_argument("--max-extend", type=int, default=2,
                        help="rates added past the grid's edge while an edge rate wins (default 2)")
    parser.add_argument("--resume", action="store_true", help="reuse the runs in <out>/<name>.json (same settings)")
    parser.add_argument("--report", type=Path, nargs="+", default=None, metavar="JSON",
                        help="train nothing: tables, curves and plot from the runs stored in these result files "
                             "(same settings; a method whose protocol is unfinished shows what it has)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.report:
        return report_only(args.report, args.out, args.name, args.best_preset)

    import torch

    torch.set_num_threads(1)
    logging.getLogger("peft").setLevel(logging.ERROR)
    if not args.verbose:
        warnings.simplefilter("ignore")
        logging.basicConfig(level=logging.ERROR)  # a root handler first: LAVIS's basicConfig(INFO) is then a no-op
    task = TASKS[args.task]
    settings = Settings.make(args.quick, args.epochs, args.n_train, args.n_val, args.n_test, args.batch, args.seeds,
                             task.name)
    name = args.name or stem(task, args.quick)
    specs = select(plan(args.quick, args.rank, args.best_preset, task), args.only, args.lrs)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"{name}.json"
    cached: dict[tuple[str, float, int], dict[str, Any]] = {}
    if args.resume and json_path.is_file():
        previous = json.loads(json_path.read_text())
        if previous.get("settings", {}).get("identity") == settings.identity():
            cached = {(r["key"], r["lr"], r["seed"]): r
                      for r in previous.get("runs", []) + previous.get("other_runs", [])}
            print(f"resuming: {len(cached)} runs from {json_path}")
        else:
            print(f"not resuming: {json_path} has other settings")
    started = time.perf_counter()
    base = {"settings": {**asdict(settings), "identity": settings.identity(), "quick": args.quick,
                         "best_preset": args.best_preset, "lr_grids": {s.name: list(s.grid) for s in specs},
                         "image_size": IMAGE_SIZE, "data_seed": settings.data_seed},
            "machine": H.machine()}
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="aurora-learning-")))
        work.mkdir(parents=True, exist_ok=True)
        print(f"== pre-trained tiny BLIP and shifted-domain data (work dir {work})", flush=True)
        setup = prepare(work, args.cache_dir, settings, args.verbose, args.teachers)
        with H.quiet(not args.verbose):
            before = evaluate_pretrained(setup)
        base["settings"]["pretrained"] = setup.pretrained.checkpoint.name
        print(f"  before adaptation: {task.label} val {before['val'][task.metric]:.1f}, test "
              f"{before['test'][task.metric]:.1f}", flush=True)
        done: list[dict[str, Any]] = list(cached.values())  # kept in the file even when not selected now

        def save_partial(result: dict[str, Any]) -> None:
            if not any(r is result for r in done):
                done.append(result)
            json_path.write_text(json.dumps({**base, "before": before, "runs": done, "partial": True}) + "\n")

        teacher: dict[str, Any] = {}
        if any(s.distill is not None for s in specs):
            base["settings"]["teacher"] = teacher  # filled in when the first distillation spec starts
        runs = protocol(setup, specs, cached, save_partial, args.verbose, args.max_extend, teacher)
    rows = summarise(specs, runs, before, settings.seeds, task)
    results = {**base, "before": before, "runs": runs, "rows": rows, "targets": targets(rows),
               "wall_s": time.perf_counter() - started}
    report = render(results)
    print(report)
    (args.out / f"{name}.md").write_text(report + "\n")
    used = {id(r) for r in runs}
    json_path.write_text(json.dumps({**results, "other_runs": [r for r in done if id(r) not in used]}, indent=1)
                         + "\n")
    write_curves(runs, rows, args.out / f"{name}_curves.csv", task)
    plot(results, args.out / f"{name}_accuracy_vs_params.png")
    return results


if __name__ == "__main__":
    main()
