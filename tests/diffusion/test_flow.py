from __future__ import annotations

import math

import pytest
import torch

from vdm.diffusion import RectifiedFlow, interpolate, sample_logit_normal, velocity_target
from vdm.types import TextCond

B, C, T, H, W = 4, 3, 2, 4, 4


def data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, T, H, W, generator=g), torch.randn(B, C, T, H, W, generator=g)


def text(batch: int = B) -> TextCond:
    return TextCond(torch.zeros(batch, 3, 8), torch.ones(batch, 3, dtype=torch.bool), torch.zeros(batch, 8))


def test_interpolation_endpoints():
    x0, noise = data()
    assert torch.equal(interpolate(x0, noise, torch.zeros(B)), x0)  # t = 0 is data
    assert torch.equal(interpolate(x0, noise, torch.ones(B)), noise)  # t = 1 is noise
    t = torch.tensor([0.0, 1.0, 0.0, 1.0])  # per sample
    mixed = interpolate(x0, noise, t)
    assert torch.equal(mixed[0], x0[0]) and torch.equal(mixed[1], noise[1])


def test_velocity_is_the_time_derivative_of_the_path():
    x0, noise = data()
    t, dt = torch.full((B,), 0.3, dtype=torch.float64), 1e-6
    x0, noise = x0.double(), noise.double()
    finite_difference = (interpolate(x0, noise, t + dt) - interpolate(x0, noise, t)) / dt
    torch.testing.assert_close(finite_difference, velocity_target(x0, noise), rtol=0, atol=1e-6)


def test_oracle_net_has_zero_loss_at_fixed_points():
    x0, noise = data()
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    loss = RectifiedFlow().loss_at(lambda x, t, cond: noise - x0, x0, text(), t, noise)
    assert loss.shape == (B,) and torch.equal(loss, torch.zeros(B))


def test_oracle_from_x_t_has_zero_loss_with_sampled_t_and_noise():
    # A net that knows only x0 recovers v = (x_t - x0) / t from its input: the objective hands the
    # net the same t it used to build x_t, and regresses the velocity of that same path.
    x0, _ = data()
    oracle = lambda x_t, t, cond: (x_t - x0) / t.reshape(-1, 1, 1, 1, 1)
    loss = RectifiedFlow()(oracle, x0, text(), torch.Generator().manual_seed(3))
    torch.testing.assert_close(loss, torch.zeros(B), rtol=0, atol=1e-9)


def test_loss_is_mean_squared_error_per_sample():
    x0, noise = data()
    t = torch.rand(B)
    loss = RectifiedFlow().loss_at(lambda x, t, cond: torch.zeros_like(x), x0, text(), t, noise)
    torch.testing.assert_close(loss, (noise - x0).square().mean(dim=(1, 2, 3, 4)))


def test_same_generator_seed_same_loss_and_draw_order():
    x0, _ = data()
    net = lambda x, t, cond: x * t.reshape(-1, 1, 1, 1, 1)
    flow = RectifiedFlow(logit_normal_mean=0.3, logit_normal_std=0.8)
    a = flow(net, x0, text(), torch.Generator().manual_seed(7))
    b = flow(net, x0, text(), torch.Generator().manual_seed(7))
    c = flow(net, x0, text(), torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    # documented order: t first, then the noise
    g = torch.Generator().manual_seed(7)
    t = sample_logit_normal(B, 0.3, 0.8, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    assert torch.equal(flow.loss_at(net, x0, text(), t, noise), a)


def test_bf16_input_gets_float32_loss_and_the_same_draws():
    x0, _ = data()
    seen = []
    net = lambda x, t, cond: seen.append(t) or torch.zeros_like(x)
    loss = RectifiedFlow()(net, x0.bfloat16(), text(), torch.Generator().manual_seed(1))
    RectifiedFlow()(net, x0, text(), torch.Generator().manual_seed(1))
    assert loss.dtype == torch.float32 and loss.shape == (B,)
    assert torch.equal(seen[0], seen[1])


def test_logit_normal_samples():
    g = torch.Generator().manual_seed(0)
    t = sample_logit_normal(20_000, mean=0.5, std=1.0, generator=g)
    assert t.shape == (20_000,) and t.dtype == torch.float32
    assert (t > 0).all() and (t < 1).all()
    assert abs(t.median().item() - 1 / (1 + math.exp(-0.5))) < 0.01  # median of sigmoid(u) = sigmoid(mean)
    assert torch.equal(t, sample_logit_normal(20_000, 0.5, 1.0, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("std", [0.0, -1.0])
def test_rejects_non_positive_std(std):
    with pytest.raises(ValueError, match="logit_normal_std"):
        RectifiedFlow(logit_normal_std=std)


def test_draw_is_what_the_objective_trains_on():
    x0, _ = data()
    net = lambda x, t, cond: x * t.reshape(-1, 1, 1, 1, 1)
    flow = RectifiedFlow()
    t, noise = flow.draw(x0, torch.Generator().manual_seed(4))
    assert t.shape == (B,) and t.dtype == torch.float32 and noise.shape == x0.shape
    assert torch.equal(flow(net, x0, text(), torch.Generator().manual_seed(4)), flow.loss_at(net, x0, text(), t, noise))


@pytest.mark.parametrize(
    ("shift", "reference", "shape", "expected"),
    [
        (3.0, None, (B, C, 8, 32, 32), 3.0),  # fixed
        (1.0, (1, 32, 32), (B, C, 1, 32, 32), 1.0),  # the reference shape keeps `shift`
        (1.0, (1, 32, 32), (B, C, 8, 32, 32), 8**0.5),  # 8 times the frames
        (1.0, (1, 32, 32), (B, C, 1, 64, 64), 2.0),  # 4 times the pixels
        (2.0, (4, 16, 16), (B, C, 16, 16, 16), 4.0),
    ],
)
def test_shift_from_resolution_and_length(shift, reference, shape, expected):
    assert RectifiedFlow(shift=shift, shift_reference=reference).shift_for(shape) == pytest.approx(expected)


def test_shifted_draws_are_the_unshifted_draws_moved_by_eq_23():
    x0, _ = data()  # (B, C, 2, 4, 4): shift sqrt(2 * 16 / 8) = 2 against a (2, 2, 2) reference
    t1, noise1 = RectifiedFlow().draw(x0, torch.Generator().manual_seed(5))
    t2, noise2 = RectifiedFlow(shift_reference=(2, 2, 2)).draw(x0, torch.Generator().manual_seed(5))
    assert torch.equal(noise1, noise2)  # the shift changes t only, not the draw order
    torch.testing.assert_close(t2, 2 * t1 / (1 + t1))
    assert (t2 > t1).all()  # more time at high noise


def test_min_snr_weights_the_flow_loss():
    x0, noise = data()
    t = torch.tensor([0.1, 0.3, 0.6, 0.9])
    zero = lambda x, t, cond: torch.zeros_like(x)
    plain = RectifiedFlow().loss_at(zero, x0, text(), t, noise)
    weighted = RectifiedFlow(min_snr_gamma=5.0).loss_at(zero, x0, text(), t, noise)
    snr = ((1 - t) / t) ** 2
    torch.testing.assert_close(weighted, plain * snr.clamp(max=5.0) * t**2)


def test_sample_uses_the_shift_for_the_noise_shape_and_the_named_sampler():
    seen = []
    velocity = lambda x, t: seen.append(t[0].item()) or torch.zeros_like(x)
    flow = RectifiedFlow(shift_reference=(1, 4, 4))  # noise (B, C, 2, 4, 4): shift sqrt(2)
    flow.sample(velocity, torch.zeros(B, C, T, H, W), steps=2)
    assert seen == pytest.approx([1.0, 2**0.5 * 0.5 / (1 + (2**0.5 - 1) * 0.5)])
    seen.clear()
    flow.sample(velocity, torch.zeros(B, C, T, H, W), steps=2, shift=1.0)  # an explicit shift wins
    assert seen == [1.0, 0.5]
    seen.clear()
    flow.sample(velocity, torch.zeros(B, C, T, H, W), steps=2, sampler="heun", shift=1.0)
    assert seen == [1.0, 0.5, 0.5]  # 2 steps - 1 evaluations
    with pytest.raises(ValueError, match="euler, heun"):
        flow.sample(velocity, torch.zeros(B, C, T, H, W), steps=2, sampler="ddim")


@pytest.mark.parametrize(
    "bad", [dict(shift=0.0), dict(shift_reference=(1, 32)), dict(shift_reference=(0, 1, 1)), dict(min_snr_gamma=0.0)]
)
def test_rejects_bad_shift_and_weighting(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        RectifiedFlow(**bad)
