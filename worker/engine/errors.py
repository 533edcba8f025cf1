"""Exceptions the engine raises for problems a user can act on.

Every message is a full sentence that says what is wrong and what to do. Callers (the CLI, the
worker tasks) show ``str(exc)`` as is; anything that is not an ``EngineError`` is a bug.
"""


class EngineError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""


class ModelLoadError(EngineError):
    """A model cannot be found, downloaded or loaded, or its blocks cannot be located."""


class DataError(EngineError):
    """A corpus, token store or activation file is missing, empty or malformed."""


class ConfigError(EngineError):
    """A configuration value is out of range or conflicts with another.

    ``errors`` maps each bad option (a TrainConfig field name; ``"activations"`` for the
    "activation file, or model and dataset" rule) to its sentence; ``str(exc)`` is the first.
    """

    def __init__(self, message: str, errors: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.errors: dict[str, str] = dict(errors or {})


class CheckpointError(EngineError):
    """A checkpoint is missing, corrupt or does not match the configuration."""


class TrainingError(EngineError):
    """Training cannot go on (NaN loss, out of memory at the smallest batch)."""


class FolderInUse(EngineError):
    """A run folder (or the data folder's worker lock) is held by another process or thread."""

    def __init__(self, message: str, holder: str = "unknown") -> None:
        super().__init__(message)
        self.holder = holder
        """The pid the holder wrote into the lock file."""
