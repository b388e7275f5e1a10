"""Optuna define-by-run search spaces, one module per method (distributions only)."""
