"""``AuroraRunner``: LAVIS's ``RunnerBase`` with aurora-pet's checkpointing, resume, metrics and CPU support.

Everything that trains and evaluates is LAVIS's: the optimizer (AdamW over the trainable parameters,
weight decay on matrices), the LR scheduler, the dataloaders, ``task.train_epoch``,
``task.evaluation`` (retrieval: ITC similarities re-ranked by the ITM head over the top ``k_test``;
VQA: answer ranking and the official VQA accuracy) and ``task.after_evaluation``. What is overridden:

- ``model``: DDP with ``device_ids=None`` on CPU (gloo); LAVIS passes ``[gpu]`` and returns ``None``
  for a model that is already on its device;
- ``create_loaders``: on CPU, LAVIS's ``PrefetchLoader`` (a CUDA stream) is replaced by a plain pass-through;
- ``_save_checkpoint`` / ``_reload_best_model`` / resume: adapter-only checkpoints, atomic, with the
  training state (see ``run_state.py``) instead of LAVIS's ``checkpoint_*.pth`` of every trainable
  tensor and no RNG state;
- ``train``: LAVIS's epoch loop, plus a checkpoint after every epoch's training, written before the epoch
  is evaluated (LAVIS saves only a new best when there are validation splits) and completed by the
  evaluation's results, the best metric and history restored on resume (LAVIS restarts them from 0; an
  epoch whose evaluation was interrupted is evaluated first), metrics files and a plot, and no
  checkpoint writes in evaluate-only mode;
- with a ``distiller`` (a recipe's ``distill:`` section): the task's ``train_step`` is the distiller's for this
  run (LAVIS's loop, optimizer and logging around it unchanged), each epoch enters the stage its number gives
  (resume-safe), and the epoch's loss parts join its metrics row (``train_stage``, ``train_loss_task``,
  ``train_loss_itc``, ...).
"""

from __future__ import annotations

import datetime
import functools
import logging
import math
import time
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from lavis.common.dist_utils import get_world_size, is_main_process
from lavis.runners import runner_base
from lavis.runners.runner_base import RunnerBase
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from ..model import AuroraModel
from . import run_state as ckpt
from .processes import barrier, gather_rng_states, set_rng_state
from .metrics import flatten, plot_metrics, write_metrics

log = logging.getLogger(__name__)


class _HostLoader:
    """``PrefetchLoader`` without CUDA: iterates the wrapped loader lazily, forwards its attributes."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def __iter__(self):
        yield from self.loader

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)


class _ProgressLoader(_HostLoader):
    """A loader that shows a tqdm bar while it is iterated (LAVIS prints nothing in that pass)."""

    def __init__(self, loader, desc: str, enabled: bool) -> None:
        super().__init__(loader)
        self.desc, self.enabled = desc, enabled

    def __iter__(self):
        yield from tqdm(self.loader, desc=self.desc, total=len(self.loader), disable=not self.enabled,
                        leave=False, dynamic_ncols=True)


class AuroraRunner(RunnerBase):
    def __init__(self, cfg, task, model, datasets, job_id: str = "", *, fingerprint: dict[str, Any],
                 resume_from: Path | None = None, title: str = "", distiller: Any = None) -> None:
        super().__init__(cfg, task, model, datasets, job_id)
        self.distiller = distiller  # families.lavis.distill.Distiller, or None
        if distiller is not None:
            self.task.train_step = distiller.train_step  # this task instance only: LAVIS's class is untouched
        self.store = ckpt.CheckpointStore(self.output_dir)
        self.fingerprint = fingerprint
        self.resume_from = resume_from
        self.title = title
        self.best_agg_metric = -math.inf
        self.best_epoch: int | None = None
        self.history: list[dict[str, Any]] = []
        self.final: dict[str, Any] | None = None
        self.final_weights: Path | None = None
        self.plot_path: Path | None = None
        self.epoch_callback = None  # called on the main process with each epoch's metrics row
        self._wrap_evaluation()

    # -- LAVIS's CUDA assumptions ----------------------------------------------------------------
    @property
    def model(self):
        if self._wrapped_model is None:
            self._model = self._model.to(self.device)
            if self.use_distributed:
                device_ids = [self.config.run_cfg.gpu] if self.device.type == "cuda" else None
                # an align stage freezes the adapter mid-run: its parameters then get no gradient
                frozen_stage = self.distiller is not None and self.distiller.freezes_adapter
                self._wrapped_model = DDP(self._model, device_ids=device_ids, find_unused_parameters=bool(
                    self.config.run_cfg.get("find_unused_parameters", False)) or frozen_stage)
            else:
                self._wrapped_model = self._model
        return self._wrapped_model

    def create_loaders(self, *args, **kwargs):
        if self.cuda_enabled:
            return super().create_loaders(*args, **kwargs)
        with mock.patch.object(runner_base, "PrefetchLoader", _HostLoader):
            return super().create_loaders(*args, **kwargs)

    def _wrap_evaluation(self) -> None:
        """Evaluation on the run's device (LAVIS's ``BaseTask.evaluation`` defaults to CUDA), with a
        progress bar over the image pass of retrieval evaluation, and with the factors merged into the weights
        (base-model speed; the exact weights are restored afterwards, see
        ``AuroraModel.temporarily_merged``)."""
        original = self.task.evaluation
        cuda = self.cuda_enabled
        progress = bool(self.config.run_cfg.get("progress", True)) and is_main_process()
        retrieval = self.config.run_cfg.task == "retrieval"

        @functools.wraps(original)
        def evaluation(model, data_loader, **kwargs):
            kwargs.setdefault("cuda_enabled", cuda)
            if retrieval:
                data_loader = _ProgressLoader(data_loader, "eval: image features", progress)
            if not isinstance(model, AuroraModel):
                return original(model, data_loader, **kwargs)
            with model.temporarily_merged():
                return original(model, data_loader, **kwargs)

        self.task.evaluation = evaluation

    def train_epoch(self, epoch):
        """LAVIS's, after telling seeded video datasets the epoch (their training frames depend on it); with a
        distiller, in the stage the epoch number gives, its loss parts added to the epoch's stats."""
        from ..video.lavis_data import set_frame_epoch

        set_frame_epoch(self.datasets, epoch)
        if self.distiller is None:
            return super().train_epoch(epoch)
        self.optimizer  # noqa: B018  (created now, over every trainable parameter, before a stage freezes some)
        self.distiller.start_epoch(epoch, self.device)
        stats = super().train_epoch(epoch)
        stats.update(self.distiller.epoch_stats())
        return stats

    # -- the loop --------------------------------------------------------------------------------
    def train(self):
        start_time = time.time()
        self.log_config()
        pending = None  # an epoch trained before the interruption but not evaluated: its metrics row so far
        if self.resume_from is not None and not self.evaluate_only:
            pending = self._resume(self.resume_from)
        cur_epoch = self.start_epoch - 1
        for cur_epoch in range(self.start_epoch, self.max_epoch):
            record: dict[str, Any] = {"epoch": cur_epoch}
            if pending is not None:
                record, pending = pending, None
            elif not self.evaluate_only:
                logging.info("Start training")
                train_stats = self.train_epoch(cur_epoch)
                self.log_stats(split_name="train", stats=train_stats)
                record.update(flatten("train", train_stats))
                record["train_lr"] = float(self.optimizer.param_groups[0]["lr"])  # LAVIS rounds it to 3 decimals
                self._save_epoch(cur_epoch, record)  # before the evaluation, which may fail: the training is kept
            for split_name in self.valid_splits:
                logging.info("Evaluating on {}.".format(split_name))
                val_log = self.eval_epoch(split_name=split_name, cur_epoch=cur_epoch)
                if val_log is not None and is_main_process():
                    assert "agg_metrics" in val_log, "No agg_metrics found in validation log."
                    agg_metrics = val_log["agg_metrics"]
                    if agg_metrics > self.best_agg_metric and split_name == "val" and not self.evaluate_only:
                        self.best_epoch, self.best_agg_metric = cur_epoch, agg_metrics
                        self._save_checkpoint(cur_epoch, is_best=True, metrics=val_log)
                    val_log.update({"best_epoch": self.best_epoch})
                    self.log_stats(val_log, split_name)
                    record.update(flatten(split_name, val_log))
            self._share_best()
            if self.evaluate_only:
                break
            self.history.append(record)
            self._save_evaluation(cur_epoch)
            if self.epoch_callback is not None and is_main_process():
                self.epoch_callback(record, self.max_epoch)
            barrier()
        test_epoch = "best" if self.valid_splits and self.best_epoch is not None else cur_epoch
        test_logs = self.evaluate(cur_epoch=test_epoch, skip_reload=self.evaluate_only) or {}
        if is_main_process():
            self._finish(test_epoch, test_logs)
        barrier()
        total_time = time.time() - start_time
        logging.info("Training time {}".format(str(datetime.timedelta(seconds=int(total_time)))))
        return test_logs

    def _finish(self, test_epoch, test_logs: dict[str, Any]) -> None:
        self.final = {"epoch": test_epoch, "best_epoch": self.best_epoch}
        for split, logs in test_logs.items():
            self.final.update(flatten(split, logs))
        if self.evaluate_only:
            write_metrics(self.output_dir, [], self.final)
            return
        source = self.store.best_dir if test_epoch == "best" else self.store.latest()
        if source is not None:
            self.final_weights = self.store.export(source, self.output_dir / ("adapter" if self.aurora else "model"))
        write_metrics(self.output_dir, self.history, self.final)
        if self.config.run_cfg.get("plot", True):
            self.plot_path = plot_metrics(self.output_dir, self.history, self.final, self.title,
                                          task=str(self.config.run_cfg.task))

    def _share_best(self) -> None:
        """The main process decides which epoch is best; every rank must agree on it, since the final
        test reloads the best adapter on each rank (retrieval evaluation splits its rows over ranks)."""
        if get_world_size() > 1:
            shared = [self.best_epoch, self.best_agg_metric]
            torch.distributed.broadcast_object_list(shared, src=0)
            self.best_epoch, self.best_agg_metric = shared

    @property
    def aurora(self) -> bool:
        return isinstance(self._model, AuroraModel)

    # -- checkpoints -----------------------------------------------------------------------------
    def _save_checkpoint(self, cur_epoch, is_best=False, metrics=None):
        """The best checkpoint: weights + the metrics that made it best (main process only)."""
        if not is_main_process():
            return
        model = self.unwrap_dist_model(self.model)

        def write(directory: Path) -> None:
            ckpt.save_weights(model, directory)
            ckpt.save_state(directory, {"epoch": cur_epoch, "metrics": {k: float(v) for k, v in (metrics or {}).items()
                                                                        if isinstance(v, (int, float))},
                                        "fingerprint": self.fingerprint})

        path = self.store.commit("best", write)
        logging.info("Saved the best checkpoint (epoch %s) to %s.", cur_epoch, path)

    def _save_epoch(self, cur_epoch: int, record: dict[str, Any]) -> None:
        """The trained epoch's checkpoint, then ``latest.json`` (collective: gathers every rank's RNG state).
        ``record`` is the epoch's metrics row so far; the evaluation adds to it (``_save_evaluation``)."""
        rng = gather_rng_states()
        if not is_main_process():
            return
        model = self.unwrap_dist_model(self.model)
        state = {
            "epoch": cur_epoch,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "lr_sched": {"name": str(self.config.run_cfg.lr_sched), "init_lr": self.init_lr,
                         "min_lr": self.min_lr, "max_epoch": self.max_epoch},
            "rng": rng,
            "world_size": get_world_size(),
            "best_epoch": self.best_epoch,
            "best_agg_metric": self.best_agg_metric,
            "history": self.history,
            "record": record,
            "fingerprint": self.fingerprint,
        }
        keep_resume_state = bool(self.config.run_cfg.get("save_resume_state", True))

        def write(directory: Path) -> None:
            ckpt.save_weights(model, directory)
            ckpt.save_state(directory, state)
            if keep_resume_state:
                ckpt.save_resume_tensors(model, directory)

        path = self.store.commit(f"epoch_{cur_epoch}", write)
        self.store.set_latest(path, cur_epoch)
        self.store.prune_resume_states(keep=path)
        logging.info("Saved the checkpoint of epoch %d to %s.", cur_epoch, path)

    def _save_evaluation(self, cur_epoch: int) -> None:
        """The evaluated epoch's best metric, history and RNG, added to its checkpoint; the metrics files
        (collective: gathers every rank's RNG state, which the evaluation's loaders advanced)."""
        rng = gather_rng_states()
        if not is_main_process():
            return
        ckpt.add_evaluation(self.store.epoch_dir(cur_epoch), {
            "rng": rng, "best_epoch": self.best_epoch, "best_agg_metric": self.best_agg_metric,
            "history": self.history})
        write_metrics(self.output_dir, self.history)

    def _resume(self, directory: Path) -> dict[str, Any] | None:
        """Weights, momentum encoders and queues, optimizer, scaler, RNG, best metric and history. Returns the
        metrics row of an epoch that was trained but not evaluated (it is evaluated next), else None."""
        state = ckpt.load_state(directory)
        ckpt.check_fingerprint(directory, state.get("fingerprint"), self.fingerprint)
        model = self.unwrap_dist_model(self.model)
        ckpt.load_weights(model, directory)
        exact = ckpt.load_resume_tensors(model, directory)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        rank = self.config.run_cfg.get("rank", 0) or 0
        rngs = state.get("rng") or []
        if state.get("world_size") != get_world_size():
            logging.warning("resuming a %s-process run with %d processes: data order and random draws will "
                            "differ from an uninterrupted run", state.get("world_size"), get_world_size())
        if rank < len(rngs):
            set_rng_state(rngs[rank])
        if not exact:
            logging.warning("%s has no %s: momentum encoders and queues restart from the base model",
                            directory, ckpt.RESUME_NAME)
        self.best_epoch = state.get("best_epoch")
        best = state.get("best_agg_metric")
        self.best_agg_metric = -math.inf if best is None else float(best)
        self.history = list(state.get("history") or [])
        epoch = int(state["epoch"])
        if state["evaluated"]:
            self.start_epoch = epoch + 1
            print(f"resumed from {directory} (epoch {epoch} done; continuing at epoch {self.start_epoch})")
            return None
        self.start_epoch = epoch
        print(f"resumed from {directory} (epoch {epoch} trained, not evaluated: evaluating it, then continuing)")
        return dict(state["record"])

    def _reload_best_model(self, model):
        directory = self.store.best_dir
        logging.info("Loading the best checkpoint from %s.", directory)
        ckpt.load_weights(model, directory)
        return model

