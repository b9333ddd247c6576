"""The library's user error."""


class UsageError(ValueError):
    """A user error in options or files (a bad flag value, a missing or unusable file): it says which option and
    what to do. The ``w2sd`` command prints it as one line and exits 2; library callers catch it as a
    ``ValueError``."""
