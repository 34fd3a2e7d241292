"""jharm.eval."""
