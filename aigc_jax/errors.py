"""The one exception type that the CLI turns into a one-line message and a non-zero exit.

Raise `UserError` for anything the user can fix (a bad flag, a missing file, an impossible config); let
real bugs raise whatever they raise, so they keep their traceback.
"""


class UserError(Exception):
    """A problem with the user's input; the message must say what to do about it."""


class ConfigError(UserError, ValueError):
    """An unknown key or an impossible value in a config."""
