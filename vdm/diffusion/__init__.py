"""Training objectives, samplers and guidance. Conventions: t = 0 is data, t = 1 is noise.

    flow.py             rectified flow (the default objective), logit-normal times
    ddpm.py             DDPM with epsilon or v prediction
    schedules.py        DDPM's linear and cosine schedules, zero terminal SNR
    shift.py            the SD3 timestep shift, fixed or from the clip's size
    preconditioning.py  how one network's output reads under each objective; Min-SNR weights
    samplers.py         Euler, Heun, DDIM / ancestral: stateless
    guidance.py         classifier-free guidance, with a guidance interval

Every objective provides draw(x0, generator) -> (t, noise), loss_at(net, x0, cond, t, noise) -> (B,),
__call__(net, x0, cond, generator) -> (B,), sample(model_fn, noise, *, steps, sampler, generator, shift)
and `samplers`, the names its sample() takes (the first is its default).
"""

from vdm.diffusion.ddpm import DDPM
from vdm.diffusion.flow import RectifiedFlow, interpolate, sample_logit_normal, velocity_target
from vdm.diffusion.guidance import cat_text_conds, classifier_free_guidance
from vdm.diffusion.preconditioning import PREDICTIONS, denoise, min_snr_weight, snr, target
from vdm.diffusion.samplers import check_sampler, sample_ddim, sample_euler, sample_heun, time_grid
from vdm.diffusion.schedules import (
    alpha_bar_at,
    cosine_schedule,
    linear_schedule,
    make_schedule,
    rescale_zero_terminal_snr,
)
from vdm.diffusion.shift import shift_for_shape, shift_time

SAMPLERS = (*RectifiedFlow.samplers, *DDPM.samplers)  # every sampler name some objective takes

__all__ = [
    "DDPM",
    "PREDICTIONS",
    "SAMPLERS",
    "RectifiedFlow",
    "alpha_bar_at",
    "cat_text_conds",
    "check_sampler",
    "classifier_free_guidance",
    "cosine_schedule",
    "denoise",
    "interpolate",
    "linear_schedule",
    "make_schedule",
    "min_snr_weight",
    "rescale_zero_terminal_snr",
    "sample_ddim",
    "sample_euler",
    "sample_heun",
    "sample_logit_normal",
    "shift_for_shape",
    "shift_time",
    "snr",
    "target",
    "time_grid",
    "velocity_target",
]
