"""``train()`` for recipes of the transformers family (``family: hf``): what ``trainer.train`` is for LAVIS's.

The steps: recipe → accelerate (process group, device, mixed precision) → the output directory locked and
the checkpoint to resume chosen (``trainer``'s rules, shared) → seeds → the data read and checked up front
(``data.read_datasets``, ``check_split_sizes``: the same errors as the LAVIS recipes) → the model
(``hf_model``) and, with a ``distill:`` section, its teacher → ``HFRunner.run()`` (``hf_loop``). Runs in this
process, or in each process of a ``torchrun`` / ``accelerate launch`` launch.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import run_state as ckpt
from .data import SplitData, check_split_sizes, read_datasets
from .hf_recipe import HFRecipe, load_hf_recipe
from .processes import main_process_result, process_state_restored
from .recipe import RecipeError, recipe_yaml
from .result import TrainResult, print_parameter_report, print_summary

__all__ = ["train"]


def train(cfg_path: str | Path, options: Sequence[str] | None = None, *, resume: bool = False, quiet: bool = False,
          epoch_callback: Callable[[dict[str, Any], int], None] | None = None,
          teacher: torch.nn.Module | None = None) -> TrainResult:
    """Train (and evaluate) one hf recipe; ``resume`` continues from the run's latest checkpoint.

    ``quiet`` leaves out the parameter table and the summary; ``epoch_callback(row, max_epoch)`` is called on
    the main process after each epoch with its metrics. ``teacher`` is the teacher model of a ``distill:``
    section whose ``teacher`` is null (a model built in memory); otherwise the teacher is loaded from
    ``distill.teacher``. Raises ``RecipeError`` / ``DataError`` / ``ResumeError`` naming the offending key,
    file or difference before anything is trained or written. The caller's RNG states are as they were
    afterwards.
    """
    from accelerate.utils import set_seed

    from .hf_loop import HFRunner
    from .hf_model import check_source, load_model, load_teacher

    recipe = load_hf_recipe(cfg_path, options)
    distilling = recipe.distill is not None and not recipe.run_cfg.evaluate
    if distilling:  # a missing or wrong teacher stops the run before the output directory is touched
        if teacher is not None and recipe.distill.teacher:
            raise RecipeError(f"{recipe.path}: distill.teacher={recipe.distill.teacher} and a teacher model were "
                              "both given; set distill.teacher to null to use the model passed in")
        if teacher is None and not recipe.distill.teacher:
            raise RecipeError(f"{recipe.path}: distill.teacher is required: the directory of the teacher "
                              f"{recipe.model_class} written by save_pretrained, with its processor")
        if teacher is None:
            check_source(recipe.distill.teacher, recipe.model_class, "distill.teacher")
    run_cfg = recipe.run_cfg
    output_dir = Path(str(run_cfg.output_dir)).expanduser().absolute()
    run_cfg.output_dir = str(output_dir)
    if recipe.adapter:
        ckpt.check_adapter_config(Path(recipe.adapter), recipe.aurora.to_dict() if recipe.aurora else None)
    with process_state_restored(), _accelerator(run_cfg) as accelerator, contextlib.ExitStack() as held:
        main = accelerator.is_main_process
        resume_from = main_process_result(lambda: ckpt.claim_output_dir(recipe, output_dir, resume, held))
        set_seed(int(run_cfg.seed) + accelerator.process_index)
        splits = main_process_result(lambda: _read_data(recipe, accelerator.num_processes))
        loaded = load_model(recipe)
        if distilling and teacher is None:
            teacher = load_teacher(recipe, loaded)
        if recipe.adapter:
            loaded.model.load_adapter(Path(recipe.adapter))
            if main:
                print(f"loaded the adapter {recipe.adapter}")
        report = print_parameter_report(loaded.model, quiet or not main)
        runner = HFRunner(recipe, loaded, splits, accelerator, resume_from=resume_from,
                          title=f"{recipe.path.stem}: {recipe.model_class}", teacher=teacher if distilling else None)
        runner.epoch_callback = epoch_callback
        if main:
            (output_dir / "recipe.yaml").write_text(recipe_yaml(recipe.raw))
        runner.run()
        result = TrainResult(output_dir=output_dir, weights_dir=runner.final_weights, plot=runner.plot_path,
                             history=runner.history, final=runner.final, parameter_report=report,
                             model=loaded.model, resumed_from=resume_from)
    if main and not quiet:
        print_summary(result)
    return result


@contextlib.contextmanager
def _accelerator(run_cfg: Any) -> Iterator[Any]:
    """accelerate's ``Accelerator`` for the run: joins a launch's process group (gloo on the CPU) or runs alone;
    the group it created is destroyed after, and accelerate's process-wide state is reset, so that another run
    in this process may choose other settings."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    cpu = run_cfg.device == "cpu"
    if not cpu and not torch.cuda.is_available():
        raise RecipeError("run.device is 'cuda' but no GPU is available here; pass --options run.device=cpu")
    if cpu and run_cfg.mixed_precision == "fp16":
        raise RecipeError("run.mixed_precision=fp16 needs a GPU; use bf16 on the CPU")
    owned = not (dist.is_available() and dist.is_initialized())
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=bool(run_cfg.find_unused_parameters)),
                InitProcessGroupKwargs(timeout=datetime.timedelta(days=365))]  # ranks wait out the evaluation
    accelerator = Accelerator(cpu=cpu, mixed_precision=str(run_cfg.mixed_precision), kwargs_handlers=handlers)
    try:
        yield accelerator
    finally:
        if owned and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        AcceleratorState._reset_state(reset_partial_state=True)  # accelerate keeps its settings process-wide


def _read_data(recipe: HFRecipe, world_size: int) -> dict[str, SplitData]:
    """The dataset's splits, read and checked (main process only: every image is opened)."""
    run_cfg = recipe.run_cfg
    (name, splits), = read_datasets(recipe.datasets, str(run_cfg.data_root),
                                    progress=bool(run_cfg.progress)).items()
    wanted = [] if run_cfg.evaluate else list(run_cfg.train_splits)
    wanted += [*run_cfg.valid_splits, *run_cfg.test_splits]
    missing = sorted(set(wanted) - set(splits))
    if missing:
        raise RecipeError(f"run names the split(s) {', '.join(missing)}, but datasets.{name}.build_info.annotations "
                          f"has {', '.join(splits)}")
    check_split_sizes({name: {split: data.size for split, data in splits.items()}}, run_cfg, world_size)
    return splits
