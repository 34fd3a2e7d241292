"""jharm.shapesworld."""
