"""Data: the synthetic shapes set, offline look-ups, and clear handling of bad labels and video frames."""
