"""The one exception type that user-facing code raises for bad input.

The CLI turns a :class:`FedknError` into a single ``fedkn: error: ...`` line and a non-zero
exit, so every message must be a complete sentence that says what to change.
"""


class FedknError(ValueError):
    """Bad input from the user (config, CLI flag, dataset directory, checkpoint)."""


class DivergedError(FedknError):
    """Local training's loss became non-finite: the lr is too high for this run.

    A type of its own so that lr tuning can record the lr as diverged and go on, by ``isinstance``
    rather than by the wording. It crosses the client/server boundary as its own Flower error code
    (:data:`fedkn.protocol.ERROR_CODE_DIVERGED`). ``reason`` is the message without the run's
    location, which the runner appends.
    """

    def __init__(self, reason: str, where: str = "") -> None:
        super().__init__(f"{reason} ({where})" if where else reason)
        self.reason = reason
