"""The one exception type that every `capeen` subcommand uses for a problem the user can fix."""


class UserError(Exception):
    """A problem the user can fix: printed as one line on stderr, exit status 2."""
