"""jharm.edits."""
