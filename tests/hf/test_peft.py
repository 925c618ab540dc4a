"""Aurora registered with PEFT: `get_peft_model`, `PeftModel.from_pretrained` and PEFT's multi-adapter calls run
the same core as `get_aurora_model` (same outputs, same factors), and importing aurora_pet imports no peft."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

import aurora_pet
from aurora_pet import AuroraConfig, get_aurora_model
from aurora_pet.families.hf.build import build_blip

from .conftest import CAPTIONS, perturb, pixels, text_batch

peft = pytest.importorskip("peft")


def inputs(tokenizer):
    return {**text_batch(tokenizer, CAPTIONS), "pixel_values": pixels(2, 32)}


def itm(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).itm_score


def peft_config(**overrides):
    fields = dict(rank=4, target_modules="cross-attention", ice=True, gqt=True, dropout=0.0)
    return aurora_pet.AuroraPeftConfig(**{**fields, **overrides})


def train_step(model, batch, seed: int = 0) -> None:
    """One optimiser step on the ITM logits (enough to move every trainable parameter)."""
    torch.manual_seed(seed)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.SGD(trainable, lr=0.5)
    for _ in range(2):  # V moves first, then U, P, λ and the gate
        model(**batch).itm_score.logsumexp(-1).sum().backward()
        optimiser.step()
        optimiser.zero_grad()


def test_importing_aurora_pet_imports_no_peft():
    code = "import sys, aurora_pet, aurora_pet.model; assert 'peft' not in sys.modules, 'peft imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_peft_model_runs_the_same_core_as_get_aurora_model(tokenizer):
    base = build_blip("retrieval", "tiny")
    batch = inputs(tokenizer)
    plain = get_aurora_model(copy.deepcopy(base), AuroraConfig(rank=4, target_modules="cross-attention", ice=True,
                                                               gqt=True, dropout=0.0))
    model = peft.get_peft_model(copy.deepcopy(base), peft_config())
    assert model.peft_type == "AURORA" and model.peft_config["default"].modules_to_save == ["itm_head", "vision_proj",
                                                                                            "text_proj"]
    torch.testing.assert_close(itm(model, batch), itm(base, batch), rtol=0, atol=0)  # identity at initialisation
    perturb(plain)
    model.base_model.aurora_adapters["default"].load_state_dict(plain.aurora_adapters["default"].state_dict())
    torch.testing.assert_close(itm(model, batch), itm(plain, batch), rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    factors = {n for n in trainable if n.startswith("base_model.aurora_adapters.default.")}
    heads = {n for n in trainable if ".modules_to_save.default." in n}
    assert factors and heads and trainable == factors | heads
    assert sum(model.get_nb_trainable_parameters()[:1]) == sum(p.numel() for n, p in model.named_parameters()
                                                               if n in trainable)


def test_round_trip_through_peft_save_and_from_pretrained(tokenizer, tmp_path):
    base = build_blip("retrieval", "tiny")
    reference = copy.deepcopy(base)
    batch = inputs(tokenizer)
    model = peft.get_peft_model(base, peft_config())
    train_step(model, batch)
    assert not torch.allclose(itm(model, batch), itm(reference, batch))
    expected = itm(model, batch)
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path)
    torch.testing.assert_close(itm(loaded, batch), expected, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())  # PEFT's default: inference
    trainable = peft.PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path, is_trainable=True)
    assert any(p.requires_grad for n, p in trainable.named_parameters() if "aurora_adapters" in n)


def test_peft_multi_adapter_calls(tokenizer, tmp_path):
    base = build_blip("retrieval", "tiny")
    reference = copy.deepcopy(base)
    batch = inputs(tokenizer)
    model = peft.get_peft_model(base, peft_config())
    train_step(model, batch)
    first = itm(model, batch)
    model.add_adapter("text", peft_config(target_modules="text-attention", rank=2, gqt=False))
    assert model.active_adapter == "default"
    model.set_adapter("text")
    torch.testing.assert_close(itm(model, batch), itm(reference, batch), rtol=0, atol=0)  # untrained: the base
    train_step(model, batch, seed=1)
    second = itm(model, batch)
    assert not torch.allclose(first, second)
    model.set_adapter("default")
    torch.testing.assert_close(itm(model, batch), first, rtol=0, atol=0)
    with model.disable_adapter():
        torch.testing.assert_close(itm(model, batch), itm(reference, batch), rtol=0, atol=0)

    model.save_pretrained(tmp_path)
    assert (tmp_path / "text" / "adapter_model.safetensors").is_file()
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path)
    loaded.load_adapter(tmp_path / "text", adapter_name="text")
    torch.testing.assert_close(itm(loaded, batch), first, rtol=0, atol=0)
    loaded.set_adapter("text")
    torch.testing.assert_close(itm(loaded, batch), second, rtol=0, atol=0)
    loaded.delete_adapter("default")
    assert list(loaded.peft_config) == ["text"]
    torch.testing.assert_close(itm(loaded, batch), second, rtol=0, atol=0)


def test_merge_and_unload_through_peft_gives_the_plain_model(tokenizer):
    base = build_blip("retrieval", "tiny")
    batch = inputs(tokenizer)
    model = peft.get_peft_model(base, peft_config(ice=False, gqt=False))
    train_step(model, batch)
    expected = itm(model, batch)
    plain = model.merge_and_unload()
    assert type(plain).__name__ == "BlipForImageTextRetrieval" and not hasattr(plain, "peft_config")
    assert not any("modules_to_save" in n or "aurora" in n for n, _ in plain.named_parameters())
    assert not any("forward" in vars(m) for m in plain.modules())
    torch.testing.assert_close(itm(plain, batch), expected, rtol=1e-5, atol=1e-5)


def test_bad_peft_configs_name_the_field():
    with pytest.raises(aurora_pet.AuroraConfigError, match="rank must be a positive integer, got 0"):
        aurora_pet.AuroraPeftConfig(rank=0)
    model = peft.get_peft_model(build_blip("retrieval", "tiny"), peft_config())
    model.add_adapter("b", peft_config())
    with pytest.raises(ValueError, match="one adapter at a time"):
        model.base_model.set_adapter(["default", "b"])


def test_adapters_cross_between_peft_and_aurora_pet(tokenizer, tmp_path):
    """PEFT's files load in aurora-pet (keys and shapes checked, with a warning); aurora-pet's own files load in
    PEFT after `export_to_peft` (PEFT reads only its own key layout)."""
    from aurora_pet import AuroraModel
    from aurora_pet.integrations.peft import export_to_peft

    base = build_blip("retrieval", "tiny")
    reference = copy.deepcopy(base)
    batch = inputs(tokenizer)
    model = peft.get_peft_model(base, peft_config())
    train_step(model, batch)
    expected = itm(model, batch)
    model.save_pretrained(tmp_path / "peft")
    with pytest.warns(UserWarning, match="saved through PEFT.*keys and shapes only"):
        aurora = AuroraModel.from_pretrained(copy.deepcopy(reference), tmp_path / "peft")
    torch.testing.assert_close(itm(aurora, batch), expected, rtol=0, atol=0)

    aurora.save_pretrained(tmp_path / "aurora")
    export_to_peft(tmp_path / "aurora", tmp_path / "exported")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path / "exported")
    torch.testing.assert_close(itm(again, batch), expected, rtol=0, atol=0)

    wrong = copy.deepcopy(reference)  # a PEFT adapter of another rank: refused by shape, naming the key
    small = peft.get_peft_model(copy.deepcopy(reference), peft_config(rank=2))
    small.save_pretrained(tmp_path / "rank2")
    cfg = (tmp_path / "rank2" / "adapter_config.json")
    cfg.write_text(cfg.read_text().replace('"rank": 2', '"rank": 4'))
    with pytest.warns(UserWarning), pytest.raises(aurora_pet.AdapterFileError, match="shape mismatches: factors.P"):
        AuroraModel.from_pretrained(wrong, tmp_path / "rank2")
    assert not any("forward" in vars(m) for m in wrong.modules())  # the failed load left the model as it was
