"""One network, three readings of its output: targets, their inversion and Min-SNR weights."""

from __future__ import annotations

import pytest
import torch

from vdm.diffusion import PREDICTIONS, denoise, min_snr_weight, snr, target

B = 5


def path(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    if kind == "flow":
        return 1 - t, t
    alpha_bar = torch.cos(t * torch.pi / 2).square()  # a variance-preserving path with alpha(1) = 0
    return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()


def pairs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, 3, 2, 4, 4, generator=g, dtype=torch.float64), torch.randn(
        B, 3, 2, 4, 4, generator=g, dtype=torch.float64
    )


def test_targets_are_the_definitions():
    x0, noise = pairs()
    alpha, sigma = path("vp")
    a, s = alpha.reshape(-1, 1, 1, 1, 1), sigma.reshape(-1, 1, 1, 1, 1)
    torch.testing.assert_close(target("epsilon", x0, noise, alpha, sigma), noise)
    torch.testing.assert_close(target("v", x0, noise, alpha, sigma), a * noise - s * x0)  # Salimans & Ho 2022
    alpha, sigma = path("flow")
    torch.testing.assert_close(target("velocity", x0, noise, alpha, sigma), noise - x0)


@pytest.mark.parametrize(("prediction", "kind"), [("velocity", "flow"), ("epsilon", "vp"), ("v", "vp")])
def test_denoise_inverts_the_target(prediction, kind):
    # an exact output recovers exactly the data and noise that made x_t, wherever the system is regular
    x0, noise = pairs()
    alpha, sigma = path(kind)
    keep = slice(0, 4) if prediction == "epsilon" else slice(None)  # epsilon is singular where alpha = 0
    x0, noise, alpha, sigma = x0[keep], noise[keep], alpha[keep], sigma[keep]
    x_t = alpha.reshape(-1, 1, 1, 1, 1) * x0 + sigma.reshape(-1, 1, 1, 1, 1) * noise
    out = target(prediction, x0, noise, alpha, sigma)
    x0_hat, noise_hat = denoise(prediction, out, x_t, alpha, sigma)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(noise_hat, noise)


def test_min_snr_weights_are_hang_et_al():
    gamma = 5.0
    alpha, sigma = path("vp")
    ratio = snr(alpha, sigma)
    assert ratio[0].item() == float("inf") and ratio[-1].item() == pytest.approx(0.0, abs=1e-30)
    inner = slice(1, 4)  # finite, nonzero SNR
    capped = ratio[inner].clamp(max=gamma)
    torch.testing.assert_close(min_snr_weight("epsilon", alpha, sigma, gamma)[inner], capped / ratio[inner])
    torch.testing.assert_close(min_snr_weight("v", alpha, sigma, gamma)[inner], capped / (ratio[inner] + 1))
    alpha, sigma = path("flow")
    torch.testing.assert_close(
        min_snr_weight("velocity", alpha, sigma, gamma), snr(alpha, sigma).clamp(max=gamma) * sigma.square()
    )
    for prediction in PREDICTIONS:  # finite at both ends: no inf * 0
        kind = "flow" if prediction == "velocity" else "vp"
        weights = min_snr_weight(prediction, *path(kind), gamma)
        assert torch.isfinite(weights).all() and (weights >= 0).all()


def test_min_snr_weight_equals_x0_weighting():
    # the weighted output error equals min(SNR, gamma) times the error of the implied x0
    x0, noise = pairs()
    gamma = 5.0
    for prediction, kind in [("velocity", "flow"), ("epsilon", "vp"), ("v", "vp")]:
        alpha, sigma = (v[1:4] for v in path(kind))
        x_t = alpha.reshape(-1, 1, 1, 1, 1) * x0[1:4] + sigma.reshape(-1, 1, 1, 1, 1) * noise[1:4]
        exact = target(prediction, x0[1:4], noise[1:4], alpha, sigma)
        wrong = exact + 0.1 * torch.randn(exact.shape, generator=torch.Generator().manual_seed(1), dtype=exact.dtype)
        x0_error = (denoise(prediction, wrong, x_t, alpha, sigma)[0] - x0[1:4]).square().mean(dim=(1, 2, 3, 4))
        out_error = (wrong - exact).square().mean(dim=(1, 2, 3, 4))
        torch.testing.assert_close(
            min_snr_weight(prediction, alpha, sigma, gamma) * out_error,
            snr(alpha, sigma).clamp(max=gamma) * x0_error,
        )


def test_unknown_prediction_is_refused():
    with pytest.raises(ValueError, match="prediction"):
        target("x0", *pairs(), *path("vp"))
