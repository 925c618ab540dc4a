import json

import pytest
import torch
from safetensors.torch import load_file

from aurora_pet import AdapterFileError, AuroraModel
from aurora_pet.adapter_files import CONFIG_NAME, WEIGHTS_NAME

from .test_model import ALL, perturb, wrap
from .toy import ToyModel, toy_inputs


@pytest.fixture
def trained(tmp_path):
    model, _ = wrap(ice=True, gqt=True)
    perturb(model)
    with torch.no_grad():
        model.base_model.head.weight.add_(1.0)  # a trained head
    model.save_pretrained(tmp_path / "adapter")
    return model, tmp_path / "adapter"


def test_save_then_load_into_a_fresh_base_gives_identical_outputs(trained):
    model, path = trained
    torch.manual_seed(0)
    fresh = ToyModel()  # same seed as wrap(): the same base weights
    loaded = AuroraModel.from_pretrained(fresh, path)
    model.eval(), loaded.eval()
    inputs = toy_inputs()
    torch.testing.assert_close(loaded(*inputs), model(*inputs), rtol=0, atol=0)
    assert loaded.aurora_config == model.aurora_config


def test_adapter_file_holds_only_adapter_tensors(trained):
    model, path = trained
    assert sorted(p.name for p in path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    tensors = load_file(path / WEIGHTS_NAME)
    assert set(tensors) == set(model.adapter_state_dict())
    assert all(k.startswith(("factors.", "fusion.", "heads.head.")) for k in tensors)
    assert sum(t.numel() for t in tensors.values()) == model.parameter_report()["trainable"]
    assert json.loads((path / CONFIG_NAME).read_text())["rank"] == 4


def test_adapter_for_a_different_model_names_the_mismatch(trained, tmp_path):
    _, path = trained
    other, _ = wrap(target_modules=r"blocks\.\d+\.(qkv|proj)", ice=True, gqt=True)
    with pytest.raises(AdapterFileError, match=r"different model.*targets only in the file: blocks\.0\.crossattention"):
        other.load_adapter(path)
    wider = AuroraModel(ToyModel(d=32), other.aurora_config.__class__(**{**other.aurora_config.to_dict(), "target_modules": ALL}))
    with pytest.raises(AdapterFileError, match="slice size d: file 16 vs model 32"):
        wider.load_adapter(path)


def test_missing_keys_and_wrong_shapes_are_named(trained, tmp_path):
    model, path = trained
    rank8, _ = wrap(rank=8, ice=True, gqt=True)
    with pytest.raises(AdapterFileError, match=r"shape mismatches: factors.P: file \(32, 4\) vs model \(32, 8\)"):
        rank8.load_adapter(path)
    no_fusion, _ = wrap()
    with pytest.raises(AdapterFileError, match="fusion sites differ"):
        no_fusion.load_adapter(path)


def test_truncated_or_corrupted_file_is_refused_and_nothing_changes(trained):
    model, path = trained
    weights = path / WEIGHTS_NAME
    before = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    data = weights.read_bytes()
    for broken in (data[: len(data) // 2], b"\x00" * 4, data[:8] + b"}" + data[9:]):
        weights.write_bytes(broken)
        with pytest.raises(AdapterFileError, match=f"{WEIGHTS_NAME}: cannot read adapter weights"):
            model.load_adapter(path)
    weights.write_bytes(data[:-3] + bytes(b ^ 0xFF for b in data[-3:]))  # flipped bytes in a tensor
    with pytest.raises(AdapterFileError, match=f"{WEIGHTS_NAME}: checksum mismatch"):
        model.load_adapter(path)
    assert all(torch.equal(v, before[k]) for k, v in model.adapter_state_dict().items())


def test_missing_files_and_bad_config(tmp_path, trained):
    model, path = trained
    with pytest.raises(AdapterFileError, match="adapter file not found: .*adapter_config.json"):
        AuroraModel.from_pretrained(ToyModel(), tmp_path / "nowhere")
    (path / CONFIG_NAME).write_text(json.dumps({**model.aurora_config.to_dict(), "rnak": 3}))
    with pytest.raises(AdapterFileError, match="adapter_config.json: unknown AuroraConfig keys: 'rnak'"):
        AuroraModel.from_pretrained(ToyModel(), path)


def test_save_leaves_no_temporary_files_on_failure(tmp_path, monkeypatch):
    model, _ = wrap()
    model.save_pretrained(tmp_path)
    before = (tmp_path / WEIGHTS_NAME).read_bytes()
    import aurora_pet.adapter_files as checkpoint

    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", failing_save)
    perturb(model)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert (tmp_path / WEIGHTS_NAME).read_bytes() == before
