import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from aurora_pet import AdapterFileError, AuroraConfig, AuroraModel, get_aurora_model
from aurora_pet.adapter_files import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME

from .test_model import ALL, SITES, perturb, wrap
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


def rewrite_metadata(path, **changes):
    """Rewrite the weights file's header metadata (a value of None deletes the key), tensors unchanged."""
    file = path / WEIGHTS_NAME
    with safe_open(file, "pt") as handle:
        metadata = handle.metadata()
    for key, value in changes.items():
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value
    save_file(load_file(file), file, metadata=metadata)


def edit_config(path, **changes):
    file = path / CONFIG_NAME
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}, indent=2))


# -- loading into a merged model (issue 8, item 2) ----------------------------------------------------

def test_loading_into_a_merged_model_keeps_it_merged_with_the_new_adapter(tmp_path):
    new, _ = wrap()
    perturb(new)
    with torch.no_grad():
        for parameter in new.aurora_factors.parameters():
            parameter.mul_(-1.5)  # another update than the one `model` holds below
    new.save_pretrained(tmp_path / "new")
    model, reference = wrap()
    perturb(model)
    model.eval()
    model.merge()
    model.load_adapter(tmp_path / "new")
    assert model.merged
    torch.manual_seed(0)
    unmerged = AuroraModel.from_pretrained(ToyModel(), tmp_path / "new").eval()
    inputs = toy_inputs()
    expected = unmerged(*inputs)
    assert ((model(*inputs) - expected).norm() / expected.norm()) < 1e-5
    model.unmerge()
    # W + Δ_old − Δ_old + Δ_new − Δ_new in float32: each add and subtract rounds, so the base weights come
    # back to within a few float32 ulps (|W|, |ΔW| < 2 here), not bit for bit; loading without unmerging
    # first would leave W + Δ_old − Δ_new, off by the size of an update (~0.1)
    for name, parameter in model.base_model.named_parameters():
        assert (parameter - dict(reference.named_parameters())[name]).abs().max() < 1e-6, name
    torch.testing.assert_close(model(*inputs), expected, rtol=1e-5, atol=1e-5)


# -- the config is covered by the file's integrity check (item 3) -------------------------------------

@pytest.mark.parametrize("changes, named", [
    ({"scale": 2.0}, r"scale: 2\.0 in adapter_config\.json, 1\.0 when saved"),
    ({"dropout": 0.3, "init_seed": 5}, r"dropout: 0\.3 in adapter_config\.json, 0\.0 when saved; init_seed: 5"),
])
def test_a_config_edited_after_saving_is_refused_naming_the_fields(trained, changes, named):
    model, path = trained
    edit_config(path, **changes)
    message = rf"{CONFIG_NAME} does not match the config saved with .*{WEIGHTS_NAME} \({named}"
    with pytest.raises(AdapterFileError, match=message):
        AuroraModel.from_pretrained(ToyModel(), path)
    with pytest.raises(AdapterFileError, match=message):
        model.load_adapter(path)


def test_a_config_from_another_save_is_refused(trained, tmp_path):
    _, path = trained
    other, _ = wrap(ice=True, gqt=True, scale=0.5)
    other.save_pretrained(tmp_path / "other")
    (path / CONFIG_NAME).write_bytes((tmp_path / "other" / CONFIG_NAME).read_bytes())
    with pytest.raises(AdapterFileError, match=r"scale: 0\.5 in adapter_config\.json, 1\.0 when saved"):
        AuroraModel.from_pretrained(ToyModel(), path)


def test_a_reformatted_config_with_the_same_values_loads(trained):
    model, path = trained
    data = json.loads((path / CONFIG_NAME).read_text())
    (path / CONFIG_NAME).write_text(json.dumps(dict(reversed(list(data.items()))), indent=4))
    torch.manual_seed(0)
    loaded = AuroraModel.from_pretrained(ToyModel(), path)
    assert loaded.aurora_config == model.aurora_config


def test_a_tampered_config_copy_in_the_header_is_refused(trained):
    _, path = trained
    with safe_open(path / WEIGHTS_NAME, "pt") as handle:
        saved = json.loads(handle.metadata()["config"])
    rewrite_metadata(path, config=json.dumps({**saved, "scale": 2.0}, sort_keys=True, separators=(",", ":")))
    with pytest.raises(AdapterFileError, match=f"{WEIGHTS_NAME}: the copy of the config in its header is "
                                                "missing or corrupted"):
        AuroraModel.from_pretrained(ToyModel(), path)


def test_an_unknown_format_version_is_refused_naming_the_versions(trained):
    _, path = trained
    rewrite_metadata(path, format_version="3")
    with pytest.raises(AdapterFileError, match=f"{WEIGHTS_NAME}: adapter format version '3' is not supported; "
                                                "this aurora-pet reads versions 1, 2"):
        AuroraModel.from_pretrained(ToyModel(), path)
    rewrite_metadata(path, format_version=None)
    with pytest.raises(AdapterFileError, match="format version None is not supported"):
        AuroraModel.from_pretrained(ToyModel(), path)


def test_a_version_1_file_loads_with_its_tensor_checksum_and_a_warning(trained):
    model, path = trained
    assert FORMAT_VERSION == "2"
    rewrite_metadata(path, format_version="1", config=None, config_sha256=None)  # the layout version 1 wrote
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=f"{WEIGHTS_NAME}: format version 1 .*{CONFIG_NAME} is loaded unchecked"):
        loaded = AuroraModel.from_pretrained(ToyModel(), path)
    model.eval(), loaded.eval()
    torch.testing.assert_close(loaded(*toy_inputs()), model(*toy_inputs()), rtol=0, atol=0)
    data = (path / WEIGHTS_NAME).read_bytes()
    (path / WEIGHTS_NAME).write_bytes(data[:-3] + bytes(b ^ 0xFF for b in data[-3:]))
    with pytest.warns(UserWarning), pytest.raises(AdapterFileError, match="checksum mismatch"):
        AuroraModel.from_pretrained(ToyModel(), path)


def test_loading_into_a_model_with_another_scale_is_refused(trained):
    _, path = trained
    half, _ = wrap(ice=True, gqt=True, scale=0.5)
    with pytest.raises(AdapterFileError, match=f"{WEIGHTS_NAME} was saved with scale 1.0, but this model's "
                                                "adapter uses scale 0.5"):
        half.load_adapter(path)


# -- a failed from_pretrained leaves the model as it was (item 7) -------------------------------------

def model_state(model):
    """Everything wrapping changes: module classes, instance forwards, hooks, requires_grad, the weights."""
    return {
        "types": {n: type(m) for n, m in model.named_modules()},
        "forwards": {n: vars(m).get("forward") for n, m in model.named_modules()},
        "hooks": {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._forward_hooks_with_kwargs),
                      dict(m._forward_pre_hooks_with_kwargs)) for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }


def assert_same_state(before, after):
    assert {k: v for k, v in after.items() if k != "state"} == {k: v for k, v in before.items() if k != "state"}
    assert before["state"].keys() == after["state"].keys()
    assert all(torch.equal(before["state"][k], after["state"][k]) for k in before["state"])


def corrupt_bytes(path):
    data = (path / WEIGHTS_NAME).read_bytes()
    (path / WEIGHTS_NAME).write_bytes(data[:-3] + bytes(b ^ 0xFF for b in data[-3:]))


def from_another_model(path):
    """A well-formed pair saved from a three-layer toy: it passes every file check and fails the layout."""
    torch.manual_seed(1)
    other = get_aurora_model(ToyModel(layers=3), AuroraConfig.from_json_file(path / CONFIG_NAME))
    perturb(other)
    other.save_pretrained(path)


def with_momentum_factors(path):
    """A pair saved from a model with momentum copies: the plain toy has no place for factors_m.*."""
    torch.manual_seed(0)
    base = ToyModel()
    base.blocks_m = copy.deepcopy(base.blocks)
    config = AuroraConfig.from_json_file(path / CONFIG_NAME)
    get_aurora_model(base, config, momentum_pairs=[("blocks", "blocks_m")]).save_pretrained(path)


@pytest.mark.parametrize("spoil, error", [
    (corrupt_bytes, "checksum mismatch"),
    (lambda path: edit_config(path, scale=3.0), "does not match the config saved"),
    (from_another_model, "saved for a different model: targets only in the file: blocks.2"),
    (with_momentum_factors, r"unexpected keys: factors_m\..*pass momentum_pairs"),
])
def test_a_failed_from_pretrained_leaves_the_model_untouched_and_a_retry_works(trained, tmp_path, spoil, error):
    model, path = trained
    good = tmp_path / "good"
    good.mkdir()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        (good / name).write_bytes((path / name).read_bytes())
    spoil(path)
    torch.manual_seed(0)
    base = ToyModel()
    base.blocks[0].fc1.requires_grad_(False)  # the caller's own flags, a mix, must come back as they were
    before = model_state(base)
    with pytest.raises(AdapterFileError, match=error):
        AuroraModel.from_pretrained(base, path)
    assert_same_state(before, model_state(base))
    loaded = AuroraModel.from_pretrained(base, good).eval()
    model.eval()
    torch.testing.assert_close(loaded(*toy_inputs()), model(*toy_inputs()), rtol=0, atol=0)


def test_a_failed_wrapping_is_undone(monkeypatch):
    """A failure while installing (here: the second fusion site's hook) takes back what was installed."""
    torch.manual_seed(0)
    base = ToyModel()
    before = model_state(base)
    calls = []
    real = torch.nn.Module.register_forward_hook

    def failing(module, *args, **kwargs):
        calls.append(module)
        if len(calls) == 2:
            raise RuntimeError("hook registration failed")
        return real(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "register_forward_hook", failing)
    config = AuroraConfig(rank=4, target_modules=ALL, ice=True, fusion_modules=SITES, modules_to_save=["head"])
    with pytest.raises(RuntimeError, match="hook registration failed"):
        get_aurora_model(base, config)
    assert_same_state(before, model_state(base))


def test_undoing_a_failed_wrapping_keeps_another_adapters_forwards():
    model, _ = wrap()
    with pytest.raises(RuntimeError, match="already has an adapter"):
        get_aurora_model(model.base_model, model.aurora_config)
    assert all("forward" in vars(layer.module) for layer in model.layers.values())
    perturb(model)
    model.eval()
    x = torch.randn(3, 16)
    qkv = model.base_model.blocks[0].qkv
    torch.testing.assert_close(qkv(x), torch.nn.functional.linear(x, qkv.weight + model.delta_weight("blocks.0.qkv"),
                                                                   qkv.bias), rtol=1e-5, atol=1e-5)


# -- save_pretrained writes the pair atomically (item 8) ----------------------------------------------

def test_a_failure_writing_the_config_leaves_the_previous_pair_byte_for_byte(trained, monkeypatch):
    model, path = trained
    before = {name: (path / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)}
    import aurora_pet.adapter_files as checkpoint

    written = []
    real_save_file = checkpoint.save_file
    monkeypatch.setattr(checkpoint, "save_file", lambda *a, **k: (real_save_file(*a, **k), written.append(a[1])))

    def failing_to_json(self):
        raise OSError("disk full")

    monkeypatch.setattr(AuroraConfig, "to_json", failing_to_json)
    perturb(model)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(path)
    assert written, "the weights were written (to a temporary) before the config failed"
    assert sorted(p.name for p in path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert {name: (path / name).read_bytes() for name in before} == before


# -- momentum factors (item 12) -----------------------------------------------------------------------

def momentum_toy(seed=0):
    torch.manual_seed(seed)
    base = ToyModel()
    base.blocks_m = copy.deepcopy(base.blocks)
    return base


MOMENTUM = dict(momentum_pairs=[("blocks", "blocks_m")], momentum=0.9)


def test_an_adapter_with_momentum_factors_loads_through_from_pretrained(tmp_path):
    config = AuroraConfig(rank=4, target_modules=["qkv", "fc2"], dropout=0.0, modules_to_save=["head"])
    model = get_aurora_model(momentum_toy(), config, **MOMENTUM)
    perturb(model)
    model.momentum_update()  # factors_m now differ from the factors and from their initialisation
    model.save_pretrained(tmp_path)
    loaded = AuroraModel.from_pretrained(momentum_toy(), tmp_path, **MOMENTUM)
    saved = model.adapter_state_dict()
    assert loaded.adapter_state_dict().keys() == saved.keys() and any(k.startswith("factors_m.") for k in saved)
    assert all(torch.equal(value, saved[key]) for key, value in loaded.adapter_state_dict().items())
    x = torch.randn(3, 16)
    torch.testing.assert_close(loaded.base_model.blocks_m[1].qkv(x), model.base_model.blocks_m[1].qkv(x),
                               rtol=0, atol=0)
    with pytest.raises(AdapterFileError, match=r"unexpected keys: factors_m\.P.*has no momentum copies.*"
                                                r"pass momentum_pairs"):
        AuroraModel.from_pretrained(ToyModel(), tmp_path)
    plain = get_aurora_model(ToyModel(), config)
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(AdapterFileError, match=r"missing keys: factors_m\..*holds no momentum factors"):
        AuroraModel.from_pretrained(momentum_toy(), tmp_path / "plain", **MOMENTUM)


@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16])
def test_an_inference_export_leaves_out_the_momentum_factors_and_may_store_half_precision(tmp_path, dtype):
    config = AuroraConfig(rank=4, target_modules=["qkv", "fc2"], dropout=0.0, modules_to_save=["head"])
    model = get_aurora_model(momentum_toy(), config, **MOMENTUM)
    perturb(model)
    model.momentum_update()
    full, export = tmp_path / "full", tmp_path / "export"
    model.save_pretrained(full)
    model.save_pretrained(export, momentum=False, dtype=dtype)
    with safe_open(export / WEIGHTS_NAME, "pt") as handle:
        keys = list(handle.keys())
        stored = {handle.get_tensor(k).dtype for k in keys}
    assert keys and not any(k.startswith("factors_m.") for k in keys)
    assert stored == {dtype or torch.float32}
    assert (export / WEIGHTS_NAME).stat().st_size < (full / WEIGHTS_NAME).stat().st_size
    loaded = AuroraModel.from_pretrained(momentum_toy(), export, **MOMENTUM).eval()
    for key, value in loaded.adapter_state_dict().items():  # fp32 again; momentum restarts as a copy
        source = key.replace("factors_m.", "factors.", 1)
        expected = model.adapter_state_dict()[source]
        assert value.dtype == expected.dtype
        tolerance = {None: 0, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
        torch.testing.assert_close(value, expected, rtol=tolerance, atol=tolerance, msg=key)
    with torch.no_grad():
        torch.testing.assert_close(loaded(*toy_inputs()), model.eval()(*toy_inputs()),
                                   rtol=0.05 if dtype else 0, atol=0.05 if dtype else 0)


def test_an_export_dtype_must_be_floating_point(tmp_path):
    model, _ = wrap()
    with pytest.raises(TypeError, match="floating-point"):
        model.save_pretrained(tmp_path, dtype=torch.int8)
    assert not list(tmp_path.iterdir())
