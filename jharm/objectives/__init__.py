"""jharm.objectives."""
