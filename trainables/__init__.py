"""Trainables (one module per method) and the leaf utilities they share."""
