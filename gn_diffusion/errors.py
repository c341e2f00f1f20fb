"""Errors that are the user's to fix: the command line prints their one sentence and exits 2."""


class UserError(Exception):
    """Bad input (a config, a path, a checkpoint): the message names the problem and the fix."""


class ConfigError(UserError, ValueError):
    """A config value that is unknown, of the wrong type, or out of range."""
