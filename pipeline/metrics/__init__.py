"""Generative metrics: the offline evaluator, metric math, and their composition."""
