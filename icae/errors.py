"""One exception type for problems the user can fix; the CLI prints it as one line."""


class UserError(Exception):
    """Bad input, a bad flag or a missing file: the message names the problem and the fix."""
