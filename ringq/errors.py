"""User-facing errors: the CLI prints them as one line and exits with status 2."""


class RingqError(Exception):
    """A problem with the user's input (flags, config, files, data), not a bug."""


class DataError(RingqError):
    """Data directory missing or laid out wrongly; the message names the expected files."""


class CheckpointError(RingqError):
    """A checkpoint or packed file that cannot be read or does not fit the model."""
