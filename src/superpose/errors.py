"""The exceptions the CLI turns into one-line messages and exit codes."""


class SuperposeError(Exception):
    """Bad input from the user (config, corpus, checkpoint): reported as one line, never a traceback."""

    exit_code = 2


class TrainingStopped(SuperposeError):
    """Training stopped on a numerical fault, after saving the last good state; the CLI exits with code 3."""

    exit_code = 3
