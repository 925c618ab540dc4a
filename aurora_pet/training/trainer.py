"""``train()``: LAVIS's train.py with the model built offline and wrapped by Aurora.

The steps are LAVIS's (``lavis/train.py``): config → distributed init → seeds → logger → task →
datasets → model → runner → ``runner.train()``. Only the model step differs (``build_model``: our
offline builder, ``load_checkpoint`` with a key report, ``wrap_blip``), the runner is ``AuroraRunner``
(checkpointing, resume, CPU), and before anything trains the main process locks the output directory,
removes what interrupted writes left there and checks the checkpoint to resume, the data and the sizes.
With a ``distill:`` section the teacher is built and loaded before anything trains (``build_teacher``) and the
runner trains with the staged distillation step (``families.lavis.distill.Distiller``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from . import run_state as ckpt
from .recipe import Recipe, RecipeError, load_recipe

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: Path
    weights_dir: Path | None  # the adapter (or, without aurora:, the trained weights) used for the test
    plot: Path | None
    history: list[dict[str, Any]]  # one row per epoch: train_loss, val_/test_ metrics
    final: dict[str, Any] | None  # the final test metrics, "test_<name>"
    parameter_report: dict[str, Any] | None
    model: nn.Module = field(repr=False)  # as after the final evaluation (best weights loaded)
    resumed_from: Path | None = None

    @property
    def main_metric(self) -> float | None:
        return (self.final or {}).get("test_agg_metrics")


def train(cfg_path: str | Path, options: Sequence[str] | None = None, *, resume: bool = False,
          quiet: bool = False, epoch_callback: Callable[[dict[str, Any], int], None] | None = None,
          prepare_model: Callable[[nn.Module], None] | None = None) -> TrainResult:
    """Train (and evaluate) one recipe; ``resume`` continues from the run's latest checkpoint.

    ``quiet`` leaves out the parameter table and the summary; ``epoch_callback(row, max_epoch)`` is called
    on the main process after each epoch's checkpoint with that epoch's metrics (``train_loss``,
    ``val_agg_metrics``, ...). ``prepare_model(lavis_model)`` runs once the LAVIS model is built, its checkpoint
    loaded and the adapter (if any) wrapped, before anything is trained: the hook for comparing other
    methods (LoRA, heads only) through the same runner, as the benchmarks do.

    Runs in this process, or in each process of a ``torchrun`` launch (``RANK``/``WORLD_SIZE`` set).
    Raises ``RecipeError``/``DataError``/``ResumeError`` with the offending key, file or difference
    before anything is trained or written.
    """
    from lavis.common.logger import setup_logger
    from lavis.common.registry import registry

    from .lavis_env import distributed, main_process_result, process_state_restored, setup_seeds
    from .lavis_model import build_model, build_teacher
    from .runner import AuroraRunner

    recipe = load_recipe(cfg_path, options)
    run_cfg = recipe.run_cfg
    output_dir = Path(str(run_cfg.output_dir)).expanduser().absolute()
    run_cfg.output_dir = str(output_dir)
    if recipe.adapter:
        ckpt.check_adapter_config(Path(recipe.adapter), recipe.aurora.to_dict() if recipe.aurora else None)
    with process_state_restored(), distributed(run_cfg), contextlib.ExitStack() as held:
        from lavis.common.dist_utils import get_world_size, is_main_process
        from lavis import tasks

        resume_from = main_process_result(lambda: _claim(recipe, output_dir, resume, held))
        setup_seeds(run_cfg)
        setup_logger()
        recipe.cfg.pretty_print()
        main = is_main_process()
        main_process_result(lambda: _check_data(recipe, registry.get_path("cache_root"), get_world_size()))
        task = tasks.setup_task(recipe.cfg)
        datasets = task.build_datasets(recipe.cfg)
        model, lavis_model, _ = build_model(recipe)
        if not run_cfg.get("evaluate", False):
            _check_queue_size(lavis_model, run_cfg, get_world_size())
        if prepare_model is not None:
            prepare_model(lavis_model)
        report = _report(model, quiet or not main)
        if recipe.adapter:
            adapter = Path(recipe.adapter)
            model.load_adapter(adapter)
            print(f"loaded the adapter {adapter}")
        distiller = None
        if recipe.distill is not None and not run_cfg.get("evaluate", False):
            distiller = _distiller(recipe, model, lavis_model, build_teacher(recipe))
        for key in ("output_dir", "result_dir"):  # LAVIS registers these once per process
            registry.mapping["paths"].pop(key, None)
        runner = AuroraRunner(cfg=recipe.cfg, task=task, model=model, datasets=datasets, job_id="",
                              fingerprint=recipe.fingerprint(), resume_from=resume_from,
                              title=f"{recipe.path.stem}: {recipe.arch}", distiller=distiller)
        runner.epoch_callback = epoch_callback
        if main:
            (output_dir / "recipe.yaml").write_text(_dump(recipe.raw))
        runner.train()
        result = TrainResult(output_dir=output_dir, weights_dir=runner.final_weights, plot=runner.plot_path,
                             history=runner.history, final=runner.final, parameter_report=report,
                             model=runner.unwrap_dist_model(runner.model), resumed_from=resume_from)
    if main and not quiet:
        _print_summary(result)
    return result


def _distiller(recipe: Recipe, model: nn.Module, lavis_model: nn.Module, teacher: nn.Module):
    """The run's distillation step: the heads of an ``AuroraModel`` train in every stage, the rest of what
    trains (the adapter) is frozen in ``align``."""
    from ..families.lavis.distill import Distiller
    from ..model import AuroraModel

    heads = list(model.heads.values()) if isinstance(model, AuroraModel) else []
    return Distiller(recipe.distill, teacher, lavis_model, heads, model, int(recipe.run_cfg.max_epoch),
                     log_freq=int(recipe.run_cfg.get("log_freq", 50)))


def _claim(recipe: Recipe, output_dir: Path, resume: bool, held: contextlib.ExitStack) -> Path | None:
    """Lock the output directory for the run (released when ``held`` closes), remove what interrupted writes
    left there (safe only under the lock), and return the checkpoint to resume from (main process only)."""
    held.enter_context(ckpt.output_lock(output_dir))
    ckpt.CheckpointStore(output_dir).clean_temporaries()
    return _resume_source(recipe, output_dir, resume)


def _resume_source(recipe: Recipe, output_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from; refuses to start over a run that has checkpoints (nothing is lost)."""
    store = ckpt.CheckpointStore(output_dir)
    explicit = recipe.run_cfg.get("resume_ckpt_path")
    if explicit:
        source = Path(str(explicit))
        if not source.is_dir():
            raise RecipeError(f"run.resume_ckpt_path={source}: expected an aurora-pet checkpoint directory "
                              "(<output_dir>/checkpoints/epoch_N); LAVIS's checkpoint_*.pth files hold no adapter")
    elif resume:
        source = store.latest()
        if source is None:
            print(f"--resume: no checkpoint in {store.root} yet; starting from the beginning")
            return None
    else:
        if store.latest() is not None and not recipe.run_cfg.get("evaluate", False):
            raise RecipeError(f"{output_dir} already holds a run (checkpoints up to {store.latest().name}); "
                              "pass --resume to continue it, or set run.output_dir to a new directory")
        return None
    state = ckpt.load_state(source)  # check before anything runs: intact, same configuration
    ckpt.check_fingerprint(source, state.get("fingerprint"), recipe.fingerprint())
    return source


def _check_data(recipe: Recipe, cache_root: str, world_size: int) -> None:
    """Annotation files, images and split sizes (main process only: every image is opened)."""
    from .data import check_datasets, check_split_sizes

    run_cfg = recipe.run_cfg
    sizes = check_datasets(recipe.cfg.datasets_cfg, cache_root, progress=bool(run_cfg.get("progress", True)))
    from ..families.lavis.video_names import NUM_FRAMES, VIDEO_ARCHITECTURES
    from ..video.checks import check_num_frames

    if recipe.arch in VIDEO_ARCHITECTURES:
        check_num_frames(int(recipe.model_settings.get("num_frames", NUM_FRAMES)), recipe.cfg.datasets_cfg)
    check_split_sizes(sizes, run_cfg, world_size)


def _check_queue_size(model: nn.Module, run_cfg, world_size: int) -> None:
    """BLIP retrieval's feature queue advances by one global batch per step and LAVIS asserts that it divides
    the queue, after the first steps; checked here instead, before anything trains."""
    queue = getattr(model, "queue_size", None)
    batch = int(run_cfg.batch_size_train) * world_size
    if queue is not None and queue % batch:
        raise RecipeError(f"model.queue_size={queue} is not a multiple of the global batch size {batch} "
                          f"(run.batch_size_train={run_cfg.batch_size_train} x {world_size} process(es)); "
                          f"use e.g. model.queue_size={max(batch, queue - queue % batch)}")


def _report(model: nn.Module, quiet: bool) -> dict[str, Any] | None:
    from ..model import AuroraModel
    from ..report import format_report

    if not isinstance(model, AuroraModel):
        if not quiet:
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            print(f"full fine-tuning (no aurora: section): {trainable:,} trainable parameters")
        return None
    report = model.parameter_report()
    if not quiet:
        print(format_report(report))
    return report


def _dump(data: dict[str, Any]) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(data))


def _print_summary(result: TrainResult) -> None:
    print(f"output: {result.output_dir}")
    if result.final:
        metrics = {k: v for k, v in result.final.items() if k != "epoch"}
        print("final evaluation (" + str(result.final.get("epoch")) + "): "
              + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    if result.weights_dir:
        print(f"weights: {result.weights_dir}")
    if result.plot:
        print(f"plot: {result.plot}")
