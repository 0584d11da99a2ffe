"""Hyperparameter sweeps of the D-VAE (Ray Tune + Optuna), tracked and compared in MLflow."""
