"""The error fine-tuning raises for input it cannot use; the message says what to fix."""

from plugin.errors import PacsclipError


class FinetuneError(PacsclipError):
    """Pairs, images or reports cannot be used to fine-tune, or the bundle cannot be tuned."""
