"""jharm: a JAX/Flax library for harmless generation.

Makes diffusion models safer and measures how safe they are: concept erasure
(ESD, UCE, SLD, Co-Erasing), fairness (LightFair and baselines) and backdoors in
image-to-image bridges (I2SB, MixBridge). See README.md.
"""
__version__ = "0.1.0"


def load_pipeline(path: str, **kwargs):
    """Load a local diffusers SD folder as Flax modules + params (see :mod:`jharm.pipeline`)."""
    from jharm.pipeline import load_pipeline as _load

    return _load(path, **kwargs)
