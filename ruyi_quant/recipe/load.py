"""A recipe file read and validated: YAML, `defaults` merged into every job, and every problem
one line naming the file, the line and the key (with a did-you-mean for a misspelt key)."""

from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import UserError
from . import Recipe


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _node_at(node, loc) -> yaml.Node:
    """The YAML node at a pydantic error location (the key node for a mapping key)."""
    for i, part in enumerate(loc):
        if isinstance(node, yaml.MappingNode):
            hit = next(((k, v) for k, v in node.value if k.value == part), None)
            if hit is None:
                return node
            node = hit[0] if i == len(loc) - 1 else hit[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            return node
    return node


def _known_keys(model_cls, loc) -> list[str]:
    """Field names of the model that holds the key at loc (for did-you-mean hints)."""
    cls = model_cls
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", ()) or (ann,)
        nxt = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if nxt is None:
            return []
        cls = nxt
    return list(cls.model_fields)


def load_recipe(path: str | Path) -> tuple[Recipe, Path]:
    """Parse and validate; returns the recipe and the folder relative paths start from."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such recipe file")
    from ..errors import read_text

    text = read_text(path, "recipe")
    try:
        root = yaml.compose(text)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe is a mapping with a 'jobs' list")
    defaults = raw.get("defaults") or {}
    jobs = raw.get("jobs")
    merged = dict(raw)
    if isinstance(jobs, list) and isinstance(defaults, dict):
        merged["jobs"] = [_merge(defaults, j) if isinstance(j, dict) else j for j in jobs]
    try:
        recipe = Recipe.model_validate(merged)
    except ValidationError as e:
        # a misspelt key explains the "missing" error of the key it should have been: report it first
        err = sorted(e.errors(), key=lambda x: x["type"] != "extra_forbidden")[0]
        loc = err["loc"]
        node = _node_at(root, loc)
        where = f"{path}:{node.start_mark.line + 1}" if node is not None else str(path)
        dotted = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[")
        if err["type"] == "extra_forbidden":
            known = _known_keys(Recipe, loc)
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f" (known keys: {', '.join(known)})"
            raise UserError(f"{where}: unknown key '{loc[-1]}' in {dotted.rsplit('.', 1)[0]}{hint}") from None
        msg = err["msg"].removeprefix("Value error, ")
        raise UserError(f"{where}: {dotted}: {msg}") from None
    names = [j.name for j in recipe.jobs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise UserError(f"{path}: two jobs are named '{dup}'; job names must be unique")
    outs = [Path(os.path.normpath(path.parent / j.output)).resolve() for j in recipe.jobs]
    for i, a in enumerate(outs):
        for k, b in enumerate(outs[:i]):
            if a == b or a.is_relative_to(b) or b.is_relative_to(a):
                same = "is also" if a == b else "overlaps"
                node = _node_at(root, ("jobs", i, "output"))
                raise UserError(
                    f"{path}:{node.start_mark.line + 1}: jobs[{i}].output "
                    f"'{recipe.jobs[i].output}' {same} jobs[{k}].output "
                    f"'{recipe.jobs[k].output}'; give every job its own output"
                )
    return recipe, path.parent
