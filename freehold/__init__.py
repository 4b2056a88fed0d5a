"""Freehold: own your AI. Keep verified open weights, serve them, adapt them, measure them."""

__version__ = "0.1.0"
