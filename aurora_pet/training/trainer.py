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
from pathlib import Path
from typing import Any

from torch import nn

from . import run_state as ckpt
from .recipe import Recipe, RecipeError, load_recipe, recipe_yaml
from .result import TrainResult, print_parameter_report, print_summary

log = logging.getLogger(__name__)


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

    from .lavis_env import distributed, setup_seeds
    from .processes import main_process_result, process_state_restored
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

        resume_from = main_process_result(lambda: ckpt.claim_output_dir(recipe, output_dir, resume, held))
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
        report = print_parameter_report(model, quiet or not main)
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
            (output_dir / "recipe.yaml").write_text(recipe_yaml(recipe.raw))
        runner.train()
        result = TrainResult(output_dir=output_dir, weights_dir=runner.final_weights, plot=runner.plot_path,
                             history=runner.history, final=runner.final, parameter_report=report,
                             model=runner.unwrap_dist_model(runner.model), resumed_from=resume_from)
    if main and not quiet:
        print_summary(result)
    return result


def _distiller(recipe: Recipe, model: nn.Module, lavis_model: nn.Module, teacher: nn.Module):
    """The run's distillation step: the heads of an ``AuroraModel`` train in every stage, the rest of what
    trains (the adapter) is frozen in ``align``."""
    from ..families.lavis.distill import Distiller
    from ..model import AuroraModel

    heads = list(model.heads.values()) if isinstance(model, AuroraModel) else []
    return Distiller(recipe.distill, teacher, lavis_model, heads, model, int(recipe.run_cfg.max_epoch),
                     log_freq=int(recipe.run_cfg.get("log_freq", 50)))


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


