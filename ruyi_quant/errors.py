"""The one exception a user can cause. The CLI prints it as one line and exits with code 2."""


class UserError(Exception):
    """Bad input: a missing path, a malformed config, an exit the model lacks, ...

    The message must name the input and say what to do; it is shown without a traceback.
    """


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that cleanup runs as for Ctrl-C (exit code 143)."""


def require(module: str, what: str, install: str) -> None:
    """A UserError naming what needs an optional package that is not installed."""
    import importlib.util
    if importlib.util.find_spec(module) is None:
        raise UserError(f"{what} needs {module} ({install})")
