"""The `ruyi-quant` command line: one module per subcommand (its parser, then its work, which it
hands to the library), the option helpers they share (options.py), and here the parser of them all
and main.

A user's mistake is one line on stderr and exit code 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import Terminated, UserError, os_error_line
from ..log import log_to_stderr

# the modules of the subcommands, in --help's order; imported when the parser is built, after main
# has set up its signal handler (they import torch)
SUBCOMMANDS = ("inspect", "quantize", "export", "eval", "make", "generate", "run")

EXAMPLES = """examples:
  ruyi-quant inspect builtin:tiny
  ruyi-quant quantize builtin:tiny --bits 4 --group-size 32 --out out/tiny-rtn4
  ruyi-quant export out/tiny-rtn4 --format hf --out out/tiny-rtn4-hf
  ruyi-quant eval builtin:tiny out/tiny-rtn4 --samples 8 --seq-len 128
  ruyi-quant run recipes/demo.yaml
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ruyi-quant",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Quantize and export familial (early-exit) language models. MODEL is a "
        "checkpoint directory (ruyi_qwen2, qwen2 or llama safetensors) or builtin:tiny.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    return p


FREE_TEXT = ("prompt", "system")  # free text: may be empty, and the same prompt twice is a batch


def check_values(parser: argparse.ArgumentParser, args) -> None:
    """What the parser lets through: an empty value (a path, a name, a setting) and a repeatable
    option given the same value twice are one line naming the option."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for action in sub.choices[args.command]._actions:
        value = getattr(args, action.dest, None)
        if action.dest in FREE_TEXT or not isinstance(value, (str, list)):
            continue
        name = action.option_strings[0] if action.option_strings else (action.metavar or action.dest)
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, str) and not v.strip() for v in values):
            raise UserError(f"{name} '': is empty; give a value (ruyi-quant {args.command} --help)")
        dup = next((v for v in values if values.count(v) > 1), None)
        if dup is not None:
            raise UserError(f"{name} {dup}: given twice; give each once")


def _terminate(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 1 a recipe job failed under Ray (the others finished), 2 a user's
    mistake or an OS error (disk full, permissions: one line), 130 interrupted (Ctrl-C), 143
    terminated (SIGTERM). Interrupted or terminated work leaves nothing behind: the temporary
    output is removed on the way out."""
    import signal

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        check_values(parser, args)
        log_to_stderr()
        rc = args.func(args)
    except UserError as e:
        print(f"ruyi-quant: error: {e}", file=sys.stderr)
        return 2
    except Terminated:
        print("ruyi-quant: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("ruyi-quant: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        line = os_error_line(e)
        if line is None:
            raise
        print(f"ruyi-quant: error: {line}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
