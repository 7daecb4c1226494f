"""The one exception type that user-facing code raises for bad input.

The CLI turns a :class:`FedknError` into a single ``fedkn: error: ...`` line and a non-zero
exit, so every message must be a complete sentence that says what to change.
"""


class FedknError(ValueError):
    """Bad input from the user (config, CLI flag, dataset directory, checkpoint)."""
