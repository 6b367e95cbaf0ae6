"""Error types that name a user's mistake; tools turn each into one line and exit status 2."""


class ConfigError(ValueError):
    """A gin file, binding or run setting that cannot work; the message names it."""


class InputError(ValueError):
    """An input the user named cannot be used; the message names the argument, the path and why."""


class DataError(ValueError):
    """A batch or data file that breaks what the run needs; the message names the field and the rule."""
