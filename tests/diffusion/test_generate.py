"""generate(): prompts to videos under any objective and sampler; the same seed gives the same video."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vdm.autoencoders import IdentityAutoencoder
from vdm.diffusion import DDPM, RectifiedFlow, time_grid
from vdm.generate import SamplingSettings, generate
from vdm.types import TextCond

D = 8  # text width
PROMPTS = ["the digit 1 moves up", "the digit 2 moves left"]


class FakeTextEncoder:
    """A different pooled vector per caption, zeros for ""."""

    dim = D

    def encode(self, prompts: list[str]) -> TextCond:
        pooled = torch.stack([torch.arange(D) * (sum(map(ord, p)) % 7) / 10.0 for p in prompts])  # (B, D)
        return TextCond(pooled[:, None, :], torch.ones(len(prompts), 1, dtype=torch.bool), pooled)


class SpyNet(nn.Module):
    """out = a x + b t + text; records the batch size and t of every call."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(-0.5))
        self.b = nn.Parameter(torch.tensor(0.2))
        self.calls: list[tuple[int, float]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: TextCond) -> torch.Tensor:
        self.calls.append((x.shape[0], t[0].item()))
        text = cond.pooled.mean(dim=1).reshape(-1, 1, 1, 1, 1)
        return self.a * x + self.b * t.reshape(-1, 1, 1, 1, 1) + text


def run(objective, settings: SamplingSettings, net: SpyNet | None = None) -> torch.Tensor:
    net = net or SpyNet()
    return generate(
        net, FakeTextEncoder(), IdentityAutoencoder(3), objective, PROMPTS, num_frames=2, size=4, settings=settings
    )


CASES = [
    (RectifiedFlow(), "euler"),
    (RectifiedFlow(shift_reference=(1, 4, 4)), "heun"),
    (DDPM("epsilon", "linear"), "ddim"),
    (DDPM("v", "cosine", zero_terminal_snr=True), "ddim"),
    (DDPM("v", "cosine", zero_terminal_snr=True), "ddpm"),
]


@pytest.mark.parametrize(("objective", "sampler"), CASES, ids=lambda v: str(v)[:30])
def test_same_seed_same_video_for_every_sampler(objective, sampler):
    settings = lambda seed: SamplingSettings(steps=3, sampler=sampler, guidance_scale=3.0, seed=seed)
    a, b, c = run(objective, settings(0)), run(objective, settings(0)), run(objective, settings(1))
    assert a.shape == (2, 3, 2, 4, 4) and a.dtype == torch.float32
    assert a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_settings_reach_the_sampler_and_the_guidance():
    net = SpyNet()
    run(RectifiedFlow(), SamplingSettings(steps=4), net)  # euler, guided everywhere: batches of 2 N
    assert [n for n, _ in net.calls] == [4] * 4
    assert [t for _, t in net.calls] == pytest.approx(time_grid(4)[:-1].tolist())
    net.calls.clear()
    run(RectifiedFlow(), SamplingSettings(steps=4, sampler="heun", guidance_interval=[0.4, 0.8]), net)
    expected = [1.0, 0.75, 0.75, 0.5, 0.5, 0.25, 0.25]  # Heun's evaluations
    assert [t for _, t in net.calls] == pytest.approx(expected)
    assert [n for n, _ in net.calls] == [4 if 0.4 <= t <= 0.8 else 2 for t in expected]
    net.calls.clear()
    run(RectifiedFlow(), SamplingSettings(steps=2, guidance_scale=1.0, shift=3.0), net)  # shift overrides
    assert net.calls == [(2, 1.0), (2, pytest.approx(0.75))]


def test_the_objective_shift_rule_applies_by_default():
    net = SpyNet()
    # latents (2, 3, 2, 4, 4) against a (1, 2, 2) reference: shift sqrt(32 / 4) = 2 sqrt(2)
    run(RectifiedFlow(shift_reference=(1, 2, 2)), SamplingSettings(steps=2, guidance_scale=1.0), net)
    s = 8**0.5
    assert [t for _, t in net.calls] == pytest.approx([1.0, s * 0.5 / (1 + (s - 1) * 0.5)])


def test_a_sampler_the_objective_does_not_have_is_refused_by_name():
    with pytest.raises(ValueError, match="valid samplers are ddim, ddpm"):
        run(DDPM("epsilon"), SamplingSettings(steps=2, sampler="heun"))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("steps", 0),
        ("steps", 2.5),
        ("sampler", "dpm++"),
        ("guidance_scale", -1.0),
        ("guidance_interval", [0.5]),
        ("guidance_interval", [0.8, 0.2]),
        ("guidance_interval", [0.0, 1.5]),
        ("shift", 0.0),
        ("seed", 1.5),
        ("fps", 0),
        ("prompts", "one prompt"),
    ],
)
def test_settings_refuse_bad_values_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingSettings(**{field: value})


def test_default_settings_are_the_objective_defaults():
    settings = SamplingSettings()
    assert settings.sampler is None and settings.shift is None and settings.guidance_interval == [0.0, 1.0]
