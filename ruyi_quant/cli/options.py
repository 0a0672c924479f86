"""What every subcommand shares: options turned into validated settings (a bad value is one
UserError naming its flag), the option groups several subcommands take, and the console."""

from __future__ import annotations

import sys

from pydantic import ValidationError

from ..errors import UserError
from ..recipe import Benchmark, Runtime, Sampling, check_exits, cli_flag


def given(**kw) -> dict:
    """The options a user gave; the rest take the settings' own defaults (recipe/__init__.py)."""
    return {k: v for k, v in kw.items() if v is not None}


def default(cls, field: str):
    """A setting's default, for --help (declared once, in recipe/__init__.py)."""
    return cls.model_fields[field].default


def validated(cls, flags: dict | None = None, **kw):
    """A settings object from the options given; a bad value is one line naming its flag (recipe.
    cli_flag, or `flags`: field -> flag, for options several fields come from)."""
    kw = given(**kw)
    try:
        return cls(**kw)
    except ValidationError as e:
        err = e.errors()[0]
        field = str(err["loc"][0])
        flag = (flags or {}).get(field) or cli_flag(cls.SECTION, field)
        value = err.get("input")
        given_value = f" {value}" if isinstance(value, (str, int, float)) and len(err["loc"]) == 1 else ""
        raise UserError(f"{flag}{given_value}: {err['msg'].removeprefix('Value error, ')}") from None


def exits(text: str | None, flag: str = "--exits"):
    """`2,5` -> [2, 5]; `all` (or no flag) -> "all". Each exit once."""
    if text is None or text == "all":
        return "all"
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise UserError(f"{flag} {text}: give layer indices like 2,5 or 'all'") from None
    try:
        return check_exits(values)
    except ValueError as e:
        raise UserError(f"{flag} {text}: {e}") from None


def one_exit(config, text: str | None) -> int:
    """`--exit E` (or `last`, or no flag: the last exit), checked against the model's exits."""
    if text in (None, "last"):
        return config.exits[-1]
    picked = exits(text, "--exit")
    if not isinstance(picked, list) or len(picked) != 1:
        raise UserError(f"--exit {text}: give one exit layer")
    return config.exit_list(picked)[0]


def override(text: str, skip: bool = False):
    """`PATTERN:bits=8,group_size=-1,sym=false` -> Override fields."""
    pattern, _, rest = text.partition(":")
    fields: dict = {"pattern": pattern, "skip": skip}
    flag = "--skip" if skip else "--override"
    if not pattern.strip():
        raise UserError(f"{flag} {text!r}: the pattern is empty; give a module pattern like 'lm_head*'")
    if not skip and not rest.strip(" ,"):
        raise UserError(
            f"--override {text}: no settings; give PATTERN:KEY=VAL,... with bits, "
            "group_size or sym (or --skip PATTERN)"
        )
    for item in filter(None, rest.split(",")):
        key, _, val = item.partition("=")
        if key not in ("bits", "group_size", "sym"):
            raise UserError(f"--override {text}: unknown setting '{key}' (bits, group_size, sym)")
        try:
            fields[key] = val.lower() in ("1", "true", "yes") if key == "sym" else int(val)
        except ValueError:
            raise UserError(f"--override {text}: '{val}' is not a number") from None
    return fields


def console():
    """Rich console; wide enough for the tables when output goes to a file or a pipe."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 120)


# --- option groups -------------------------------------------------------------------------
def add_runtime_args(s) -> None:
    """Where a family runs on our runtime (recipe.Runtime)."""
    R = lambda f: default(Runtime, f)
    s.add_argument("--device", help=f"auto (cuda when present), cpu, cuda (default {R('device')})")
    s.add_argument(
        "--dtype", help=f"activations (and the float side): bf16, fp16, fp32 (default {R('dtype')})"
    )
    s.add_argument(
        "--compile",
        choices=["auto", "on", "off"],
        help="decode steps on a static cache "
        "through torch.compile: auto (on CUDA, with CUDA graphs), on (the CPU too: a minute of "
        f"compiling per exit), off (eager) (default {R('compile')})",
    )


def runtime(args) -> Runtime:
    return validated(Runtime, device=args.device, dtype=args.dtype, compile=args.compile)


def add_sampling_args(s) -> None:
    """How tokens are picked (recipe.Sampling)."""
    S = lambda f: default(Sampling, f)
    s.add_argument("--exit", help="exit layer (default: the last)")
    s.add_argument("--max-new-tokens", type=int, help=f"(default {S('max_new_tokens')})")
    s.add_argument("--sample", action="store_true", help="sample instead of greedy")
    s.add_argument("--temperature", type=float, help=f"(default {S('temperature')})")
    s.add_argument("--top-k", type=int, help=f"0: every token (default {S('top_k')})")
    s.add_argument("--top-p", type=float, help=f"(default {S('top_p')})")
    s.add_argument("--seed", type=int, help=f"(default {S('seed')})")


def sampling(args) -> Sampling:
    return validated(
        Sampling,
        max_new_tokens=args.max_new_tokens,
        sample=args.sample or None,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )


def add_benchmark_args(s) -> None:
    """eval --runtime: what is timed (recipe.Benchmark)."""
    B = lambda f: default(Benchmark, f)
    s.add_argument("--prefill", type=int, help=f"--runtime: prompt tokens timed (default {B('prefill')})")
    s.add_argument(
        "--decode-tokens", type=int, help=f"--runtime: tokens decoded (default {B('decode_tokens')})"
    )
    s.add_argument("--prompts", type=int, help=f"--runtime: batch of prompts timed (default {B('prompts')})")
    s.add_argument("--repeats", type=int, help=f"--runtime: timed runs, median (default {B('repeats')})")


def benchmark(args) -> Benchmark:
    return validated(
        Benchmark,
        prefill=args.prefill,
        decode_tokens=args.decode_tokens,
        prompts=args.prompts,
        repeats=args.repeats,
    )
