"""Heads on embeddings, Optuna studies, metrics, reports and prediction (built on the feature store)."""
