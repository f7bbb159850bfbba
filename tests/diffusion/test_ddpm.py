from __future__ import annotations

import pytest
import torch

from vdm.diffusion import DDPM, make_schedule
from vdm.types import TextCond

B, C, T, H, W = 4, 3, 2, 4, 4


def data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, T, H, W, generator=g), torch.randn(B, C, T, H, W, generator=g)


def text(batch: int = B) -> TextCond:
    return TextCond(torch.zeros(batch, 3, 8), torch.ones(batch, 3, dtype=torch.bool), torch.zeros(batch, 8))


def per_sample(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, 1, 1, 1, 1)


def test_draws_discrete_steps_then_noise():
    x0, _ = data()
    ddpm = DDPM(num_timesteps=10)
    t, noise = ddpm.draw(x0.repeat(100, 1, 1, 1, 1), torch.Generator().manual_seed(0))
    assert t.dtype == torch.float32 and noise.shape == (100 * B, C, T, H, W)
    steps = t * 10
    torch.testing.assert_close(steps, steps.round())
    assert set(steps.round().int().tolist()) == set(range(1, 11))  # n in 1 .. N: never the clean t = 0
    g = torch.Generator().manual_seed(0)  # order: t first, then noise, both from the generator
    n = torch.randint(1, 11, (100 * B,), generator=g)
    assert torch.equal(t, n.float() / 10) and torch.equal(noise, torch.randn(noise.shape, generator=g))


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_the_noising_is_the_schedule_and_the_oracle_has_zero_loss(prediction):
    x0, noise = data()
    ddpm = DDPM(prediction, "cosine")
    t = torch.tensor([0.001, 0.25, 0.5, 1.0])
    alpha_bar = make_schedule("cosine", 1000)[[1, 250, 500, 1000]].float()
    alpha, sigma = per_sample(alpha_bar.sqrt()), per_sample((1 - alpha_bar).sqrt())
    seen = {}

    def oracle(x_t, t_in, cond):
        seen["x_t"], seen["t"] = x_t, t_in
        return noise if prediction == "epsilon" else alpha * noise - sigma * x0

    loss = ddpm.loss_at(oracle, x0, text(), t, noise)
    torch.testing.assert_close(seen["x_t"], alpha * x0 + sigma * noise)
    assert seen["t"] is t  # the network reads vdm's continuous t, whatever the objective
    torch.testing.assert_close(loss, torch.zeros(B), rtol=0, atol=1e-10)


def test_loss_is_mean_squared_error_and_min_snr_weighted():
    x0, noise = data()
    t = torch.tensor([0.1, 0.3, 0.6, 0.9])
    zero = lambda x, t, cond: torch.zeros_like(x)
    plain = DDPM("epsilon").loss_at(zero, x0, text(), t, noise)
    torch.testing.assert_close(plain, noise.square().mean(dim=(1, 2, 3, 4)))
    weighted = DDPM("epsilon", min_snr_gamma=5.0).loss_at(zero, x0, text(), t, noise)
    alpha, sigma = DDPM("epsilon").scalings(t)
    snr = alpha**2 / sigma**2
    torch.testing.assert_close(weighted, plain * snr.clamp(max=5.0) / snr)  # Hang et al. 2023 for epsilon


def test_same_seed_same_loss_and_float32_under_bf16():
    x0, _ = data()
    net = lambda x, t, cond: x * t.reshape(-1, 1, 1, 1, 1)
    ddpm = DDPM("v", "cosine", zero_terminal_snr=True)
    a = ddpm(net, x0, text(), torch.Generator().manual_seed(7))
    b = ddpm(net, x0, text(), torch.Generator().manual_seed(7))
    c = ddpm(net, x0, text(), torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    low = ddpm(net, x0.bfloat16(), text(), torch.Generator().manual_seed(7))
    assert low.dtype == torch.float32 and low.shape == (B,) and torch.isfinite(low).all()


def test_loss_anywhere_in_time():
    # the held-out loss asks at t off the grid and at the very ends
    x0, noise = data()
    t = torch.tensor([0.0, 0.0005, 0.5123, 1.0])
    for ddpm in [DDPM("epsilon"), DDPM("v", "cosine", zero_terminal_snr=True, min_snr_gamma=5.0)]:
        loss = ddpm.loss_at(lambda x, t, cond: torch.zeros_like(x), x0, text(), t, noise)
        assert loss.shape == (B,) and torch.isfinite(loss).all()


def test_sampler_names():
    model_fn = lambda x, t: torch.zeros_like(x)
    noise = torch.randn(2, 1, 1, 2, 2)
    ddpm = DDPM("v", "cosine", zero_terminal_snr=True)
    assert torch.equal(ddpm.sample(model_fn, noise, steps=3), ddpm.sample(model_fn, noise, steps=3, sampler="ddim"))
    with pytest.raises(ValueError, match="ddim, ddpm"):
        ddpm.sample(model_fn, noise, steps=3, sampler="euler")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(prediction="velocity"), "prediction"),
        (dict(prediction="epsilon", zero_terminal_snr=True), "zero_terminal_snr needs prediction=v"),
        (dict(schedule="sigmoid"), "schedule"),
        (dict(num_timesteps=1), "num_timesteps"),
        (dict(min_snr_gamma=-1.0), "min_snr_gamma"),
    ],
)
def test_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DDPM(**kwargs)
