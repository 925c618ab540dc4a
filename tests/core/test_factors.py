import tensorly as tl
import torch
import pytest

from aurora_pet import ModeFactors, compress_delta, num_factor_parameters


def random_factors(core: str, d: int = 12, slices: int = 5, rank: int = 3) -> ModeFactors:
    factors = ModeFactors(d, slices, rank, core, seed=1)
    with torch.no_grad():
        for parameter in factors.parameters():
            parameter.copy_(torch.randn_like(parameter))
    return factors


@pytest.mark.parametrize("core", ["cp", "tucker"])
def test_slices_equal_tensorly_reconstruction(core):
    factors = random_factors(core)
    with tl.backend_context("pytorch"):
        if core == "cp":
            expected = tl.cp_to_tensor((factors.lam, [factors.U, factors.V, factors.P]))
        else:
            expected = tl.tucker_to_tensor((factors.G, [factors.U, factors.V, factors.P]))
    ours = factors.slices(slice(None))  # (M, d, d), our einsum path
    assert expected.shape == (12, 12, 5)
    torch.testing.assert_close(ours, expected.permute(2, 0, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(factors.to_tensor(slice(1, 3)), expected[:, :, 1:3])


def test_cp_slice_formula():
    factors = random_factors("cp")
    m = 2
    expected = factors.U @ torch.diag(factors.lam * factors.P[m]) @ factors.V.T
    torch.testing.assert_close(factors.slices(slice(m, m + 1))[0], expected)


def test_tucker_slice_formula():
    factors = random_factors("tucker")
    m = 4
    core = sum(factors.P[m, k] * factors.G[:, :, k] for k in range(factors.rank))
    torch.testing.assert_close(factors.slices(slice(m, m + 1))[0], factors.U @ core @ factors.V.T)


@pytest.mark.parametrize("core", ["cp", "tucker"])
def test_initial_update_is_zero_and_tucker_starts_as_cp(core):
    factors = ModeFactors(16, 6, 4, core, seed=0)
    assert torch.count_nonzero(factors.to_tensor()) == 0
    assert factors.U.abs().sum() > 0 and factors.P.abs().sum() > 0
    if core == "tucker":
        cp = ModeFactors(16, 6, 4, "cp", seed=0)
        with torch.no_grad():
            cp.V.normal_(), factors.V.copy_(cp.V)
        torch.testing.assert_close(factors.to_tensor(), cp.to_tensor())


@pytest.mark.parametrize("core,expected", [("cp", (2 * 768 + 48 + 1) * 64), ("tucker", (2 * 768 + 48) * 64 + 64**3)])
def test_parameter_count_formulas(core, expected):
    assert num_factor_parameters(768, 48, 64, core) == expected
    assert ModeFactors(768, 48, 64, core).num_parameters() == expected


def test_compress_delta_recovers_a_low_rank_tensor():
    truth = random_factors("cp", d=10, slices=6, rank=3)
    delta = truth.to_tensor().detach()
    fitted = compress_delta(delta, rank=3, core="cp", n_iter_max=500)
    approx = ModeFactors(10, 6, 3, "cp")
    approx.load_state_dict(fitted)
    error = (approx.to_tensor() - delta).norm() / delta.norm()
    assert error < 1e-4


def test_compress_delta_tucker_and_bad_shape():
    delta = random_factors("tucker", d=8, slices=3, rank=2).to_tensor().detach()
    fitted = compress_delta(delta, rank=4, core="tucker")
    approx = ModeFactors(8, 3, 4, "tucker")
    approx.load_state_dict(fitted)
    assert (approx.to_tensor() - delta).norm() / delta.norm() < 1e-4
    with pytest.raises(ValueError, match=r"shape \(d, d, M\)"):
        compress_delta(torch.zeros(4, 5, 2), rank=2)
