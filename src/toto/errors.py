"""Exceptions the CLI turns into one clear line and a non-zero exit code."""


class TotoError(Exception):
    """Base class: anything a user can fix (bad input, bad config, missing file)."""


class ConfigError(TotoError, ValueError):
    """A configuration value is invalid; the message names the field."""


class DataError(TotoError):
    """Input data (shards, media, index files) is missing, corrupt or incompatible."""


class CheckpointError(TotoError):
    """A checkpoint is missing, incomplete or does not match the run."""


class TrainingError(TotoError):
    """Training diverged or cannot continue (e.g. a non-finite loss)."""
