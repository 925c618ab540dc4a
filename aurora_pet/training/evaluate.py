"""Evaluation without training: a recipe's model through LAVIS's runner, or an in-memory model through
the same dataset builder, similarity computation and metrics (for benchmarks that hold the model)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import dataset_section
from .trainer import train


def evaluate(recipe_path: str | Path, options: Sequence[str] = (), *, split: str = "test",
             quiet: bool = True) -> dict[str, float]:
    """LAVIS's evaluation of a recipe's model on ``split`` (no training): ``{"txt_r1": ..., ...}`` for
    retrieval, ``{"agg_metrics": ..., "other": ...}`` for VQA. ``aurora.adapter=<dir>`` in ``options``
    evaluates a saved adapter; without it the wrapped model at initialisation (= the base model).
    ``quiet`` as in ``train``."""
    options = [*options, "run.evaluate=True", "run.valid_splits=[]", f"run.test_splits=[{split}]"]
    result = train(recipe_path, options, quiet=quiet)
    prefix = f"{split}_"
    return {k[len(prefix):]: v for k, v in (result.final or {}).items() if k.startswith(prefix)}


def evaluate_model(model: nn.Module, written: Mapping[str, Any], *, k_test: int, image_size: int,
                   split: str = "test", batch_size: int = 64) -> dict[str, float]:
    """LAVIS's retrieval evaluation of an in-memory model (a LAVIS ``BlipRetrieval``, an ``AuroraModel``
    around one, or anything with its ``compute_sim_matrix``) on a split of ``written`` data: the same
    dataset builder, ``compute_sim_matrix`` (ITC, then ITM re-ranking of the top ``k_test``) and
    ``RetrievalTask`` metrics as a recipe's evaluation (``run.k_test``, the recipe's ``image_size``),
    without a runner."""
    from lavis.common.config import Config
    from lavis.tasks.retrieval import RetrievalTask
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader

    from .lavis_env import import_lavis_registry

    registry = import_lavis_registry()
    section = dataset_section(written, image_size=image_size)
    name = written["builder"]
    cfg = Config.build_dataset_config(OmegaConf.create({"datasets": section})).datasets[name]
    dataset = registry.get_builder_class(name)(cfg).build_datasets()[split]
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    was_training = model.training
    model.eval()
    tmp = tempfile.mkdtemp(prefix="aurora-pet-eval-")
    previous = registry.mapping["paths"].pop("output_dir", None)
    registry.register_path("output_dir", tmp)  # RetrievalTask appends its metrics to evaluate.txt there
    try:
        with torch.no_grad():
            i2t, t2i = model.compute_sim_matrix(loader, task_cfg=OmegaConf.create({"k_test": k_test}))
            metrics = RetrievalTask._report_metrics(i2t, t2i, dataset.txt2img, dataset.img2txt)
    finally:
        registry.mapping["paths"].pop("output_dir", None)
        if previous is not None:
            registry.mapping["paths"]["output_dir"] = previous
        shutil.rmtree(tmp, ignore_errors=True)
        model.train(was_training)
    return {k: float(v) for k, v in metrics.items()}
