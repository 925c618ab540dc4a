"""Process-level state of a training run, the same for both model families: leaving the caller's process as it
was, RNG states for exact resume, and collectives that are no-ops in a single process."""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Callable, Iterator
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

from ..errors import AuroraError

__all__ = ["barrier", "gather_rng_states", "main_process_result", "process_state_restored", "rng_state",
           "set_rng_state"]

T = TypeVar("T")


@contextlib.contextmanager
def process_state_restored() -> Iterator[None]:
    """A run seeds every RNG (LAVIS's train.py and accelerate's ``set_seed`` do) and LAVIS configures the root
    logger; a library call must not leave either changed for its caller: the RNG states, cuDNN flags and the root logger's
    handlers and level are put back when the run ends."""
    python, numpy_state = random.getstate(), np.random.get_state()
    cudnn = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if torch.cuda.is_initialized()
                                   else []):
            yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy_state)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = cudnn
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)


# -- RNG state, for exact resume -------------------------------------------------------------------

def rng_state() -> dict:
    """This process's RNG states as tensors and plain values (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuples(state["python"]))
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def gather_rng_states() -> list[dict]:
    """Every rank's RNG state, on every rank (a collective call)."""
    state = rng_state()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def main_process_result(compute: Callable[[], T]) -> T:
    """``compute()`` on the main process only, its result or error shared with every rank: no rank repeats the
    work, and none goes on to wait in a collective for a main process that stopped (a collective call)."""
    shared = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    main = not shared or dist.get_rank() == 0
    result, error = None, None
    if main:
        try:
            result = compute()
        except Exception as caught:  # noqa: BLE001  (re-raised below, on every rank)
            error = caught
    if shared:
        sent = error if error is None or isinstance(error, AuroraError) else RuntimeError(
            f"the main process failed: {error!r}")  # an arbitrary exception may not pickle
        outcome = [result, sent]
        dist.broadcast_object_list(outcome, src=0)
        if not main:
            result, error = outcome
    if error is not None:
        raise error
    return result
