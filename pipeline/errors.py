"""The one exception type for mistakes a user can fix (config, data, paths)."""


class UserError(ValueError):
    """Bad input from the user; the CLI prints it as one line and exits 2."""
