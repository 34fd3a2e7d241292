"""jharm.models."""
