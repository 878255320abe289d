"""Errors raised by the streaming manager (it never imports flux2_core, so it has its own)."""


class StreamingError(ValueError):
    """A model, budget or setting the manager cannot work with; the message says how to fix it."""
