import copy

import pytest
import torch

from aurora_pet import AuroraConfig, AuroraConfigError, AuroraModel, MergeError, TargetError, get_aurora_model
from aurora_pet.factors import num_factor_parameters

from .toy import ToyModel, toy_inputs

ALL = r"blocks\.\d+\.(qkv|proj|fc1|fc2|crossattention\.(query|key|value|dense))"
SITES = r"blocks\.\d+\.crossattention"  # the toy belongs to no family: its fusion sites are named


def wrap(core="cp", seed=0, **overrides):
    torch.manual_seed(seed)
    base = ToyModel()
    reference = copy.deepcopy(base)
    fields = dict(rank=4, target_modules=ALL, core=core, dropout=0.0, modules_to_save=["head"], fusion_modules=SITES)
    return get_aurora_model(base, AuroraConfig(**{**fields, **overrides})), reference


def perturb(model: AuroraModel) -> None:
    """Random non-zero factors and fusion parameters: a stand-in for a trained adapter."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in list(model.aurora_factors.parameters()) + list(model.aurora_fusion.parameters()):
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))


def test_slicing_covers_square_fused_and_mlp_shapes():
    model, _ = wrap()
    slices = {name.split(".", 2)[-1]: layer.num_slices for name, layer in model.layers.items() if ".0." in name}
    assert slices == {"qkv": 3, "proj": 1, "crossattention.query": 1, "crossattention.key": 1,
                      "crossattention.value": 1, "crossattention.dense": 1, "fc1": 4, "fc2": 4}
    firsts = [layer.first_slice for layer in model.layers.values()]
    assert firsts == sorted(firsts) and model.num_slices == 32


def test_base_parameter_names_are_unchanged_and_strict_loading_works():
    torch.manual_seed(0)
    base = ToyModel()
    state = copy.deepcopy(base.state_dict())
    model = get_aurora_model(base, AuroraConfig(rank=4, target_modules=ALL, ice=True, gqt=True,
                                                                  fusion_modules=SITES))
    assert list(model.base_model.state_dict()) == list(state)
    model.base_model.load_state_dict(state, strict=True)
    assert all(type(m).__name__ == "Linear" for n, m in model.base_model.named_modules() if n in model.layers)


@pytest.mark.parametrize("core", ["cp", "tucker"])
def test_output_equals_base_at_initialisation(core):
    model, reference = wrap(core, ice=True, gqt=True, dropout=0.1)
    inputs = toy_inputs()
    for mode in ("train", "eval"):
        getattr(model, mode)(), getattr(reference, mode)()
        torch.testing.assert_close(model(*inputs), reference(*inputs), rtol=0, atol=0)


def test_only_adapter_and_heads_require_grad():
    model, _ = wrap(ice=True, gqt=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if n.startswith(("aurora_adapters.default.factors.", "aurora_adapters.default.fusion.", "base_model.head."))}
    assert {"base_model.head.weight", "aurora_adapters.default.factors.U", "aurora_adapters.default.factors.V"} <= trainable
    assert not any(p.requires_grad for n, p in model.base_model.named_parameters() if not n.startswith("head."))


@pytest.mark.parametrize("core", ["cp", "tucker"])
def test_every_adapter_parameter_learns_within_two_steps(core):
    model, _ = wrap(core, ice=True, gqt=True, dropout=0.1)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    x, image, mask = toy_inputs()
    seen = set()
    for _ in range(2):
        optimizer.zero_grad()
        model(x, image, mask).pow(2).mean().backward()
        seen |= {n for n, p in trainable.items() if p.grad is not None and p.grad.abs().sum() > 0}
        optimizer.step()
    assert seen == set(trainable)
    assert all(p.grad is None for n, p in model.base_model.named_parameters() if not n.startswith("head."))


@pytest.mark.parametrize("core", ["cp", "tucker"])
def test_factored_and_materialised_forward_agree(core):
    model, _ = wrap(core)
    perturb(model)
    inputs = toy_inputs(tokens=9)
    model.aurora_config.forward_mode = "factored"
    factored = model(*inputs)
    model.aurora_config.forward_mode = "materialised"
    materialised = model(*inputs)
    torch.testing.assert_close(factored, materialised, rtol=1e-5, atol=1e-5)
    grads = []
    for output in (factored, materialised):  # both paths give the same gradients too
        model.zero_grad()
        output.pow(2).sum().backward()
        grads.append(model.aurora_factors.U.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)
    assert grads[0].abs().sum() > 0


def test_auto_mode_picks_the_cheaper_path():
    model, _ = wrap()
    layer = model.layers["blocks.0.qkv"]  # d=16, R=4, 3 slices
    few, many = torch.zeros(2, 16), torch.zeros(400, 16)
    with torch.no_grad():
        assert not layer._prefers_materialised(few)  # 2·4·16·4 = 512 < 3·256·4 = 3072
        assert layer._prefers_materialised(many)  # 400·4·16·4 = 102400 > 3072
    assert not layer._prefers_materialised(many)  # training adds ∂L/∂ΔW: 400·3·256 more


def test_delta_weight_is_the_scaled_frontal_slices():
    model, _ = wrap(scale=0.5)
    perturb(model)
    tensor = model.aurora_factors.to_tensor()  # (d, d, M)
    layer = model.layers["blocks.1.fc2"]  # 16×64: one row block, four column blocks
    delta = model.delta_weight("blocks.1.fc2")
    assert delta.shape == (16, 64)
    for j in range(4):
        torch.testing.assert_close(delta[:, 16 * j:16 * (j + 1)], 0.5 * tensor[:, :, layer.first_slice + j])
    fc1 = model.layers["blocks.1.fc1"]  # 64×16: four row blocks
    torch.testing.assert_close(model.delta_weight("blocks.1.fc1")[32:48], 0.5 * tensor[:, :, fc1.first_slice + 2])
    with pytest.raises(KeyError, match="blocks.1.fc1"):
        model.delta_weight("blocks.1.fc_1")


@pytest.mark.parametrize("core", ["cp", "tucker"])
def test_merge_unmerge_and_unload(core):
    model, _ = wrap(core)
    perturb(model)
    model.eval()
    inputs = toy_inputs()
    original = {n: p.detach().clone() for n, p in model.base_model.named_parameters()}
    unmerged = model(*inputs)
    model.merge()
    merged = model(*inputs)
    assert ((merged - unmerged).norm() / unmerged.norm()) < 1e-5
    with pytest.raises(MergeError, match="already merged"):
        model.merge()
    model.unmerge()
    for name, parameter in model.base_model.named_parameters():
        assert (parameter - original[name]).abs().max() < 1e-6, name
    with pytest.raises(MergeError, match="not merged"):
        model.unmerge()
    plain = model.merge_and_unload()
    assert type(plain) is ToyModel and "forward" not in vars(plain.blocks[0].qkv)
    assert list(plain.state_dict()) == list(original)
    assert ((plain(*inputs) - unmerged).norm() / unmerged.norm()) < 1e-5


def test_merge_and_unload_refuses_fusion_modules():
    model, _ = wrap(ice=True)
    with pytest.raises(MergeError, match="ICE/GQT"):
        model.merge_and_unload()


def test_disable_adapter_gives_base_behaviour_merged_or_not():
    model, reference = wrap(ice=True, gqt=True, modules_to_save=[])
    perturb(model)
    model.eval(), reference.eval()
    inputs = toy_inputs()
    adapted = model(*inputs)
    assert not torch.allclose(adapted, reference(*inputs))
    for merge in (False, True):
        if merge:
            model.merge()
        with model.disable_adapter():
            torch.testing.assert_close(model(*inputs), reference(*inputs))
        torch.testing.assert_close(model(*inputs), adapted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("core", ["cp", "tucker"])
def test_report_counts_match_the_formulas(core):
    model, _ = wrap(core, ice=True, gqt=True)
    report = model.parameter_report()
    d, slices, rank = 16, 32, 4
    assert report["groups"]["factors"] == num_factor_parameters(d, slices, rank, core)
    assert report["groups"]["ice"] == 2 * d  # two cross-attention sites, α each
    assert report["groups"]["gqt"] == 2 * (4 * d + 1)
    assert report["groups"]["heads"] == 16 * 3 + 3
    assert report["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report["base"] == sum(p.numel() for p in model.base_model.parameters())
    excluded = model.parameter_report(base_exclude=["blocks.1"])
    assert excluded["base"] == report["base"] - sum(p.numel() for p in model.base_model.blocks[1].parameters())


def test_print_trainable_parameters(capsys):
    model, _ = wrap()
    model.print_trainable_parameters()
    out = capsys.readouterr().out
    assert "factors" in out and f"{(2 * 16 + 32 + 1) * 4:,}" in out and "% of base" in out


def test_attribute_access_passes_through_to_the_base():
    model, _ = wrap()
    assert model.blocks is model.base_model.blocks
    with pytest.raises(AttributeError):
        model.no_such_attribute


# -- bad input ------------------------------------------------------------------------------------

def test_target_pattern_matching_nothing_lists_close_names():
    with pytest.raises(TargetError, match=r"matched no nn\.Linear.*blocks\.0\.qkv"):
        wrap(target_modules=r"blocks\.\d+\.qvk")
    with pytest.raises(TargetError, match="matched no"):
        wrap(target_modules=["attn.q_proj"])


def test_suffix_list_targets():
    model, _ = wrap(target_modules=["qkv", "crossattention.query"])
    assert sorted(model.layers) == ["blocks.0.crossattention.query", "blocks.0.qkv",
                                    "blocks.1.crossattention.query", "blocks.1.qkv"]


def test_rank_out_of_range():
    with pytest.raises(AuroraConfigError, match="rank must be a positive integer"):
        AuroraConfig(rank=0)
    with pytest.raises(AuroraConfigError, match="exceeds the slice size d=16"):
        wrap(rank=17)


def test_target_shape_not_a_multiple_of_d():
    with pytest.raises(TargetError, match=r"head \(3×16\)"):
        wrap(target_modules=["qkv", "head"], slice_size=16, modules_to_save=[])


def test_fusion_without_sites_and_unknown_heads():
    with pytest.raises(TargetError, match="no module matches fusion_modules"):
        wrap(ice=True, fusion_modules=r"blocks\.\d+\.selfattention")
    with pytest.raises(TargetError, match="modules_to_save entry 'heads'.*head"):
        wrap(modules_to_save=["heads"])


def test_a_model_of_no_family_must_name_its_targets_and_fusion_sites():
    with pytest.raises(TargetError, match="no known model family.*target_modules"):
        get_aurora_model(ToyModel(), AuroraConfig(rank=4))
    with pytest.raises(TargetError, match="no known model family.*fusion_modules"):
        get_aurora_model(ToyModel(), AuroraConfig(rank=4, target_modules=ALL, ice=True))
    with pytest.raises(TargetError, match="is a preset name.*no known model family"):
        get_aurora_model(ToyModel(), AuroraConfig(rank=4, target_modules="cross-attention"))


def test_wrapping_twice_is_refused():
    model, _ = wrap()
    with pytest.raises(TypeError, match="already an AuroraModel"):
        get_aurora_model(model, model.aurora_config)
    with pytest.raises(RuntimeError, match="already has an adapter"):
        get_aurora_model(model.base_model, model.aurora_config)


def test_momentum_copies_track_the_adapter_by_moving_average():
    torch.manual_seed(0)
    base = ToyModel()
    base.blocks_m = copy.deepcopy(base.blocks)
    config = AuroraConfig(rank=4, target_modules=["qkv", "fc2"], dropout=0.0)
    model = get_aurora_model(base, config, momentum_pairs=[("blocks", "blocks_m")], momentum=0.9)
    assert sorted(model.layers) == ["blocks.0.fc2", "blocks.0.qkv", "blocks.1.fc2", "blocks.1.qkv"]
    assert sorted(model.momentum_layers) == ["blocks_m.0.fc2", "blocks_m.0.qkv", "blocks_m.1.fc2", "blocks_m.1.qkv"]
    assert model.layers["blocks.1.qkv"].first_slice == model.momentum_layers["blocks_m.1.qkv"].first_slice
    assert not any(p.requires_grad for p in model.aurora_factors_m.parameters())
    assert torch.count_nonzero(model.delta_weight("blocks_m.0.qkv")) == 0
    perturb(model)
    before = {n: p.clone() for n, p in model.aurora_factors_m.named_parameters()}
    model.momentum_update()
    for name, tracked in model.aurora_factors_m.named_parameters():
        online = dict(model.aurora_factors.named_parameters())[name]
        torch.testing.assert_close(tracked, 0.9 * before[name] + 0.1 * online)
    x = torch.randn(3, 16)
    torch.testing.assert_close(model.base_model.blocks_m[0].qkv(x),
                               torch.nn.functional.linear(x, base.blocks_m[0].qkv.weight + model.delta_weight("blocks_m.0.qkv"),
                                                          base.blocks_m[0].qkv.bias), rtol=1e-5, atol=1e-5)
    assert {"factors_m.U", "factors_m.V"} <= set(model.adapter_state_dict())
    model.merge()
    model.unmerge()
    with pytest.raises(TargetError, match="momentum copy 'blocks_x.0.qkv'"):
        get_aurora_model(ToyModel(), config, momentum_pairs=[("blocks", "blocks_x")])


def test_adapter_dropout_follows_the_base_modules_mode():
    model, _ = wrap(dropout=0.5)
    perturb(model)
    inputs = toy_inputs()
    model.base_model.eval()  # e.g. code that holds only the LAVIS model
    torch.testing.assert_close(model(*inputs), model(*inputs), rtol=0, atol=0)
    model.base_model.train()
    assert not torch.allclose(model(*inputs), model(*inputs))


def test_a_regex_branch_that_matches_nothing_is_named_in_a_warning():
    spec = r"blocks\.\d+\.qkv|vision\.blocks\.\d+\.(fc1|fc2)|blocks\.\d+\.f[c]1"
    with pytest.warns(UserWarning, match=r"'vision\\\\.blocks\\\\.\\\\d\+\\\\.\(fc1\|fc2\)' matched no nn.Linear"):
        model, _ = wrap(target_modules=spec, modules_to_save=[])
    assert sorted({n.rsplit(".", 1)[1] for n in model.layers}) == ["fc1", "qkv"]
    with pytest.warns(UserWarning, match=r"'attn' matched no nn.Linear"):
        wrap(target_modules=["qkv", "attn"], modules_to_save=[])


def test_no_warning_when_every_branch_matches(recwarn):
    wrap(target_modules=r"blocks\.\d+\.qkv|blocks\.\d+\.(fc1|fc2)", modules_to_save=[])
    assert not [w for w in recwarn if "matched no" in str(w.message)]


def test_temporarily_merged_runs_at_merged_weights_and_restores_them_exactly():
    model, _ = wrap(ice=True, gqt=True)
    perturb(model)
    weights = {name: layer.module.weight.detach().clone() for name, layer in model.layers.items()}
    inputs = toy_inputs()
    with torch.no_grad():
        unmerged = model(*inputs)
        with model.temporarily_merged():
            assert model.merged
            changed = [n for n, l in model.layers.items() if not torch.equal(l.module.weight, weights[n])]
            merged = model(*inputs)
    assert changed == list(model.layers)  # the update was in the weights
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    assert not model.merged
    assert all(torch.equal(layer.module.weight, weights[name]) for name, layer in model.layers.items())


def test_merge_in_grad_mode_leaves_the_weights_frozen_leaves():
    model, _ = wrap()
    perturb(model)
    model.merge()  # grad mode on, factors require grad: the fold must not enter the graph
    model.unmerge()
    for layer in model.layers.values():
        assert layer.module.weight.is_leaf and not layer.module.weight.requires_grad
    model.unload().requires_grad_(False)  # what failed: "can only change requires_grad flags of leaf variables"


def test_rank_dropout_masks_the_projection_z():
    """dropout_position="rank": y = x·Wᵀ + b + (m ⊙ z / (1 − p))·B with z = x·V and m ~ Bernoulli(1 − p) of z's
    shape, one mask per target; the input x itself is not masked."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(16, 16))
    model = get_aurora_model(base, AuroraConfig(rank=4, target_modules=["0"], dropout=0.5, dropout_position="rank"))
    perturb(model)
    layer = model.layers["0"]
    x = torch.randn(3, 5, 16)
    model.train()
    torch.manual_seed(1)
    output = model(x)
    torch.manual_seed(1)
    z = torch.nn.functional.dropout(layer.input_projection(x.reshape(-1, 16)), 0.5, training=True)
    expected = torch.nn.functional.linear(x, base[0].weight, base[0].bias) + (z @ layer.up_projection(x.dtype)).view(3, 5, 16)
    torch.testing.assert_close(output, expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(output, model.eval()(x))
    with pytest.raises(AuroraConfigError, match="dropout_position must be one of \\('input', 'rank'\\), got 'z'"):
        AuroraConfig(dropout_position="z")
