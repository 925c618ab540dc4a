"""`transformers.Trainer` with default arguments trains an Aurora-wrapped transformers model: it sees the base
model's forward signature and config, its checkpoints hold the adapter only (Trainer saves `state_dict()` of a
model that is not a `PreTrainedModel`, and an AuroraModel's state dict is its adapters and trainable heads),
and resuming from one continues the same run. Gradient checkpointing through `gradient_checkpointing=True`
gives the gradients of the plain run."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

from aurora_pet import AuroraConfig, get_aurora_model
from aurora_pet.families.hf.build import build_blip

from .conftest import ANSWERS, QUESTIONS, pixels
from .test_mixed_widths import tiny_llama

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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
    assert any(n.startswith("aurora_adapters.default.factors.") for n in moved) and any(n.startswith("aurora_adapters.default.fusion.") for n in moved)
    assert all(torch.equal(p, frozen[n]) for n, p in aurora.named_parameters() if not p.requires_grad)


def test_transformers_peft_hooks_of_the_base_model_are_not_passed_through():
    aurora = get_aurora_model(build_blip("vqa", "tiny"), AuroraConfig(rank=4))
    assert hasattr(aurora.base_model, "add_adapter")  # transformers' PeftAdapterMixin
    for name in ("disable_adapters", "enable_adapters", "get_adapter_state_dict"):
        with pytest.raises(AttributeError, match=f"AuroraModel has no {name}.*transformers' PEFT integration"):
            getattr(aurora, name)
    for name in ("add_adapter", "set_adapter", "delete_adapter", "load_adapter"):  # Aurora's own named adapters
        assert getattr(aurora, name).__self__ is aurora
    assert aurora.active_adapters == ["default"]
    assert not hasattr(aurora, "enable_adapters")
    assert aurora.generate is not None and aurora.config is aurora.base_model.config  # the rest passes through


class TokenDataset(torch.utils.data.Dataset):
    """Causal-LM rows (input_ids, labels) for the tiny Llama."""

    def __init__(self, size: int = 12) -> None:
        ids = torch.randint(0, 128, (size, 8), generator=torch.Generator().manual_seed(3))
        self.rows = [{"input_ids": row, "labels": row} for row in ids]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.rows[index]


def llama_aurora():
    return get_aurora_model(tiny_llama().train(), AuroraConfig(rank=4, target_modules=LLAMA_TARGETS))


def vqa_aurora():
    torch.manual_seed(0)
    return get_aurora_model(build_blip("vqa", "tiny"), AuroraConfig.from_preset("cross-attention", rank=4))


CASES = {"llama": (llama_aurora, lambda tokenizer: TokenDataset()),
         "blip_vqa": (vqa_aurora, lambda tokenizer: VQADataset(tokenizer, size=12))}


def run_trainer(model, dataset, out, max_steps=3, resume=None, **overrides):
    """Trainer with its defaults but for a few steps, a checkpoint at every step, CPU and no reporting."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, save_steps=1, per_device_train_batch_size=4,
                             learning_rate=1e-2, use_cpu=True, report_to="none", **overrides)
    return Trainer(model=model, args=args, train_dataset=dataset).train(resume_from_checkpoint=resume)


def trained(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("case", sorted(CASES))
def test_trainer_checkpoints_hold_the_adapter_and_resume_the_same_run(case, tmp_path, tokenizer):
    """Default Trainer arguments (its own collator drops the unused column): adapter parameters move, each
    checkpoint holds the adapter and trainable heads only, and a run resumed from the first checkpoint ends
    where the uninterrupted run ends."""
    from safetensors.torch import load_file

    build, data = CASES[case]
    model = build()
    before = trained(model)
    result = run_trainer(model, data(tokenizer), tmp_path / "full")
    assert result.global_step == 3
    after = trained(model)
    assert any(not torch.equal(after[n], before[n]) for n in after if n.startswith("aurora_adapters.default.factors."))

    checkpoint = tmp_path / "full" / "checkpoint-1"
    saved = load_file(checkpoint / "model.safetensors")
    assert set(saved) == set(model.state_dict()) == set(after)  # the adapter and its heads, nothing frozen
    base_size = sum(p.numel() for p in model.base_model.parameters())
    assert sum(t.numel() for t in saved.values()) < base_size / 5

    resumed_model = build()
    result = run_trainer(resumed_model, data(tokenizer), tmp_path / "resumed", resume=str(checkpoint))
    assert result.global_step == 3
    for name, value in trained(resumed_model).items():
        torch.testing.assert_close(value, after[name], rtol=0, atol=0, msg=name)


def test_gradient_checkpointing_gives_the_gradients_of_the_plain_run():
    batch = TokenDataset().rows[0]
    batch = {k: v[None] for k, v in batch.items()}

    def gradients(checkpointing: dict | None) -> dict[str, torch.Tensor]:
        model = llama_aurora()
        with torch.no_grad():
            for p in model.aurora_factors.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        if checkpointing is not None:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
            assert model.base_model.is_gradient_checkpointing
        model.train()
        model.aurora_dropout.p = 0.0
        model(**batch).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain = gradients(None)
    assert all(g is not None and g.abs().sum() > 0 for g in plain.values())
    for kwargs in ({}, {"use_reentrant": True}):  # non-reentrant by default; reentrant with input grads
        for name, grad in gradients(kwargs).items():
            torch.testing.assert_close(grad, plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_trainer_on_the_peft_route_writes_adapter_files_and_resumes(tmp_path):
    """Through PEFT (`get_peft_model` with `AuroraPeftConfig`) Trainer saves with PEFT's `save_pretrained`:
    each checkpoint holds adapter_config.json + adapter_model.safetensors, no model weights, and resumes."""
    peft = pytest.importorskip("peft")
    import aurora_pet

    def build():
        return peft.get_peft_model(tiny_llama().train(), aurora_pet.AuroraPeftConfig(rank=4,
                                                                                    target_modules=LLAMA_TARGETS))

    model = build()
    run_trainer(model, TokenDataset(), tmp_path / "full")
    after = trained(model)
    checkpoint = tmp_path / "full" / "checkpoint-1"
    names = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names
    assert not names & {"model.safetensors", "pytorch_model.bin"}
    resumed = build()
    run_trainer(resumed, TokenDataset(), tmp_path / "resumed", resume=str(checkpoint))
    for name, value in trained(resumed).items():
        torch.testing.assert_close(value, after[name], rtol=0, atol=0, msg=name)
