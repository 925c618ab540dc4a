"""`transformers.Trainer` trains an Aurora-wrapped transformers model: it sees the base model's forward
signature and config. (Its checkpoints are not adapter-only yet: Trainer writes the full state dict of any
model that is neither a `PreTrainedModel` nor a `PeftModel`, so these runs save with `save_strategy="no"`
and `AuroraModel.save_pretrained` writes the adapter.)"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

from aurora_pet import AuroraConfig, get_aurora_model
from aurora_pet.families.hf.build import build_blip

from .conftest import ANSWERS, QUESTIONS, pixels


def test_the_wrapper_shows_the_base_models_forward_signature():
    model = build_blip("vqa", "tiny")
    aurora = get_aurora_model(model, AuroraConfig(rank=4))
    assert list(inspect.signature(aurora.forward).parameters) == list(inspect.signature(model.forward).parameters)
    assert aurora.config is model.config  # the model's own config; the adapter's is aurora_config
    twin = copy.deepcopy(aurora)  # the bound forward follows the copy, not the original
    assert twin.forward.__self__ is twin and twin.base_model is not model


class VQADataset(torch.utils.data.Dataset):
    """Questions, answers and images as a `datasets`-style list of dicts of tensors."""

    def __init__(self, tokenizer, size: int = 8) -> None:
        questions = tokenizer([QUESTIONS[i % 2] for i in range(size)], padding="max_length", max_length=16,
                              return_tensors="pt")
        answers = tokenizer([ANSWERS[i % 2] for i in range(size)], padding="max_length", max_length=6,
                            return_tensors="pt")
        self.rows = [{"input_ids": questions.input_ids[i], "attention_mask": questions.attention_mask[i],
                      "labels": answers.input_ids[i], "decoder_attention_mask": answers.attention_mask[i],
                      "pixel_values": pixels(1, 32, seed=i)[0], "unused_column": torch.tensor(i)}
                     for i in range(size)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.rows[index]


def test_three_trainer_steps_move_only_the_adapter(tmp_path, tokenizer):
    from transformers import Trainer, TrainingArguments

    aurora = get_aurora_model(build_blip("vqa", "tiny"), AuroraConfig.from_preset("cross-attention", rank=4))
    before = {n: p.detach().clone() for n, p in aurora.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in aurora.named_parameters() if not p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, use_cpu=True, report_to="none", save_strategy="no")
    collate = lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0] if k != "unused_column"}  # noqa: E731
    result = Trainer(model=aurora, args=args, train_dataset=VQADataset(tokenizer), data_collator=collate).train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    moved = [n for n, p in aurora.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any(n.startswith("aurora_factors.") for n in moved) and any(n.startswith("aurora_fusion.") for n in moved)
    assert all(torch.equal(p, frozen[n]) for n, p in aurora.named_parameters() if not p.requires_grad)


def test_transformers_peft_hooks_of_the_base_model_are_not_passed_through():
    aurora = get_aurora_model(build_blip("vqa", "tiny"), AuroraConfig(rank=4))
    assert hasattr(aurora.base_model, "add_adapter")  # transformers' PeftAdapterMixin
    for name in ("add_adapter", "set_adapter", "disable_adapters", "active_adapters"):
        with pytest.raises(AttributeError, match=f"AuroraModel has no {name}.*named adapters are not supported"):
            getattr(aurora, name)
    assert not hasattr(aurora, "enable_adapters")
    assert aurora.generate is not None and aurora.config is aurora.base_model.config  # the rest passes through
