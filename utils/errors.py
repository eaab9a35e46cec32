"""User-facing errors: one clear line, a non-zero exit, no traceback (unless --debug)."""


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
