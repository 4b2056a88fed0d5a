"""Errors Freehold reports to people: one line saying what is wrong and what to do."""


class FreeholdError(Exception):
    """A user-facing failure. The CLI prints its message on one line and exits non-zero."""

    exit_code = 1


class NotFound(FreeholdError):
    """A model, key or file the user named does not exist."""


class InvalidInput(FreeholdError):
    """The user gave something malformed: not a GGUF, a bad bundle, a bad flag value."""

    exit_code = 2


class AmbiguousName(InvalidInput):
    """A bare model name that several tags in the vault share."""


class IntegrityError(FreeholdError):
    """Stored or supplied bytes do not match their recorded digest or signature."""

    exit_code = 3
