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


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file is missing, truncated or unreadable (the message names it); an older checkpoint may load."""


class UnsafeFileError(CheckpointError):
    """A file's pickle needs more than tensors, plain values and the few allowed types: loading it could run code,
    so it is refused (the message names the file and the refused global)."""


def run_entry_point(prog, fn, *args):
    """The error handling every tool's and entry point's ``main`` shares: returns ``(0, fn(*args))``; a
    ``MegatronExtError`` prints ``<prog>: error: <message>`` on stderr and returns ``(2, None)``; Ctrl-C prints
    ``<prog>: interrupted`` and returns ``(130, None)``. With ``prog=None`` the lines are ``error: <message>`` and
    ``interrupted`` (the training entry points, whose workers' lines read the same). ``SystemExit`` passes through.
    Usage: ``rc, result = run_entry_point(PROG, run, args); if rc: return rc``."""
    import sys

    prefix = f"{prog}: " if prog else ""
    try:
        return 0, fn(*args)
    except MegatronExtError as exc:
        print(f"{prefix}error: {exc}", file=sys.stderr)
        return 2, None
    except KeyboardInterrupt:
        print(f"{prefix}interrupted", file=sys.stderr)
        return 130, None
