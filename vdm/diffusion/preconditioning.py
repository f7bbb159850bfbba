"""How one network's output is read under each objective: the preconditioner around the network.

Every objective in vdm puts data and noise on a line,

    x_t = alpha(t) x0 + sigma(t) noise           flow: alpha = 1 - t, sigma = t;  DDPM: alpha^2 + sigma^2 = 1,

and asks the network net(x_t, t, cond) for one fixed linear combination of the two,

    out = c_data x0 + c_noise noise:
        "velocity"  (-1, 1)              rectified flow, v = dx_t/dt (Liu et al. 2022)
        "epsilon"   (0, 1)               the noise (Ho et al. 2020)
        "v"         (-sigma, alpha)      v-prediction (Salimans & Ho 2022, Sec. 4)

Given x_t and out, (x0, noise) solve a 2 x 2 linear system, so every sampler can work from the pair
(see `denoise`) and one network trains under any objective: only the target and the reading change,
never the network (k-diffusion's Denoiser and EDM's EDMPrecond wrap theirs the same way). The network's
input needs no scaling: both paths keep x_t at about unit variance for unit-variance data.

alpha and sigma are (B,) per-sample tensors; x0, noise, x_t and out are (B, ...) alike.
"""

from __future__ import annotations

import torch
from torch import Tensor

PREDICTIONS = ("velocity", "epsilon", "v")


def per_sample(value: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, 1, ...) broadcastable against `like`, in its dtype."""
    return value.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)} (prediction={prediction!r})")


def output_coefficients(prediction: str, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """(c_data, c_noise), each (B,): what the network is asked for is c_data x0 + c_noise noise."""
    check_prediction(prediction)
    if prediction == "velocity":
        return -torch.ones_like(alpha), torch.ones_like(alpha)
    if prediction == "epsilon":
        return torch.zeros_like(alpha), torch.ones_like(alpha)
    return -sigma, alpha  # v = alpha noise - sigma x0 (Salimans & Ho 2022, Sec. 4)


def target(prediction: str, x0: Tensor, noise: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The regression target c_data x0 + c_noise noise, like x0."""
    c_data, c_noise = output_coefficients(prediction, alpha, sigma)
    return per_sample(c_data, x0) * x0 + per_sample(c_noise, x0) * noise


def _determinant(prediction: str, alpha: Tensor, sigma: Tensor) -> Tensor:
    # of [[alpha, sigma], [c_data, c_noise]]: 1 for velocity and for v on a variance-preserving path,
    # alpha for epsilon, which is why epsilon cannot give x0 where alpha = 0 (zero terminal SNR)
    c_data, c_noise = output_coefficients(prediction, alpha, sigma)
    return alpha * c_noise - sigma * c_data


def denoise(prediction: str, out: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """(x0_hat, noise_hat), each like x_t: the data and noise that x_t and the network output imply.

    Cramer's rule on  [alpha   sigma  ] [x0   ]   [x_t]
                      [c_data  c_noise] [noise] = [out].
    """
    c_data, c_noise = output_coefficients(prediction, alpha, sigma)
    det = _determinant(prediction, alpha, sigma)
    x0_hat = (per_sample(c_noise / det, x_t) * x_t) - per_sample(sigma / det, x_t) * out
    noise_hat = per_sample(alpha / det, x_t) * out - per_sample(c_data / det, x_t) * x_t
    return x0_hat, noise_hat


def snr(alpha: Tensor, sigma: Tensor) -> Tensor:
    """Signal-to-noise ratio alpha^2 / sigma^2 (Kingma et al. 2021), (B,); inf at t = 0, 0 at zero terminal SNR."""
    return alpha.square() / sigma.square()


def min_snr_weight(prediction: str, alpha: Tensor, sigma: Tensor, gamma: float) -> Tensor:
    """(B,) loss weights of Min-SNR-gamma (Hang et al. 2023, Sec. 3.4) for a loss on this prediction.

    Min-SNR weights the error in x0 by min(SNR, gamma). An error e in the output is an error
    (sigma / det) e in x0 (from `denoise`), so the weight on the output's squared error is
    min(SNR, gamma) (sigma / det)^2: min(SNR, gamma) / SNR for epsilon and min(SNR, gamma) / (SNR + 1)
    for v, as in the paper, and min(SNR, gamma) t^2 for the flow velocity.
    """
    det = _determinant(prediction, alpha, sigma)
    return snr(alpha, sigma).clamp(max=gamma) * (sigma / det).square()
