"""Every objective and sampler, driven by the ideal network for Gaussian data, reproduces the data.

For x0 ~ N(MU, SIGMA^2) per element and x_t = alpha x0 + sigma n, x_t ~ N(alpha MU, s2) with
s2 = alpha^2 SIGMA^2 + sigma^2, and Gaussian conditioning gives the ideal network in closed form:
    E[x0 | x_t] = MU + alpha SIGMA^2 / s2 (x_t - alpha MU),    E[n | x_t] = sigma / s2 (x_t - alpha MU),
and the ideal output is c_data E[x0 | x_t] + c_noise E[n | x_t] for the objective's prediction.
The probability-flow ODE then maps each noise sample n to MU + SIGMA n (it keeps the quantile).

Tolerance: with 20,000 samples the standard error of the sample mean is SIGMA / sqrt(20,000) = 0.002 and
of the sample std 0.0015; samples must match MU and SIGMA within 0.01, about 5 standard errors, which
leaves room for the samplers' discretization error at the steps used.
"""

from __future__ import annotations

import pytest
import torch

from vdm.diffusion import DDPM, RectifiedFlow

MU, SIGMA = 0.7, 0.3
TOLERANCE = 0.01


def ideal_network(objective, prediction: str):
    def scalings(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(objective, RectifiedFlow):
            return 1 - t.double(), t.double()
        alpha, sigma = objective.scalings(t)
        return alpha.double(), sigma.double()

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = (s.reshape(-1, *([1] * (x.ndim - 1))) for s in scalings(t))
        centered = x.double() - alpha * MU
        s2 = alpha**2 * SIGMA**2 + sigma**2
        x0_hat, n_hat = MU + alpha * SIGMA**2 / s2 * centered, sigma / s2 * centered
        outputs = {"velocity": n_hat - x0_hat, "epsilon": n_hat, "v": alpha * n_hat - sigma * x0_hat}
        return outputs[prediction].float()

    return model_fn


def noise(n: int = 20_000, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 1, 1, 1, generator=torch.Generator().manual_seed(seed))  # (B, C, T, H, W)


CASES = [
    # (objective, prediction, sampler, steps)
    (RectifiedFlow(), "velocity", "euler", 200),
    (RectifiedFlow(), "velocity", "heun", 25),
    (RectifiedFlow(shift=3.0), "velocity", "heun", 50),
    (DDPM("epsilon", "linear"), "epsilon", "ddim", 200),
    (DDPM("epsilon", "cosine"), "epsilon", "ddim", 100),
    (DDPM("v", "linear"), "v", "ddim", 200),
    (DDPM("v", "cosine", zero_terminal_snr=True), "v", "ddim", 100),
    (DDPM("epsilon", "linear"), "epsilon", "ddpm", 500),
    (DDPM("v", "cosine", zero_terminal_snr=True), "v", "ddpm", 500),
]


@pytest.mark.parametrize(("objective", "prediction", "sampler", "steps"), CASES, ids=lambda v: str(v)[:40])
def test_ideal_network_reproduces_gaussian_mean_and_variance(objective, prediction, sampler, steps):
    x0 = objective.sample(
        ideal_network(objective, prediction),
        noise(),
        steps=steps,
        sampler=sampler,
        generator=torch.Generator().manual_seed(1),
    )
    assert x0.shape == (20_000, 1, 1, 1, 1) and torch.isfinite(x0).all()
    assert abs(x0.mean().item() - MU) < TOLERANCE
    assert abs(x0.std().item() - SIGMA) < TOLERANCE


@pytest.mark.parametrize(
    ("objective", "prediction", "sampler", "order"),
    [
        (RectifiedFlow(), "velocity", "euler", 1),
        (RectifiedFlow(), "velocity", "heun", 2),
        (RectifiedFlow(shift=3.0), "velocity", "heun", 2),
        (DDPM("v", "cosine", zero_terminal_snr=True), "v", "ddim", 1),
    ],
    ids=lambda v: str(v)[:40],
)
def test_deterministic_samplers_converge_to_the_exact_map_at_their_order(objective, prediction, sampler, order):
    # doubling the steps divides the error by 2^order; with zero terminal SNR sampling starts from the exact
    # t = 1 distribution, so DDIM's map is exact in the limit too
    n = noise(2_000)
    exact = MU + SIGMA * n
    errors = [
        (objective.sample(ideal_network(objective, prediction), n, steps=steps, sampler=sampler) - exact).abs().max()
        for steps in (50, 100)
    ]
    assert errors[0] < 0.1
    assert (errors[1] / errors[0]).item() == pytest.approx(0.5**order, rel=0.15)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_the_sample_does_not_depend_on_the_parameterization(sampler):
    # the ideal epsilon and v networks imply the same (x0, noise): DDIM and ancestral sampling agree
    eps, v = DDPM("epsilon", "cosine"), DDPM("v", "cosine")
    a, b = (
        objective.sample(
            ideal_network(objective, prediction),
            noise(500),
            steps=20,
            sampler=sampler,
            generator=torch.Generator().manual_seed(3),
        )
        for objective, prediction in [(eps, "epsilon"), (v, "v")]
    )
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
