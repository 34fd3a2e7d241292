"""jharm: a JAX/Flax library for harmless generation.

Makes diffusion models safer and measures how safe they are: concept erasure
(ESD, UCE, SLD, Co-Erasing), fairness (LightFair and baselines) and backdoors in
image-to-image bridges (I2SB, MixBridge). See README.md.
"""
__version__ = "0.1.0"
