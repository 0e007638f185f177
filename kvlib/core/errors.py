"""The one exception a user of the study sees: an error they can fix, printed by every command as one line."""


class KvlibError(Exception):
    """An error the user can fix (bad input, missing device, ...): the CLI prints it as one line."""
