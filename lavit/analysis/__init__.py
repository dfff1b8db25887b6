"""Measurements of a model that training callbacks and tools share: MACs and attention saturation."""
