"""The training loop of the transformers family: epochs of AdamW steps under accelerate (one process or
several, mixed precision), a checkpoint after every epoch's training, evaluation, exact resume, metrics.

It is ``AuroraRunner``'s loop (``runner.py``) without LAVIS, writing the same files through the same modules
(checkpoints: ``run_state``; metrics and plot: ``metrics``), with LAVIS's optimizer and schedule:

- AdamW, β = (0.9, ``beta2``), weight decay on matrices only (not on 1-d, ``bias``, ``ln`` or ``bn``
  parameters), over every trainable parameter: the adapter, the heads, the retrieval loss's temperature;
- ``linear_warmup_cosine_lr``, set before every step: epoch 0 warms up linearly from ``warmup_lr`` over
  ``warmup_steps`` steps, epoch e ≥ 1 uses ``min_lr + (init_lr − min_lr)·½(1 + cos(π e / max_epoch))``.

Losses: retrieval trains ``BlipRetrievalLoss`` (ITC + ITM with hard negatives, ``families.hf.retrieval``),
VQA the model's own ``labels`` loss. Data order: each epoch's permutation comes from (seed, epoch), each
process takes its share, an incomplete last batch is dropped. Dropout, augmentation and hard negatives draw
from the global RNGs, which every checkpoint carries for every rank: a resumed run continues bit for bit.
Evaluation runs on the main process, the other processes waiting, with the factors merged (``hf_eval``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from ..model import AuroraModel
from . import run_state as ckpt
from .data import SplitData
from .hf_data import Collate, build_dataset, image_transform, text_cleaner
from .hf_eval import evaluate_split
from .hf_model import LoadedModel
from .hf_recipe import HFRecipe
from .lavis_env import barrier, gather_rng_states, set_rng_state
from .metrics import flatten, plot_metrics, write_metrics

__all__ = ["HFRunner", "VQALoss", "learning_rate"]


class VQALoss(nn.Module):
    """The model's own answer loss (``labels``), as a module that owns the model, like the retrieval loss."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                decoder_input_ids: torch.Tensor, decoder_attention_mask: torch.Tensor, labels: torch.Tensor) -> Any:
        return self.model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                          decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
                          labels=labels)


def learning_rate(run_cfg: Any, epoch: int, step: int) -> float:
    """LAVIS's ``linear_warmup_cosine_lr`` at (epoch, step) (see the module doc)."""
    init_lr, min_lr = float(run_cfg.init_lr), float(run_cfg.min_lr)
    if epoch == 0:
        start = float(run_cfg.warmup_lr) if float(run_cfg.warmup_lr) >= 0 else init_lr
        return min(init_lr, start + (init_lr - start) * step / max(int(run_cfg.warmup_steps), 1))
    return (init_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / int(run_cfg.max_epoch))) + min_lr


class HFRunner:
    """One run of an hf recipe: ``run()`` trains (or, with ``run.evaluate``, only evaluates) and tests.

    ``splits`` are the dataset's splits as ``data.read_datasets`` read them; ``resume_from`` is the checkpoint
    to continue from. After ``run()``: ``history`` (a metrics row per epoch), ``final`` (the test metrics),
    ``final_weights`` (``<output_dir>/adapter``), ``plot_path``; main process only."""

    def __init__(self, recipe: HFRecipe, loaded: LoadedModel, splits: dict[str, SplitData], accelerator: Any, *,
                 resume_from: Path | None = None, title: str = "") -> None:
        self.recipe, self.run_cfg, self.loaded, self.model = recipe, recipe.run_cfg, loaded, loaded.model
        self.splits, self.accelerator, self.resume_from, self.title = splits, accelerator, resume_from, title
        self.output_dir = Path(str(self.run_cfg.output_dir))
        self.store = ckpt.CheckpointStore(self.output_dir)
        self.fingerprint = recipe.fingerprint()
        self.evaluate_only = bool(self.run_cfg.evaluate)
        self.progress = bool(self.run_cfg.progress) and accelerator.is_main_process
        self.collate = Collate(loaded.tokenizer, int(recipe.model["max_txt_len"]), recipe.task,
                               bos_token_id=loaded.bos_token_id, enc_token_id=loaded.enc_token_id)
        self.start_epoch, self.best_epoch, self.best_agg_metric = 0, None, -math.inf
        self.history: list[dict[str, Any]] = []
        self.final: dict[str, Any] | None = None
        self.final_weights: Path | None = None
        self.plot_path: Path | None = None
        self.epoch_callback: Callable[[dict[str, Any], int], None] | None = None  # main process, each epoch's row
        self.criterion = self._criterion()
        # set by _prepare_training (not in evaluate-only runs): the criterion under accelerate (DDP), its
        # optimizer, the epoch sampler and the training loader
        self.wrapped: nn.Module | None = None
        self.optimizer: Any = None
        self.sampler: DistributedSampler | None = None
        self.loader: DataLoader | None = None

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def aurora(self) -> bool:
        return isinstance(self.model, AuroraModel)

    # -- set-up ----------------------------------------------------------------------------------
    def _criterion(self) -> nn.Module:
        if self.recipe.task == "retrieval":
            from ..families.hf.retrieval import BlipRetrievalLoss

            return BlipRetrievalLoss(self.model, temperature=float(self.recipe.model["temperature"]),
                                     itm_token_id=self.loaded.enc_token_id)
        return VQALoss(self.model)

    def _dataset(self, split: str, train: bool) -> Dataset:
        """A split's dataset with the recipe's training or evaluation processors."""
        cfg = self.recipe.datasets[self.splits[split].builder]
        kind = "train" if train else "eval"
        image = image_transform((cfg.get("vis_processor") or {}).get(kind), self.loaded.image_size,
                                self.loaded.image_mean, self.loaded.image_std)
        return build_dataset(self.splits[split], self.recipe.task, image,
                             text_cleaner((cfg.get("text_processor") or {}).get(kind), self.recipe.task))

    def _prepare_training(self) -> None:
        """The optimizer (LAVIS's parameter groups), the model and optimizer under accelerate, the loader."""
        decay, no_decay = [], []
        for name, parameter in self.criterion.named_parameters():
            if parameter.requires_grad:
                plain = parameter.ndim < 2 or any(part in name for part in ("bias", "ln", "bn"))
                (no_decay if plain else decay).append(parameter)
        run = self.run_cfg
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": float(run.weight_decay)},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=float(run.init_lr),
                                      weight_decay=float(run.weight_decay), betas=(0.9, float(run.beta2)))
        self.wrapped, self.optimizer = self.accelerator.prepare(self.criterion, optimizer)
        datasets = [self._dataset(split, train=True) for split in run.train_splits]
        dataset = datasets[0] if len(datasets) == 1 else torch.utils.data.ConcatDataset(datasets)
        self.sampler = DistributedSampler(dataset, num_replicas=self.accelerator.num_processes,
                                          rank=self.accelerator.process_index, shuffle=True, seed=int(run.seed),
                                          drop_last=True)
        self.loader = DataLoader(dataset, batch_size=int(run.batch_size_train), sampler=self.sampler, drop_last=True,
                                 num_workers=int(run.num_workers), collate_fn=self.collate)

    # -- the loop --------------------------------------------------------------------------------
    def run(self) -> None:
        pending = None  # an epoch trained before the interruption but not evaluated: its metrics row so far
        if not self.evaluate_only:
            self._prepare_training()
            if self.resume_from is not None:
                pending = self._resume(self.resume_from)
        max_epoch = int(self.run_cfg.max_epoch)
        cur_epoch = self.start_epoch - 1
        for cur_epoch in range(self.start_epoch, max_epoch):
            record: dict[str, Any] = {"epoch": cur_epoch}
            if pending is not None:
                record, pending = pending, None
            elif not self.evaluate_only:
                record.update(self._train_epoch(cur_epoch))
                self._save_epoch(cur_epoch, record)  # before the evaluation, which may fail: the training is kept
            for split in self.run_cfg.valid_splits:
                metrics = self._evaluate(split)
                if self.main:
                    better = metrics.get("agg_metrics", -math.inf) > self.best_agg_metric
                    if better and split == "val" and not self.evaluate_only:
                        self.best_epoch, self.best_agg_metric = cur_epoch, metrics["agg_metrics"]
                        self._save_best(cur_epoch, metrics)
                    record.update(flatten(split, {**metrics, "best_epoch": self.best_epoch}))
            if self.evaluate_only:
                break
            self.history.append(record)
            self._save_evaluation(cur_epoch)
            if self.epoch_callback is not None and self.main:
                self.epoch_callback(record, max_epoch)
            barrier()
        self._share_best()
        test_epoch = "best" if self.run_cfg.valid_splits and self.best_epoch is not None else cur_epoch
        if test_epoch == "best" and not self.evaluate_only:  # every rank: they all return the model
            ckpt.load_weights(self.model, self.store.best_dir)
        if self.main:
            test = {split: self._evaluate(split) for split in self.run_cfg.test_splits}
            self._finish(test_epoch, test)
        barrier()

    def _share_best(self) -> None:
        """The main process chose the best epoch; every rank loads it for the test (a collective call)."""
        if self.accelerator.num_processes > 1:
            shared = [self.best_epoch, self.best_agg_metric]
            torch.distributed.broadcast_object_list(shared, src=0)
            self.best_epoch, self.best_agg_metric = shared

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        """One epoch of steps; the mean loss over the steps of every process, and the last learning rate."""
        self.sampler.set_epoch(epoch)
        self.wrapped.train()
        device, total, lr = self.accelerator.device, torch.zeros((), device=self.accelerator.device), 0.0
        steps = tqdm(self.loader, desc=f"epoch {epoch}", disable=not self.progress, leave=False, dynamic_ncols=True)
        for step, batch in enumerate(steps):
            lr = learning_rate(self.run_cfg, epoch, step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss = self.wrapped(**{k: v.to(device) for k, v in batch.items()}).loss
            self.accelerator.backward(loss)
            self.optimizer.step()
            self.optimizer.zero_grad()
            total += loss.detach().float()
            steps.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
        mean = self.accelerator.reduce(total / max(len(self.loader), 1), "mean")
        return {"train_loss": float(mean), "train_lr": lr}

    def _evaluate(self, split: str) -> dict[str, float]:
        """A split's metrics (main process; the others get {} at once and wait at the next barrier)."""
        if not self.main:
            return {}
        with self.accelerator.autocast():
            return evaluate_split(self.model, self._dataset(split, train=False), self.collate, self.run_cfg,
                                  result_dir=self.output_dir / "result", device=self.accelerator.device,
                                  progress=self.progress)

    def _finish(self, test_epoch: int | str, test: dict[str, dict[str, float]]) -> None:
        self.final = {"epoch": test_epoch, "best_epoch": self.best_epoch}
        for split, metrics in test.items():
            self.final.update(flatten(split, metrics))
        if self.evaluate_only:
            write_metrics(self.output_dir, [], self.final)
            return
        source = self.store.best_dir if test_epoch == "best" else self.store.latest()
        if source is not None:
            self.final_weights = self.store.export(source, self.output_dir / ("adapter" if self.aurora else "model"))
        write_metrics(self.output_dir, self.history, self.final)
        if self.run_cfg.plot:
            self.plot_path = plot_metrics(self.output_dir, self.history, self.final, self.title, task=self.recipe.task)

    # -- checkpoints -----------------------------------------------------------------------------
    def _own_parameters(self) -> dict[str, torch.Tensor]:
        """The loss module's own trainable tensors (the retrieval temperature): not part of the adapter."""
        return {name: parameter for name, parameter in self.criterion.named_parameters()
                if not name.startswith("model.")}

    def _save_epoch(self, epoch: int, record: dict[str, Any]) -> None:
        """The trained epoch's checkpoint, then ``latest.json`` (collective: gathers every rank's RNG state)."""
        rng = gather_rng_states()
        if not self.main:
            return
        scaler = self.accelerator.scaler
        state = {
            "epoch": epoch, "optimizer": self.optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "loss": {k: v.detach().cpu().clone() for k, v in self._own_parameters().items()},
            "lr_sched": {k: self.run_cfg[k] for k in ("lr_sched", "init_lr", "min_lr", "max_epoch")},
            "rng": rng, "world_size": self.accelerator.num_processes,
            "best_epoch": self.best_epoch, "best_agg_metric": self.best_agg_metric,
            "history": self.history, "record": record, "fingerprint": self.fingerprint,
        }

        def write(directory: Path) -> None:
            ckpt.save_weights(self.model, directory)
            ckpt.save_state(directory, state)
            ckpt.save_resume_tensors(self.model, directory)

        path = self.store.commit(f"epoch_{epoch}", write)
        self.store.set_latest(path, epoch)
        self.store.prune_resume_states(keep=path)

    def _save_best(self, epoch: int, metrics: dict[str, float]) -> None:
        def write(directory: Path) -> None:
            ckpt.save_weights(self.model, directory)
            ckpt.save_state(directory, {"epoch": epoch, "metrics": {k: float(v) for k, v in metrics.items()},
                                        "fingerprint": self.fingerprint})

        self.store.commit("best", write)

    def _save_evaluation(self, epoch: int) -> None:
        """The evaluated epoch's best metric, history and RNG, added to its checkpoint; the metrics files
        (collective: gathers every rank's RNG state, which the evaluation's loaders advanced)."""
        rng = gather_rng_states()
        if not self.main:
            return
        ckpt.add_evaluation(self.store.epoch_dir(epoch), {
            "rng": rng, "best_epoch": self.best_epoch, "best_agg_metric": self.best_agg_metric,
            "history": self.history})
        write_metrics(self.output_dir, self.history)

    def _resume(self, directory: Path) -> dict[str, Any] | None:
        """Weights, optimizer, scaler, the loss's temperature, RNG, best metric and history. Returns the metrics
        row of an epoch that was trained but not evaluated (it is evaluated next), else None."""
        state = ckpt.load_state(directory)
        ckpt.check_fingerprint(directory, state.get("fingerprint"), self.fingerprint)
        ckpt.load_weights(self.model, directory)
        ckpt.load_resume_tensors(self.model, directory)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.accelerator.scaler is not None and state.get("scaler"):
            self.accelerator.scaler.load_state_dict(state["scaler"])
        with torch.no_grad():
            for name, parameter in self._own_parameters().items():
                parameter.copy_(state["loss"][name])
        rngs = state.get("rng") or []
        if state.get("world_size") != self.accelerator.num_processes and self.main:
            print(f"warning: resuming a {state.get('world_size')}-process run with {self.accelerator.num_processes} "
                  "processes: data order and random draws will differ from an uninterrupted run")
        if self.accelerator.process_index < len(rngs):
            set_rng_state(rngs[self.accelerator.process_index])
        self.best_epoch = state.get("best_epoch")
        best = state.get("best_agg_metric")
        self.best_agg_metric = -math.inf if best is None else float(best)
        self.history = list(state.get("history") or [])
        epoch = int(state["epoch"])
        if state["evaluated"]:
            self.start_epoch = epoch + 1
            if self.main:
                print(f"resumed from {directory} (epoch {epoch} done; continuing at epoch {self.start_epoch})")
            return None
        self.start_epoch = epoch
        if self.main:
            print(f"resumed from {directory} (epoch {epoch} trained, not evaluated: evaluating it, then continuing)")
        return dict(state["record"])
