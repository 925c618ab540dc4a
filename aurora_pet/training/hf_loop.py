"""The training loop of the transformers family: epochs of AdamW steps under accelerate (one process or
several, mixed precision), a checkpoint after every epoch's training, evaluation, exact resume, metrics.

It is ``AuroraRunner``'s loop (``runner.py``) without LAVIS, writing the same files through the same modules
(checkpoints: ``run_state``; metrics and plot: ``metrics``), with LAVIS's optimizer and schedule:

- AdamW, β = (0.9, ``beta2``), weight decay on matrices only (not on 1-d, ``bias``, ``ln`` or ``bn``
  parameters), over every trainable parameter: the adapter, the heads, the retrieval loss's temperature;
- ``linear_warmup_cosine_lr``, set before every step: epoch 0 warms up linearly from ``warmup_lr`` over
  ``warmup_steps`` steps, epoch e ≥ 1 uses ``min_lr + (init_lr − min_lr)·½(1 + cos(π e / max_epoch))``.

Losses: retrieval trains ``BlipRetrievalLoss`` (ITC + ITM with hard negatives, ``families.hf.retrieval``),
VQA the model's own ``labels`` loss. With a ``distill:`` section, ``DistilledLoss`` adds the distillation terms
from a frozen teacher (``families.hf.distill``) as each epoch's stage says (``DistillConfig.schedule``: the
stage is a function of the epoch, so a resumed run continues in its stage); in ``align`` epochs the adapter
gets no update, only the heads (``modules_to_save``) and the loss's temperature do. Each loss part's epoch
mean is a ``train_<part>`` column of the metrics. Data order: each epoch's permutation comes from (seed, epoch), each
process takes its share, an incomplete last batch is dropped. Dropout, augmentation and hard negatives draw
from the global RNGs, which every checkpoint carries for every rank: a resumed run continues bit for bit.
Evaluation runs on the main process, the other processes waiting, with the factors merged (``hf_eval``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm
from transformers.utils import ModelOutput

from ..distill import PARTS, STAGES, DistillConfig, Stage
from ..model import AuroraModel
from . import run_state as ckpt
from .data import SplitData
from .hf_data import Collate, build_dataset, image_transform, text_cleaner
from .hf_eval import evaluate_split
from .hf_model import LoadedModel
from .hf_recipe import HFRecipe
from .recipe import RecipeError
from .processes import barrier, gather_rng_states, set_rng_state
from .metrics import flatten, plot_metrics, write_metrics

__all__ = ["DistilledLoss", "DistilledOutput", "HFRunner", "VQALoss", "learning_rate"]

TASK_PARTS = {"retrieval": ("itc", "itm", "relation"), "vqa": ("answer", "relation")}  # the terms each task has


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


@dataclass
class DistilledOutput(ModelOutput):
    """What ``DistilledLoss`` returns: the loss to backpropagate and, for the metrics, the float value of each
    part (``DistillConfig.combine``'s: "task", the unweighted terms, "distill", "loss")."""

    loss: torch.FloatTensor | None = None
    parts: dict[str, float] | None = None


class DistilledLoss(nn.Module):
    """The task loss and the distillation terms from a frozen teacher, combined as the current stage says.

    It owns the task loss as ``criterion`` (and so the model, its ``model``: the parameters are the task
    loss's, in its order). The teacher is held outside the module tree: an optimizer, a checkpoint, DDP's
    broadcast, ``train()`` and accelerate's ``prepare`` never see it; the runner puts it on the device.

    Parameters
    ----------
    criterion : nn.Module
        The task loss: ``BlipRetrievalLoss`` (its output gives the hard negatives the ITM terms are computed
        on, its ``temp`` the student's ITC temperature) or ``VQALoss`` (only its model is used: the student's
        pass of ``vqa_responses`` gives the task loss and the distilled answers at once).
    teacher : nn.Module
        A transformers BLIP of the same task and tokenizer, frozen and in eval mode.
    config : DistillConfig
        Weights, temperature and stages.
    task : str
        "retrieval" or "vqa".
    itm_token_id : int, optional
        First token of the ITM inputs (retrieval), as the task loss uses it.
    teacher_temperature : float
        The teacher's ITC temperature when ``config.temperature`` is None: a ``save_pretrained`` BLIP retrieval
        model stores none, so the recipe's ``model.temperature`` (BLIP's 0.07) stands for it.
    """

    def __init__(self, criterion: nn.Module, teacher: nn.Module, config: DistillConfig, task: str, *,
                 itm_token_id: int | None = None, teacher_temperature: float = 0.07) -> None:
        super().__init__()
        if task not in TASK_PARTS:
            raise ValueError(f"unknown task {task!r}; known: {', '.join(TASK_PARTS)}")
        self.criterion = criterion
        self._teacher = (teacher,)  # a tuple, not a submodule (see the class doc)
        self.config, self.task = config, task
        self.itm_token_id, self.teacher_temperature = itm_token_id, float(teacher_temperature)
        self.stage: Stage = STAGES["distill"]  # set by the runner before each epoch

    @property
    def model(self) -> nn.Module:
        return self.criterion.model

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def forward(self, **batch: Any) -> DistilledOutput:
        """The step's loss under ``self.stage``: [task] L_task + [distil] Σ_k w_k L_k.

        Parameters
        ----------
        **batch
            The training batch as the task loss takes it (``Collate``'s retrieval or VQA batch).

        Returns
        -------
        DistilledOutput
            The loss (in a stage without the task loss, plus 0·L_task, so that every trainable tensor is in
            the graph as DDP without ``find_unused_parameters`` expects) and its parts for the metrics.
        """
        from ..families.hf.distill import retrieval_distillation, vqa_distillation, vqa_responses

        stage, parts = self.stage, {}
        if self.task == "retrieval":
            out = self.criterion(**batch)  # also in align: its hard negatives are the ITM terms' pairs
            task = out.loss
            if stage.distillation:
                # negatives drawn from every rank's batch index the gathered batch, which this rank's student
                # and teacher do not hold: then the ITM and relation terms take the B positive pairs only
                negatives = (out.negative_texts, out.negative_images) if self._local_negatives() else (None, None)
                parts = retrieval_distillation(
                    self.model, self.teacher, self.config, batch["input_ids"], batch["attention_mask"],
                    batch["pixel_values"], student_temperature=self.criterion.temp,
                    teacher_temperature=self.teacher_temperature, negative_texts=negatives[0],
                    negative_images=negatives[1], itm_token_id=self.itm_token_id)
        else:
            mine = vqa_responses(self.model, **batch)
            task = mine.loss
            if stage.distillation:
                parts = vqa_distillation(self.model, self.teacher, self.config, **batch, student_responses=mine)
        loss, logged = self.config.combine(parts, task=task, stage=stage)
        if not stage.task_loss:  # every trainable tensor stays in the graph (DDP without find_unused_parameters)
            loss = loss + 0.0 * task
        return DistilledOutput(loss=loss, parts=logged)

    def _local_negatives(self) -> bool:
        """Whether the task loss's hard negatives index this process's batch (not all ranks' gathered one)."""
        import torch.distributed as dist

        gathered = bool(getattr(self.criterion, "negative_all_rank", False))
        return not (gathered and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


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
    to continue from; ``teacher`` the frozen teacher of a recipe with ``distill:`` (``hf_model.load_teacher``;
    not needed to only evaluate). After ``run()``: ``history`` (a metrics row per epoch), ``final`` (the test
    metrics), ``final_weights`` (``<output_dir>/adapter``), ``plot_path``; main process only."""

    def __init__(self, recipe: HFRecipe, loaded: LoadedModel, splits: dict[str, SplitData], accelerator: Any, *,
                 resume_from: Path | None = None, title: str = "", teacher: nn.Module | None = None) -> None:
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
        self.alpha = float(getattr(self.criterion, "alpha", 0.0))  # momentum distillation's α (retrieval)
        # what trains: the task loss, or the task loss under distillation (see _objective)
        self.stages: list[Stage] | None = None  # the stage of each epoch, with distillation
        self.align_frozen: list[nn.Parameter] = []  # what gets no update in align epochs: the adapter
        self.objective = self._objective(teacher)
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

            model = self.recipe.model
            return BlipRetrievalLoss(self.model, temperature=float(model["temperature"]),
                                     itm_token_id=self.loaded.enc_token_id, alpha=float(model["alpha"]),
                                     momentum=float(model["momentum"]),
                                     negative_all_rank=bool(model["negative_all_rank"]))
        return VQALoss(self.model)

    def _objective(self, teacher: nn.Module | None) -> nn.Module:
        """The task loss, or ``DistilledLoss`` around it with the recipe's teacher (checked here, before any
        training: the teacher, the weights of the task's terms, and heads for ``align`` epochs to train)."""
        config = self.recipe.distill
        if config is None or self.evaluate_only:
            return self.criterion
        source = self.recipe.path
        if teacher is None:
            raise RecipeError(f"{source}: the distill: section needs its teacher: load it with "
                              "hf_model.load_teacher (distill.teacher) and pass it to the runner")
        task = self.recipe.task
        if not any(config.weights()[part] > 0 for part in TASK_PARTS[task]):
            raise RecipeError(f"{source}: distill: every weight of run.task={task}'s terms is 0 "
                              f"({', '.join(f'{part}_weight' for part in TASK_PARTS[task])}), so nothing would "
                              "be distilled")
        self.stages = config.schedule(int(self.run_cfg.max_epoch))
        if any(not stage.trains_adapter for stage in self.stages):
            heads = getattr(self.model, "heads", {}) if self.aurora else {}
            if not heads:
                why = ("the recipe has no aurora: section (full fine-tuning has no adapter to hold back)"
                       if not self.aurora else "the adapter has no task heads (aurora.modules_to_save)")
                raise RecipeError(f"{source}: distill.stages={config.stages!r} has align epochs, which train the "
                                  f"task heads only, but {why}; start with supervised or distill, or name the heads "
                                  "in aurora.modules_to_save")
            in_heads = {id(p) for head in heads.values() for p in head.parameters()}
            self.align_frozen = [p for p in self.model.parameters() if p.requires_grad and id(p) not in in_heads]
        teacher.requires_grad_(False)
        teacher.eval().to(self.accelerator.device)
        return DistilledLoss(self.criterion, teacher, config, task, itm_token_id=self.loaded.enc_token_id,
                             teacher_temperature=float(self.recipe.model["temperature"]))

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
        for name, parameter in self.objective.named_parameters():
            if parameter.requires_grad:
                plain = parameter.ndim < 2 or any(part in name for part in ("bias", "ln", "bn"))
                (no_decay if plain else decay).append(parameter)
        run = self.run_cfg
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": float(run.weight_decay)},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=float(run.init_lr),
                                      weight_decay=float(run.weight_decay), betas=(0.9, float(run.beta2)))
        self.wrapped, self.optimizer = self.accelerator.prepare(self.objective, optimizer)
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

    def _train_epoch(self, epoch: int) -> dict[str, Any]:
        """One epoch of steps; the mean loss over the steps of every process, and the last learning rate; with
        distillation also the epoch's stage and the mean of each loss part (``train_<part>``)."""
        self.sampler.set_epoch(epoch)
        self.wrapped.train()
        stage = self._set_stage(epoch)
        device, total, lr = self.accelerator.device, torch.zeros((), device=self.accelerator.device), 0.0
        sums: dict[str, float] = {}
        desc = f"epoch {epoch}" + (f" ({stage.name})" if stage else "")
        steps = tqdm(self.loader, desc=desc, disable=not self.progress, leave=False, dynamic_ncols=True)
        for step, batch in enumerate(steps):
            lr = learning_rate(self.run_cfg, epoch, step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            inputs = {k: v.to(device) for k, v in batch.items()}
            if self.alpha > 0:  # LAVIS's ramp of the momentum-distillation weight over the first two epochs
                inputs["alpha"] = self.alpha * min(1.0, (epoch * len(self.loader) + step) / (2 * len(self.loader)))
            output = self.wrapped(**inputs)
            loss = output.loss
            self.accelerator.backward(loss)
            if stage is not None and not stage.trains_adapter:
                for parameter in self.align_frozen:  # AdamW skips a tensor without a gradient: no step, no decay
                    parameter.grad = None
            self.optimizer.step()
            self.optimizer.zero_grad()
            total += loss.detach().float()
            for name, value in (getattr(output, "parts", None) or {}).items():
                sums[name] = sums.get(name, 0.0) + value
            steps.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
        steps_run = max(len(self.loader), 1)
        mean = self.accelerator.reduce(total / steps_run, "mean")
        row: dict[str, Any] = {"train_loss": float(mean), "train_lr": lr}
        if stage is not None:
            names = [name for name in ("task", *PARTS, "distill") if name in sums]  # the same on every process
            means = self.accelerator.reduce(torch.tensor([sums[name] / steps_run for name in names],
                                                         dtype=torch.float64, device=device), "mean")
            row["train_stage"] = stage.name
            row.update({f"train_{name}": float(value) for name, value in zip(names, means.tolist())})
        return row

    def _set_stage(self, epoch: int) -> Stage | None:
        """The epoch's stage, set on the distillation loss (None without distillation). A function of the epoch
        only, so a resumed run continues in the stage the uninterrupted one would be in."""
        if self.stages is None:
            return None
        stage = self.stages[epoch]
        self.objective.stage = stage
        return stage

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
