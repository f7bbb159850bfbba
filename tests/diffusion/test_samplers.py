from __future__ import annotations

import pytest
import torch

from vdm.diffusion import sample_ddim, sample_euler, sample_heun, time_grid

MU, SIGMA = 0.7, 0.3


def gaussian_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # Exact E[v | x_t] for data x0 ~ N(MU, SIGMA^2) on x_t = (1 - t) x0 + t n, n ~ N(0, 1):
    # x_t ~ N((1 - t) MU, s2) with s2 = (1 - t)^2 SIGMA^2 + t^2, and by Gaussian conditioning
    # E[x0 | x_t] = MU + (1 - t) SIGMA^2 / s2 (x_t - (1 - t) MU),  E[n | x_t] = t / s2 (x_t - (1 - t) MU).
    t = t.double().reshape(-1, *([1] * (x.ndim - 1)))
    x = x.double()
    s2 = (1 - t) ** 2 * SIGMA**2 + t**2
    centered = x - (1 - t) * MU
    x0_hat = MU + (1 - t) * SIGMA**2 / s2 * centered
    n_hat = t / s2 * centered
    return (n_hat - x0_hat).float()


def test_time_grid_endpoints_and_monotone():
    for shift in [1.0, 3.0, 0.5]:
        ts = time_grid(10, shift=shift)
        assert ts.shape == (11,) and ts.dtype == torch.float32
        assert ts[0].item() == 1.0 and ts[-1].item() == 0.0
        assert (ts[1:] < ts[:-1]).all()
    torch.testing.assert_close(time_grid(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))


def test_shift_spends_more_steps_at_high_noise():
    assert (time_grid(20, shift=3.0) > 0.5).sum() > (time_grid(20) > 0.5).sum()
    # SD3 Eq. 23 at t = 0.5: shift / (1 + shift)
    assert time_grid(2, shift=3.0)[1].item() == pytest.approx(0.75)


@pytest.mark.parametrize("bad", [dict(steps=0), dict(steps=2.0), dict(steps=4, shift=0.0)])
def test_time_grid_rejects_bad_arguments(bad):
    with pytest.raises(ValueError):
        time_grid(**bad)


def test_euler_with_exact_velocity_reproduces_gaussian():
    noise = torch.randn(20_000, 1, generator=torch.Generator().manual_seed(0))
    x0 = sample_euler(gaussian_velocity, noise, 100)
    assert x0.mean().item() == pytest.approx(MU, rel=0.02)
    assert x0.std().item() == pytest.approx(SIGMA, rel=0.03)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_converges_to_the_exact_flow_map_at_first_order(shift):
    # For Gaussian data the flow ODE maps each noise sample n to MU + SIGMA n (it keeps the quantile).
    # Euler is first order: doubling the steps halves the error.
    noise = torch.randn(2_000, 1, generator=torch.Generator().manual_seed(0))
    exact = MU + SIGMA * noise
    errors = [(sample_euler(gaussian_velocity, noise, n, shift=shift) - exact).abs().max().item() for n in (100, 200)]
    assert errors[0] < 0.06
    assert errors[1] / errors[0] == pytest.approx(0.5, abs=0.05)


def test_euler_calls_velocity_on_the_grid_and_is_stateless():
    calls = []

    def velocity_fn(x, t):
        calls.append((x.dtype, t.clone()))
        return -x

    noise = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(1)).bfloat16()
    a = sample_euler(velocity_fn, noise, 4, shift=2.0)
    assert a.dtype == torch.bfloat16 and a.shape == noise.shape
    grid = time_grid(4, shift=2.0)
    assert len(calls) == 4
    for (dtype, t), expected in zip(calls, grid[:-1], strict=True):
        assert dtype == torch.float32 and t.shape == (3,) and (t == expected).all()
    assert torch.equal(sample_euler(velocity_fn, noise, 4, shift=2.0), a)


def test_euler_is_exact_on_straight_paths():
    # a constant velocity field is integrated exactly by Euler: x(0) = x(1) - v
    noise = torch.randn(2, 3)
    v = torch.randn(2, 3)
    torch.testing.assert_close(sample_euler(lambda x, t: v, noise, 7, shift=3.0), noise - v)


def test_heun_evaluates_twice_per_step_but_not_at_t_zero():
    calls = []
    velocity_fn = lambda x, t: calls.append(t[0].item()) or -x
    sample_heun(velocity_fn, torch.ones(2, 3), 4)
    assert calls == [1.0, 0.75, 0.75, 0.5, 0.5, 0.25, 0.25]  # Karras et al. 2022, Algorithm 1


def flow_scalings(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return 1 - t, t


def test_ddim_on_the_flow_path_is_euler():
    # x_s = (1 - s) x0_hat + s noise_hat is x_t + (s - t) (noise_hat - x0_hat): an Euler step on the velocity
    def denoise_fn(x, t):
        v = gaussian_velocity(x, t)
        t = t.reshape(-1, 1)
        return x - t * v, x + (1 - t) * v

    noise = torch.randn(1_000, 1, generator=torch.Generator().manual_seed(0))
    ddim = sample_ddim(denoise_fn, noise, 30, scalings=flow_scalings, shift=3.0)
    torch.testing.assert_close(ddim, sample_euler(gaussian_velocity, noise, 30, shift=3.0), rtol=1e-5, atol=1e-5)


def test_ancestral_noise_comes_from_the_generator_and_eta_zero_draws_none():
    denoise_fn = lambda x, t: (0.5 * x, 0.5 * x)
    noise = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    run = lambda eta, seed: sample_ddim(
        denoise_fn, noise, 5, scalings=flow_scalings, eta=eta, generator=torch.Generator().manual_seed(seed)
    )
    assert torch.equal(run(1.0, 1), run(1.0, 1)) and not torch.equal(run(1.0, 1), run(1.0, 2))
    assert torch.equal(run(0.0, 1), run(0.0, 2))
    generator = torch.Generator().manual_seed(1)
    sample_ddim(denoise_fn, noise, 5, scalings=flow_scalings, generator=generator)
    assert torch.equal(generator.get_state(), torch.Generator().manual_seed(1).get_state())


def test_ddim_rejects_negative_eta():
    with pytest.raises(ValueError, match="eta"):
        sample_ddim(lambda x, t: (x, x), torch.zeros(1, 1), 2, scalings=flow_scalings, eta=-1.0)
