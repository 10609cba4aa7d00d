"""User-facing errors.

Every bad input (config key, file, value) raises a subclass of ``MegatronExtError`` whose
message names the key/file/value and what was expected. Entry points catch it and print the
message on one line (no stack trace) and exit with status 2.
"""


class MegatronExtError(Exception):
    """Base class of the errors a user can fix by changing their input."""


class ConfigError(MegatronExtError, ValueError):
    """A config key has a bad value, is unknown, or conflicts with another key."""


class DataError(MegatronExtError, ValueError):
    """A data file is missing, corrupt, or inconsistent with the tokenizer/model."""


class CheckpointError(MegatronExtError, RuntimeError):
    """A checkpoint cannot be found or does not match the model/layout."""
