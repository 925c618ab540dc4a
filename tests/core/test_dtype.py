"""A base model in half precision (converted before wrapping): the adapter keeps float32 factors on the base
model's device and computes in the base dtype (docs/method.md, "Precision")."""

import pytest
import torch

from aurora_pet import AuroraConfig, AuroraModel, get_aurora_model

from .test_model import ALL, SITES, perturb
from .toy import ToyModel, toy_inputs


def _half_matmul_works(dtype: torch.dtype) -> bool:
    """CPU support for float16 matmuls depends on the PyTorch build; bfloat16 is always there."""
    try:
        torch.ones(2, 2, dtype=dtype) @ torch.ones(2, 2, dtype=dtype)
        return True
    except RuntimeError:
        return False


DTYPES = [torch.bfloat16,
          pytest.param(torch.float16, marks=pytest.mark.skipif(not _half_matmul_works(torch.float16),
                                                                reason="no float16 matmul on this CPU build"))]
# the unit roundoff of each dtype (8 and 11 significant bits): round to nearest errs by at most u·|x|
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def half_model(dtype, seed=0, **overrides):
    torch.manual_seed(seed)
    base = ToyModel().to(dtype)
    fields = dict(rank=4, target_modules=ALL, dropout=0.0, modules_to_save=["head"], ice=True, gqt=True,
                  fusion_modules=SITES)
    return get_aurora_model(base, AuroraConfig(**{**fields, **overrides}))


def half_inputs(dtype):
    return tuple(t.to(dtype) for t in toy_inputs())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["factored", "materialised", "auto"])
def test_forward_and_backward_in_the_base_dtype_with_float32_factors(dtype, mode):
    model = half_model(dtype, dropout=0.1, forward_mode=mode)
    perturb(model)
    adapter = list(model.aurora_factors.parameters()) + list(model.aurora_fusion.parameters())
    assert {p.dtype for p in adapter} == {torch.float32}
    output = model(*half_inputs(dtype))
    assert output.dtype == dtype and torch.isfinite(output).all()
    output.float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0 for p in adapter)
    assert model.base_model.head.weight.grad.dtype == dtype  # a head in modules_to_save keeps the base dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_half_precision_output_follows_the_float32_computation(dtype):
    """The same adapter on a float32 copy of the base: outputs agree to the half dtype's precision."""
    model = half_model(dtype)
    perturb(model)
    full = get_aurora_model(ToyModel().to(dtype).float(), model.aurora_config)
    full.base_model.load_state_dict(model.base_model.state_dict())  # state_dict() holds the adapter only
    full.load_state_dict(model.state_dict())
    model.eval(), full.eval()
    expected = full(*(t.float() for t in half_inputs(dtype)))
    output = model(*half_inputs(dtype)).float()
    assert ((output - expected).norm() / expected.norm()) < 50 * UNIT_ROUNDOFF[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_rounds_once_and_unmerge_restores_the_weights(dtype):
    model = half_model(dtype)
    perturb(model)
    model.eval()
    inputs = half_inputs(dtype)
    unmerged = model(*inputs).float()
    original = {name: layer.module.weight.detach().clone() for name, layer in model.layers.items()}
    deltas = {name: model.delta_weight(name).detach() for name in model.layers}
    u = UNIT_ROUNDOFF[dtype]
    model.merge()
    for name, layer in model.layers.items():
        exact = original[name].float() + deltas[name]  # W + s·ΔW, one rounding away from the merged weight
        assert layer.module.weight.dtype == dtype
        assert ((layer.module.weight.float() - exact).abs() <= u * exact.abs() + 1e-6).all(), name
    merged = model(*inputs).float()
    assert ((merged - unmerged).norm() / unmerged.norm()) < 50 * u
    model.unmerge()
    for name, layer in model.layers.items():  # two roundings: of W + s·ΔW, then of the difference
        bound = 2 * u * (original[name].float().abs() + deltas[name].abs()) + 1e-6
        assert ((layer.module.weight.float() - original[name].float()).abs() <= bound).all(), name


@pytest.mark.parametrize("dtype", DTYPES)
def test_save_and_load_with_a_half_precision_base(dtype, tmp_path):
    model = half_model(dtype)
    perturb(model)
    with torch.no_grad():
        model.base_model.head.weight.add_(1.0)
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    loaded = AuroraModel.from_pretrained(ToyModel().to(dtype), tmp_path)
    assert {p.dtype for p in loaded.aurora_factors.parameters()} == {torch.float32}
    assert loaded.base_model.head.weight.dtype == dtype
    model.eval(), loaded.eval()
    torch.testing.assert_close(loaded(*half_inputs(dtype)), model(*half_inputs(dtype)), rtol=0, atol=0)
    loaded.merge()
    loaded.load_adapter(tmp_path)  # into a merged half-precision model
    assert loaded.merged and loaded(*half_inputs(dtype)).dtype == dtype
