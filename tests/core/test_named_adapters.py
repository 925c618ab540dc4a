"""Named adapters (PEFT's conventions): several factor sets on one base, switched, saved, loaded, deleted."""

import copy

import pytest
import torch

from aurora_pet import AuroraConfig, AuroraModel, MergeError, get_aurora_model

from .test_model import ALL, SITES
from .toy import ToyModel, toy_inputs

CROSS = r"blocks\.\d+\.crossattention\.(query|key|value|dense)"


def config(**overrides) -> AuroraConfig:
    fields = dict(rank=4, target_modules=ALL, dropout=0.0, modules_to_save=["head"], fusion_modules=SITES)
    return AuroraConfig(**{**fields, **overrides})


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Non-zero values in every parameter of an adapter (a stand-in for training)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))


@pytest.fixture
def two():
    """A base with "default" (all targets, ICE) and "cross" (cross-attention only, rank 2), both trained."""
    torch.manual_seed(0)
    base = ToyModel()
    reference = copy.deepcopy(base)
    model = get_aurora_model(base, config(ice=True))
    model.add_adapter("cross", config(rank=2, target_modules=CROSS, gqt=True, init_seed=3))
    randomise(model.aurora_adapters["default"].factors, 1)
    randomise(model.aurora_adapters["default"].fusion, 2)
    randomise(model.aurora_adapters["cross"].factors, 3)
    randomise(model.aurora_adapters["cross"].fusion, 4)
    randomise(model.base_model.head, 5)  # the default adapter's trained head
    return model.eval(), reference.eval()


def alone(reference: ToyModel, model: AuroraModel, name: str) -> AuroraModel:
    """The adapter `name` of `model` on its own, on a fresh copy of the base (what the named one must equal)."""
    single = get_aurora_model(copy.deepcopy(reference), model.peft_config[name])
    single.load_state_dict({k.replace(f"aurora_adapters.{name}.", "aurora_adapters.default."): v
                            for k, v in model.aurora_adapters[name].state_dict(prefix=f"aurora_adapters.{name}.").items()},
                           strict=False)
    with torch.no_grad():
        for key, value in model.adapter_state_dict(name).items():
            if key.startswith("heads."):
                single.base_model.get_parameter(key.removeprefix("heads.")).copy_(value)
    return single.eval()


def test_two_adapters_give_different_outputs_and_switch_without_reloading(two):
    model, reference = two
    inputs = toy_inputs()
    assert model.active_adapter == "default" and model.active_adapters == ["default"]
    default = model(*inputs)
    torch.testing.assert_close(default, alone(reference, model, "default")(*inputs), rtol=1e-5, atol=1e-6)
    model.set_adapter("cross")
    cross = model(*inputs)
    torch.testing.assert_close(cross, alone(reference, model, "cross")(*inputs), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(default, cross, atol=1e-3)
    model.set_adapter("default")
    torch.testing.assert_close(model(*inputs), default, rtol=0, atol=0)
    with model.disable_adapter():
        torch.testing.assert_close(model(*inputs), _with_head(reference, model)(*inputs), rtol=1e-6, atol=1e-6)


def _with_head(reference: ToyModel, model: AuroraModel) -> ToyModel:
    """The base model with the active adapter's head (disable_adapter keeps the trained heads)."""
    base = copy.deepcopy(reference)
    base.head.load_state_dict(model.base_model.head.state_dict())
    return base


def test_only_the_active_adapter_and_its_heads_train(two):
    model, _ = two
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("aurora_adapters.default.factors.", "aurora_adapters.default.fusion.",
                                           "base_model.head.")) for n in trainable)
    model.set_adapter("cross")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("aurora_adapters.cross.factors.") for n in trainable)
    assert not any(n.startswith("aurora_adapters.default.") for n in trainable)


def test_each_adapter_keeps_its_own_heads(two):
    model, reference = two
    trained = model.base_model.head.weight.detach().clone()
    model.set_adapter("cross")  # a new adapter's head starts from the base model's
    torch.testing.assert_close(model.base_model.head.weight, reference.head.weight, rtol=0, atol=0)
    with torch.no_grad():
        model.base_model.head.weight.add_(1.0)  # "cross" trains its head
    cross_head = model.base_model.head.weight.detach().clone()
    model.set_adapter("default")
    torch.testing.assert_close(model.base_model.head.weight, trained, rtol=0, atol=0)
    torch.testing.assert_close(model.adapter_state_dict("cross")["heads.head.weight"], cross_head, rtol=0, atol=0)


def test_save_and_load_by_name(two, tmp_path):
    model, reference = two
    inputs = toy_inputs()
    outputs = {}
    for name in ("default", "cross"):
        model.set_adapter(name)
        outputs[name] = model(*inputs)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "cross" / "adapter_config.json").is_file()

    loaded = AuroraModel.from_pretrained(copy.deepcopy(reference), tmp_path).eval()
    loaded.load_adapter(tmp_path / "cross", adapter_name="cross")
    assert list(loaded.peft_config) == ["default", "cross"] and loaded.active_adapter == "default"
    assert loaded.peft_config["cross"] == model.peft_config["cross"]
    torch.testing.assert_close(loaded(*inputs), outputs["default"], rtol=0, atol=0)
    loaded.set_adapter("cross")
    torch.testing.assert_close(loaded(*inputs), outputs["cross"], rtol=0, atol=0)

    only = tmp_path / "only"
    model.save_pretrained(only, selected_adapters=["cross"])
    assert not (only / "adapter_model.safetensors").exists() and (only / "cross" / "adapter_model.safetensors").is_file()
    single = AuroraModel.from_pretrained(copy.deepcopy(reference), only / "cross", adapter_name="cross").eval()
    assert single.active_adapters == ["cross"]
    torch.testing.assert_close(single(*inputs), outputs["cross"], rtol=0, atol=0)


def test_deleting_one_adapter_leaves_the_other_intact(two):
    model, reference = two
    inputs = toy_inputs()
    model.set_adapter("cross")
    cross = model(*inputs)
    model.set_adapter("default")
    default = model(*inputs)
    model.delete_adapter("cross")
    assert list(model.peft_config) == ["default"]
    torch.testing.assert_close(model(*inputs), default, rtol=0, atol=0)
    model.add_adapter("cross", config(rank=2, target_modules=CROSS, gqt=True, init_seed=3))  # the name is free again
    model.delete_adapter("default")  # the active one: "cross" takes over, untrained (it equals the base)
    assert model.active_adapter == "cross" and not torch.allclose(model(*inputs), cross)
    torch.testing.assert_close(model(*inputs), reference(*inputs), rtol=0, atol=0)
    assert "aurora_adapters.default.factors.U" not in dict(model.named_parameters())
    with pytest.raises(ValueError, match="'cross' is the only adapter; use unload"):
        model.delete_adapter("cross")
    unloaded = model.unload()
    assert not any("forward" in vars(m) for m in unloaded.modules())


def test_merging_a_chosen_adapter(two):
    model, _ = two
    inputs = toy_inputs()
    model.set_adapter("cross")
    cross = model(*inputs)
    model.set_adapter("default")
    model.merge("cross")
    assert model.merged_adapter == "cross" and model.active_adapter == "cross"
    torch.testing.assert_close(model(*inputs), cross, rtol=1e-5, atol=1e-5)
    with pytest.raises(MergeError, match="'cross' is already merged"):
        model.merge("default")
    with pytest.raises(MergeError, match="'cross' is merged; call unmerge"):
        model.delete_adapter("cross")
    with pytest.warns(UserWarning, match="'cross' is merged; unmerging it"):
        model.set_adapter("default")
    assert not model.merged


def test_bad_names_are_refused_and_leave_nothing_behind(two):
    model, _ = two
    before = dict(model.named_parameters())
    with pytest.raises(ValueError, match="'cross' already exists"):
        model.add_adapter("cross", config())
    with pytest.raises(ValueError, match="without '.'"):
        model.add_adapter("a.b", config())
    with pytest.raises(KeyError, match="no adapter named 'crosss'.*did you mean \\['cross'\\]"):
        model.set_adapter("crosss")
    with pytest.raises(Exception, match="matched no nn.Linear"):
        model.add_adapter("broken", config(target_modules=r"nothing\.here"))
    assert list(model.peft_config) == ["default", "cross"] and dict(model.named_parameters()).keys() == before.keys()


def test_state_dict_holds_the_adapters_and_heads_not_the_frozen_base(two):
    model, reference = two
    state = model.state_dict()
    assert {k.split(".")[0] for k in state} == {"aurora_adapters", "base_model"}
    assert {k for k in state if k.startswith("base_model.")} == {"base_model.head.weight", "base_model.head.bias"}
    assert any(k.startswith("aurora_adapters.cross.") for k in state)
    twin = get_aurora_model(copy.deepcopy(reference), config(ice=True))
    twin.add_adapter("cross", config(rank=2, target_modules=CROSS, gqt=True, init_seed=3))
    twin.load_state_dict(state, strict=True)  # complete: the frozen base is not missing
    inputs = toy_inputs()
    torch.testing.assert_close(twin.eval()(*inputs), model(*inputs), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="Missing key.*aurora_adapters.cross.factors.U"):
        twin.load_state_dict({k: v for k, v in state.items() if k != "aurora_adapters.cross.factors.U"})
