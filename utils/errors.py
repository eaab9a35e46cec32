"""User-facing errors: one clear line, a non-zero exit, no traceback (unless --debug)."""


def one_line(message: object) -> str:
    """``message`` on a single line: reasons quoted from other libraries (pickle, urllib,
    tarfile) sometimes carry line breaks, and an error is always printed as one line."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


class UserError(Exception):
    """Bad input from the user (config, dataset, checkpoint, device).

    The message is printed as a single ``error: ...`` line by the entry scripts.
    """


class ConfigError(UserError):
    pass


class DatasetError(UserError):
    pass


class CheckpointError(UserError):
    pass
