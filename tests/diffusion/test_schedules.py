"""DDPM schedules against their definitions (Ho et al. 2020, Nichol & Dhariwal 2021, Lin et al. 2023)."""

from __future__ import annotations

import math

import pytest
import torch

from vdm.diffusion import alpha_bar_at, cosine_schedule, linear_schedule, make_schedule, rescale_zero_terminal_snr

N = 1000


def snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    return alpha_bar / (1 - alpha_bar)


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_alpha_bar_starts_at_one_and_strictly_decreases(name, zero_terminal_snr):
    alpha_bar = make_schedule(name, N, zero_terminal_snr)
    assert alpha_bar.shape == (N + 1,) and alpha_bar.dtype == torch.float64
    assert alpha_bar[0].item() == 1.0  # t = 0 is the data
    assert (alpha_bar[1:] < alpha_bar[:-1]).all()  # SNR falls with every step
    assert (alpha_bar >= 0).all()
    if zero_terminal_snr:
        assert alpha_bar[N].item() == 0.0  # exactly: SNR(T) = 0
    else:
        assert alpha_bar[N].item() > 0


def test_linear_schedule_is_the_product_of_ho_et_al_betas():
    betas = torch.linspace(1e-4, 0.02, N, dtype=torch.float64)
    alpha_bar = linear_schedule(N)
    n = torch.tensor([1, 10, 500, N])
    expected = torch.tensor([torch.prod(1 - betas[:k]).item() for k in n.tolist()], dtype=torch.float64)
    torch.testing.assert_close(alpha_bar[n], expected, rtol=1e-12, atol=0)
    # the terminal SNR that Lin et al. 2023 (Table 1) call "not zero": 4.04e-5
    assert snr(alpha_bar)[N].item() == pytest.approx(4.04e-5, rel=0.01)


def test_linear_schedule_keeps_its_total_noise_for_other_step_counts():
    # betas scaled by 1000 / N: log alpha_bar at the same t nearly agrees for N = 1000 and N = 250
    coarse, fine = linear_schedule(250).log(), linear_schedule(N)[::4].log()
    torch.testing.assert_close(coarse[[125, 250]], fine[[125, 250]], rtol=0.03, atol=0)


def test_cosine_schedule_follows_its_closed_form_until_the_clip():
    s = 0.008
    f = lambda t: math.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = cosine_schedule(N)
    for n in [0, 1, 250, 500, 900]:
        assert alpha_bar[n].item() == pytest.approx(f(n / N) / f(0), rel=1e-9)
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    assert betas.max().item() == pytest.approx(0.999)  # clipped, not 1 (Nichol & Dhariwal 2021, Sec. 3.2)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_zero_terminal_snr_is_algorithm_1_of_lin_et_al(name):
    original = make_schedule(name, N)
    rescaled = rescale_zero_terminal_snr(original)
    assert rescaled[N].item() == 0.0
    assert rescaled[1].item() == pytest.approx(original[1].item(), rel=1e-12)  # the first noisy step keeps its SNR
    # sqrt(alpha_bar) over steps 1 .. N is an affine function of the original's
    a, b = original[1:].sqrt(), rescaled[1:].sqrt()
    slope = (b[0] - b[-1]) / (a[0] - a[-1])
    torch.testing.assert_close(b, b[-1] + slope * (a - a[-1]), rtol=0, atol=1e-12)


def test_alpha_bar_at_continuous_t():
    alpha_bar = make_schedule("cosine", N, zero_terminal_snr=True)
    on_grid = torch.tensor([0.0, 0.25, 0.5, 1.0])
    torch.testing.assert_close(alpha_bar_at(alpha_bar, on_grid), alpha_bar[[0, 250, 500, N]], rtol=1e-6, atol=0)
    assert alpha_bar_at(alpha_bar, torch.ones(1)).item() == 0.0 and alpha_bar_at(alpha_bar, torch.zeros(1)).item() == 1
    between = alpha_bar_at(alpha_bar, torch.tensor([0.2505], dtype=torch.float64))
    torch.testing.assert_close(between, (alpha_bar[250] + alpha_bar[251]).reshape(1) / 2)


@pytest.mark.parametrize(
    ("name", "num_timesteps", "match"), [("quadratic", N, "schedule"), ("linear", 1, "num_timesteps")]
)
def test_make_schedule_rejects(name, num_timesteps, match):
    with pytest.raises(ValueError, match=match):
        make_schedule(name, num_timesteps)
