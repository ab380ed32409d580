"""Transformer building blocks shared by every family."""
