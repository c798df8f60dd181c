"""The one exception type the CLI turns into a one-line message and exit code 2."""


class SuperposeError(Exception):
    """Bad input from the user (config, corpus, checkpoint): reported as one line, never a traceback."""
