"""jharm.train."""
