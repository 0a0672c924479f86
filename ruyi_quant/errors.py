"""The one exception a user can cause. The CLI prints it as one line and exits with code 2."""


class UserError(Exception):
    """Bad input: a missing path, a malformed config, an exit the model lacks, ...

    The message must name the input and say what to do; it is shown without a traceback.
    """


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that cleanup runs as for Ctrl-C (exit code 143)."""
