"""Process set-up around LAVIS's runner: the process group, seeds, and LAVIS's CUDA-only spots.

LAVIS 1.0.2 assumes CUDA + NCCL in a few places. Each is handled here, for the duration of one run,
without editing LAVIS:

- ``init_distributed_mode`` hard-codes ``backend="nccl"`` and ``torch.cuda.set_device``:
  ``distributed()`` below does the same job with gloo on CPU and NCCL on GPU. A single process (no
  ``RANK``/``WORLD_SIZE`` in the environment) still gets a one-process group, because LAVIS calls
  ``dist.barrier()`` and ``get_world_size()`` unguarded (the runner's epoch loop, BLIP retrieval with
  ``negative_all_rank``); LAVIS's own train.py is always launched by torchrun for the same reason.
- ``SmoothedValue.synchronize_between_processes`` all-reduces a tensor made on ``"cuda"``: on a gloo
  group the same reduction runs on a CPU tensor.
- ``PrefetchLoader`` creates a ``torch.cuda.Stream`` and ``BaseTask.evaluation`` moves batches to CUDA
  by default: the runner (``runner.py``) passes CPU-friendly equivalents when ``run.device`` is CPU.
"""

from __future__ import annotations

import builtins
import contextlib
import datetime
import os
import random
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.distributed as dist



def import_lavis_registry():
    """Import LAVIS's models, builders, processors, tasks and runners so its registry is filled
    (what LAVIS's train.py does with its star imports); return the registry."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        import lavis.datasets.builders  # noqa: F401
        import lavis.models  # noqa: F401
        import lavis.processors  # noqa: F401
        import lavis.runners  # noqa: F401
        import lavis.tasks  # noqa: F401
        import lavis.common.optims  # noqa: F401  (registers the LR schedulers)
        import aurora_pet.families.lavis.video  # noqa: F401  (video models, processors, builders, video_qa task)
        from lavis.common.registry import registry
    return registry


def _gloo_synchronize(self) -> None:
    """``SmoothedValue.synchronize_between_processes`` with the tensor on the group's device."""
    from lavis.common import dist_utils

    if not dist_utils.is_dist_avail_and_initialized():
        return
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([self.count, self.total], dtype=torch.float64, device=device)
    dist.barrier()
    dist.all_reduce(t)
    t = t.tolist()
    self.count = int(t[0])
    self.total = t[1]


@contextlib.contextmanager
def distributed(run_cfg) -> Iterator[None]:
    """Join (under torchrun) or create (single process) the process group for one run; fills
    ``run_cfg.distributed/rank/world_size/gpu/dist_backend`` as LAVIS's ``init_distributed_mode`` does."""
    from lavis.common.dist_utils import setup_for_distributed
    from lavis.common.logger import SmoothedValue

    from .recipe import RecipeError

    device = torch.device(str(run_cfg.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError("run.device is 'cuda' but no GPU is available here; pass --options run.device=cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    owned, tmpdir, original_print = False, None, builtins.print
    if dist.is_available() and dist.is_initialized():  # a caller set the group up: use it as it is
        rank, world, local = dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
        backend = dist.get_backend()
    elif launched:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", 0))
        if device.type == "cuda":
            torch.cuda.set_device(local)
        print(f"| distributed init (rank {rank}, world {world}, {backend}): {run_cfg.get('dist_url', 'env://')}",
              flush=True)
        dist.init_process_group(backend=backend, init_method=str(run_cfg.get("dist_url", "env://")),
                                world_size=world, rank=rank, timeout=datetime.timedelta(days=365))
        owned = True
        dist.barrier()
        setup_for_distributed(rank == 0)
    else:
        rank, world, local = 0, 1, 0
        if device.type == "cuda":
            torch.cuda.set_device(device.index or 0)
            local = device.index or 0
        tmpdir = tempfile.mkdtemp(prefix="aurora-pet-pg-")
        dist.init_process_group(backend=backend, init_method=f"file://{Path(tmpdir, 'store')}",
                                world_size=1, rank=0)
        owned = True
    run_cfg.distributed = launched
    run_cfg.rank, run_cfg.world_size, run_cfg.gpu, run_cfg.dist_backend = rank, world, local, backend
    patches = [mock.patch.object(SmoothedValue, "synchronize_between_processes", _gloo_synchronize)] \
        if backend != "nccl" else []
    try:
        with contextlib.ExitStack() as stack:
            for patch in patches:
                stack.enter_context(patch)
            yield
    finally:
        builtins.print = original_print
        if owned and dist.is_initialized():
            dist.destroy_process_group()
        if tmpdir:
            for file in Path(tmpdir).glob("*"):
                file.unlink(missing_ok=True)
            os.rmdir(tmpdir)


def setup_seeds(run_cfg) -> None:
    """As LAVIS's train.py: seed + rank for python, numpy and torch; deterministic cuDNN."""
    from lavis.common.dist_utils import get_rank

    seed = int(run_cfg.seed) + get_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
