"""jharm.diffusion: noise schedules, scanned samplers and guidance rules.

``schedules`` (NoiseSchedule, make_schedule, from_scheduler_config, add_noise,
...), ``samplers`` (make_plan, sample: DDIM/DDPM/Euler/LMS as one lax.scan) and
``guidance`` (CFG, SLD, FairDiffusion). See each module's docstring for the conventions.
"""
from jharm.diffusion.guidance import CFG, SLD, FairDiffusion, balanced_directions, sld_preset
from jharm.diffusion.samplers import SamplerPlan, make_plan, sample, step_noise
from jharm.diffusion.schedules import (
    NoiseSchedule,
    add_noise,
    diffusion_loss,
    from_scheduler_config,
    get_velocity,
    make_schedule,
    min_snr_weight,
    sd_schedule,
    snr,
    training_target,
    training_timesteps,
)

__all__ = [
    "CFG", "SLD", "FairDiffusion", "balanced_directions", "sld_preset", "SamplerPlan", "make_plan", "sample", "step_noise", "NoiseSchedule",
    "add_noise", "diffusion_loss", "from_scheduler_config", "get_velocity", "make_schedule", "min_snr_weight",
    "sd_schedule", "snr", "training_target", "training_timesteps",
]
