"""Classifier training: recipes, the per-batch engine, and the Ray Train glue."""
