"""Sweep entry points (one thin script per method) and the engine they share."""
