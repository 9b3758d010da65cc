"""Tests of the flow-matching schedule (utils/scheduler.py) against the formulas, computed here in
float64: sigma_lin(i) = 1 - i/1000, sigma(i) = shift*s / (1 + (shift-1)*s), t(i) = 1000*sigma(i),
x_t = (1 - sigma) * x0 + sigma * eps and x0 = x_t - sigma * flow."""
import pytest
import torch

from utils.scheduler import FlowMatchScheduler

SHIFT = 5.0


def shifted(s):
    return SHIFT * s / (1 + (SHIFT - 1) * s)


def sigma_at(index):
    """Shifted sigma of training index ``index`` (0..999), float64."""
    return shifted(1.0 - index / 1000.0)


@pytest.fixture(scope="module")
def scheduler():
    return FlowMatchScheduler(shift=SHIFT, sigma_min=0.0, extra_one_step=True)


def test_warped_denoising_steps(scheduler):
    warped = scheduler.warp([1000, 750, 500, 250])
    assert isinstance(warped, list) and all(isinstance(v, float) for v in warped)
    assert warped == pytest.approx([1000.0, 937.5, 833.3333129882812, 625.0], rel=1e-7)
    # The same values from the formula, indices 0, 250, 500, 750.
    assert warped == pytest.approx([1000 * sigma_at(i) for i in (0, 250, 500, 750)], rel=1e-6)
    # 0 means "the end of the schedule".
    assert scheduler.warp([1000, 0]) == [1000.0, 0.0]


def test_sigmas_at_the_warped_steps(scheduler):
    steps = torch.tensor(scheduler.warp([1000, 750, 500, 250]))
    sigmas = scheduler.sigma(steps)
    assert sigmas.tolist() == pytest.approx([1.0, 0.9375, 0.8333333, 0.625], abs=1e-7)


def test_table_ends_and_shape(scheduler):
    assert scheduler.timesteps.shape == scheduler.sigmas.shape == (1000,)
    assert scheduler.timesteps[0].item() == 1000.0
    assert scheduler.timesteps[999].item() == pytest.approx(1000 * sigma_at(999), rel=1e-5)
    assert scheduler.timesteps[999].item() == pytest.approx(4.98, abs=5e-3)
    expected = torch.tensor([sigma_at(i) for i in range(1000)], dtype=torch.float64)
    assert torch.allclose(scheduler.sigmas.double(), expected, rtol=1e-6, atol=1e-7)
    assert bool((scheduler.timesteps[1:] < scheduler.timesteps[:-1]).all())  # strictly decreasing


def test_nearest_timestep_lookup(scheduler):
    # t = 0 is not on the grid: the nearest entry is index 999 (t ~ 4.98).
    assert scheduler.sigma(torch.tensor([0.0])).item() == pytest.approx(sigma_at(999), rel=1e-5)
    # Slightly off-grid values snap to their grid entry.
    t = torch.tensor([1000 * sigma_at(100) + 0.01, 1000 * sigma_at(600) - 0.01])
    assert scheduler.sigma(t).tolist() == pytest.approx([sigma_at(100), sigma_at(600)], rel=1e-6)


def test_add_noise_formula(scheduler):
    gen = torch.Generator().manual_seed(0)
    indices = [0, 250, 500, 750, 999]
    x0 = torch.randn(len(indices), 4, 3, 5, generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    t = torch.tensor([1000 * sigma_at(i) for i in indices], dtype=torch.float32)
    out = scheduler.add_noise(x0, eps, t)
    sigma = torch.tensor([sigma_at(i) for i in indices], dtype=torch.float64).view(-1, 1, 1, 1)
    expected = (1 - sigma) * x0.double() + sigma * eps.double()
    assert out.dtype == torch.float32 and out.shape == x0.shape
    assert torch.allclose(out.double(), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(out[0], eps[0])  # sigma = 1: pure noise


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flow_to_x0_in_float64(scheduler, dtype):
    gen = torch.Generator().manual_seed(1)
    indices = [0, 250, 500, 750, 999]
    flow = (3 * torch.randn(len(indices), 2, 4, 4, generator=gen)).to(dtype)
    x_t = (3 * torch.randn(flow.shape, generator=gen)).to(dtype)
    t = torch.tensor([1000 * sigma_at(i) for i in indices], dtype=torch.float32)
    out = scheduler.flow_to_x0(flow, x_t, t)
    assert out.dtype == dtype and out.shape == flow.shape
    sigma = torch.tensor([sigma_at(i) for i in indices], dtype=torch.float64).view(-1, 1, 1, 1)
    expected = x_t.double() - sigma * flow.double()
    if dtype == torch.float32:
        assert torch.allclose(out.double(), expected, rtol=1e-6, atol=1e-6)
    else:
        # One rounding of the float64 result to bf16: within half a bf16 ulp (2^-8 relative), up to
        # the float32 rounding of the sigma table.
        assert torch.allclose(out.double(), expected, rtol=2 ** -8 + 1e-6, atol=1e-6)
        # Ours matches the single rounding; an all-bf16 computation (rounding sigma*flow first)
        # does not, so this data tells the two apart.
        assert torch.equal(out, expected.to(dtype))
        naive = x_t - sigma.to(dtype) * flow
        assert not torch.equal(naive, out)


def test_flow_to_x0_inverts_add_noise(scheduler):
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn(3, 4, 6, generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    t = torch.tensor(scheduler.warp([1000, 750, 250]))
    x_t = scheduler.add_noise(x0, eps, t)
    assert torch.allclose(scheduler.flow_to_x0(eps - x0, x_t, t), x0, atol=1e-5)
