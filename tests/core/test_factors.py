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


@pytest.mark.parametrize("core", ["cp", "tucker"])
def test_width_classes_reconstruct_like_tensorly_and_count_by_the_formula(core):
    """Width pair (a, b): ΔW_m = U_a · C_m · V_bᵀ, the frontal slices of cp_to_tensor((λ, [U_a, V_b, P]))."""
    torch.manual_seed(0)
    factors = ModeFactors(8, 5, 3, core, out_widths=[12, 8], in_widths=[20])
    assert factors.out_widths == (12,) and factors.in_widths == (20,)  # d itself is no extra class
    with torch.no_grad():
        for parameter in factors.parameters():
            parameter.normal_()
    assert factors.u(12).shape == (12, 3) and factors.v(20).shape == (20, 3) and factors.v() is factors.V
    for a, b in [(8, 8), (12, 8), (8, 20), (12, 20)]:
        fast = factors.slices(slice(1, 4), a, b)
        assert fast.shape == (3, a, b)
        torch.testing.assert_close(fast, factors.to_tensor(slice(1, 4), a, b).permute(2, 0, 1))
        core_m = factors.slice_cores(slice(1, 4))
        torch.testing.assert_close(fast, factors.u(a) @ core_m @ factors.v(b).T)
    expected = num_factor_parameters(8, 5, 3, core, out_widths=[12], in_widths=[20])
    assert factors.num_parameters() == expected
    assert expected == (2 * 8 + 12 + 20 + 5) * 3 + (3 if core == "cp" else 27)
    fresh = ModeFactors(8, 5, 3, core, out_widths=[12], in_widths=[20])
    assert torch.count_nonzero(fresh.slices(slice(None), 12, 20)) == 0  # ΔW = 0 at initialisation


def test_single_width_draws_are_unchanged_by_width_classes():
    """Adding width classes draws their factors after the d-wide ones: BLIP adapters initialise as before."""
    plain, mixed = ModeFactors(8, 5, 3, seed=4), ModeFactors(8, 5, 3, seed=4, out_widths=[12], in_widths=[20])
    assert torch.equal(plain.U, mixed.U) and torch.equal(plain.P, mixed.P)
