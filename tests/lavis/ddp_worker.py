"""One rank of tests/lavis/test_ddp.py, started by `python -m torch.distributed.run --nproc_per_node=2`.

A few optimizer steps of a tiny Aurora-wrapped BLIP retrieval model inside DistributedDataParallel, wrapped
as LAVIS's RunnerBase does (no find_unused_parameters), on gloo/CPU with different data on each rank. Each
rank then saves its adapter and its losses under OUT/<case>/rank<r>/ for the test to compare.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from aurora_pet.families.lavis.build import build_blip
from aurora_pet.families.lavis.wrap import wrap_blip

CAPTIONS = ["a red circle on the left", "two blue squares", "a small green star", "a big yellow triangle",
            "three purple hexagons", "one orange square at the top"]
# (preset, build overrides): negative_all_rank=True takes LAVIS's all_gather_with_grad (GatherLayer) path.
CASES = {"cross-attention": ("cross-attention", {}),
         "reference-all-rank": ("reference", {"negative_all_rank": True})}
BATCH, STEPS = 4, 3  # global batch 8 divides the tiny queue (16)


def samples(rank: int, step: int) -> dict:
    """This rank's batch: its own images, captions and image ids (distinct across ranks and steps)."""
    generator = torch.Generator().manual_seed(1000 * rank + step)
    order = torch.randperm(len(CAPTIONS), generator=generator)[:BATCH].tolist()
    return {"image": torch.randn(BATCH, 3, 32, 32, generator=generator),
            "text_input": [CAPTIONS[i] for i in order],
            "image_id": torch.arange(BATCH) + 100 * rank + 10 * step,
            "epoch": 0, "iters": step, "num_iters_per_epoch": STEPS}


def train(case: str, rank: int, out: Path) -> None:
    preset, overrides = CASES[case]
    torch.manual_seed(0)  # the same base on every rank, as from one checkpoint
    aurora = wrap_blip(build_blip("blip_retrieval", "flickr", size="tiny", **overrides), preset)
    model = DistributedDataParallel(aurora)  # as RunnerBase: no find_unused_parameters
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-3)
    torch.manual_seed(rank)  # ITM negative sampling and dropout differ per rank, as in real runs
    losses = []
    for step in range(STEPS):
        optimizer.zero_grad()
        loss = model(samples(rank, step)).loss
        loss.backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, f"rank {rank} step {step}: no gradient for {missing}"
        optimizer.step()
        losses.append(loss.item())
    aurora.save_pretrained(out / case / f"rank{rank}")
    (out / case / f"rank{rank}" / "losses.json").write_text(json.dumps(losses))


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for case in CASES:
        train(case, rank, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
