"""jharm.diffusion."""
