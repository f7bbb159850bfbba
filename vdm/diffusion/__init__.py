"""Training objectives, samplers and guidance. Conventions: t = 0 is data, t = 1 is noise."""

from vdm.diffusion.flow import RectifiedFlow, interpolate, sample_logit_normal, velocity_target
from vdm.diffusion.guidance import cat_text_conds, classifier_free_guidance
from vdm.diffusion.samplers import sample_euler, time_grid

__all__ = [
    "RectifiedFlow",
    "cat_text_conds",
    "classifier_free_guidance",
    "interpolate",
    "sample_euler",
    "sample_logit_normal",
    "time_grid",
    "velocity_target",
]
