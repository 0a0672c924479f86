"""The CLI's helpers for turning options into validated settings (shared by cli.py and
cli_make.py, cli_runtime.py): a bad value is one UserError naming its flag."""

from __future__ import annotations

import sys

from pydantic import ValidationError

from .errors import UserError


def _given(**kw) -> dict:
    """The options a user gave; the rest take the settings' own defaults (recipe.py)."""
    return {k: v for k, v in kw.items() if v is not None}


def _default(cls, field: str):
    """A setting's default, for --help (declared once, in recipe.py)."""
    return cls.model_fields[field].default


# settings whose flag is not `--` + the field's name
FLAGS = {"distill_weight": "--distill", "damp_percent": "--damp", "sources": "--train",
         "clip": "--no-clip"}


def _validated(cls, flags: dict | None = None, **kw):
    """A settings object from the options given; a bad value is one line naming its flag."""
    kw = _given(**kw)
    try:
        return cls(**kw)
    except ValidationError as e:
        err = e.errors()[0]
        field = str(err["loc"][0])
        flag = {**FLAGS, **(flags or {})}.get(field, "--" + field.replace("_", "-"))
        raise UserError(f"{flag}: {err['msg'].removeprefix('Value error, ')}") from None


def _exits(text: str | None, flag: str = "--exits"):
    """`2,5` -> [2, 5]; `all` (or no flag) -> "all". Each exit once."""
    from .recipe import check_exits
    if text is None or text == "all":
        return "all"
    try:
        exits = [int(x) for x in text.split(",")]
    except ValueError:
        raise UserError(f"{flag} {text}: give layer indices like 2,5 or 'all'") from None
    try:
        return check_exits(exits)
    except ValueError as e:
        raise UserError(f"{flag} {text}: {e}") from None


def _override(text: str, skip: bool = False):
    """`PATTERN:bits=8,group_size=-1,sym=false` -> Override fields."""
    pattern, _, rest = text.partition(":")
    fields: dict = {"pattern": pattern, "skip": skip}
    flag = "--skip" if skip else "--override"
    if not pattern.strip():
        raise UserError(f"{flag} {text!r}: the pattern is empty; give a module pattern like 'lm_head*'")
    if not skip and not rest.strip(" ,"):
        raise UserError(f"--override {text}: no settings; give PATTERN:KEY=VAL,... with bits, "
                        "group_size or sym (or --skip PATTERN)")
    for item in filter(None, rest.split(",")):
        key, _, val = item.partition("=")
        if key not in ("bits", "group_size", "sym"):
            raise UserError(f"--override {text}: unknown setting '{key}' (bits, group_size, sym)")
        try:
            fields[key] = val.lower() in ("1", "true", "yes") if key == "sym" else int(val)
        except ValueError:
            raise UserError(f"--override {text}: '{val}' is not a number") from None
    return fields


def _console():
    """Rich console; wide enough for the tables when output goes to a file or a pipe."""
    from rich.console import Console
    return Console(width=None if sys.stdout.isatty() else 120)
