"""The user-facing errors: each is one line naming the bad input (file, key, value or tensor) and what
was expected; ``mindport`` prints it and exits with 2 (:mod:`mindport.cli`)."""


class ConfigError(ValueError):
    """A configuration key holds a value mindport cannot use."""


class CheckpointError(ValueError):
    """A checkpoint file or tensor is not what mindport expected."""
