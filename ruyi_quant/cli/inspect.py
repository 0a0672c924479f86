"""`ruyi-quant inspect`: a model's exits, with the parameters and bytes each exit runs on."""

from __future__ import annotations

import json
from pathlib import Path

from .options import console


def add_parser(sub) -> None:
    s = sub.add_parser(
        "inspect",
        help="exits, parameters and bytes per exit and for the family",
        description="Show a model's exits with the parameters and bytes each exit runs "
        "on, and the whole family's.",
    )
    s.add_argument("model", metavar="MODEL")
    s.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    s.set_defaults(func=run)


def run(args) -> None:
    from ..pipeline import open_family
    from ..report import rich_table
    from ..store.files import atomic_file, check_writable, disk_bytes

    if args.json:
        check_writable(Path(args.json), "--json", directory=False)
    fam, where = open_family(args.model, hashes=False)  # headers and sizes: no values are read
    c = fam.config
    con = console()
    heads = "tied to embeddings" if c.tie_word_embeddings else ("shared" if c.shared_heads else "per exit")
    con.print(
        f"{args.model}: {c.source_type}, {c.num_layers} trunk layers, hidden {c.hidden_size}, "
        f"vocab {c.vocab_size}, heads {heads}, exits {c.exits}, quantization: {fam.method}",
        soft_wrap=True,
        markup=False,
    )
    rows = []
    for j, e in enumerate(c.exits):
        params, nbytes = fam.stored_size(fam.exit_tensor_names(j))
        rows.append([f"E{j} (layer {e})", str(e + 1), f"{params / 1e6:.2f}", f"{nbytes / 1e6:.2f}"])
    params, nbytes = fam.stored_size()
    rows.append(
        ["family", str(c.num_layers + len(c.exits) - 1), f"{params / 1e6:.2f}", f"{nbytes / 1e6:.2f}"]
    )
    con.print(
        rich_table(
            "parameters and bytes per exit",
            ["exit", "layers run", "params (M)", "weights MB (as stored)"],
            rows,
        )
    )
    on_disk = disk_bytes(where)
    con.print(f"on disk: {on_disk / 1e6:.2f} MB (every file under {where})", markup=False, soft_wrap=True)
    if args.json:
        out = {
            "exits": c.exits,
            "per_exit": rows,
            "family": {"params": params, "bytes": nbytes},
            "disk_bytes": on_disk,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_file(Path(args.json), json.dumps(out, indent=2) + "\n", "--json")
