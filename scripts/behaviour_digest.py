"""sha256 of every artifact a fixed set of jobs writes: a restructure proves itself by an
unchanged digest, not by passing tests alone.

    python scripts/behaviour_digest.py before.json            # tiny jobs and CLI paths (about a minute)
    python scripts/behaviour_digest.py before.json --demo     # also recipes/demo.yaml (minutes)
    python scripts/behaviour_digest.py after.json --compare before.json

Files that hold timings (the JSON manifests) are digested with their volatile keys removed
(`seconds`, `*_seconds`, `cache_s`, peak memory, and a manifest's `artifacts`/`files` hashes and `sizes`, which cover those
same files) and the temporary work folder's path replaced by `<work>`; every other file is
digested byte for byte. `--keep DIR` keeps the outputs for a closer look.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOLATILE = ("seconds", "cache_s", "artifacts", "files", "sizes", "peak_rss_gb", "peak_device_gb")

TINY_RECIPE = """
defaults:
  calibration: {samples: 8, seq_len: 128}
  eval: {samples: 4, seq_len: 128}
jobs:
  - name: rtn4-heads8
    model: builtin:tiny
    output: out/rtn4-heads8
    quantize: {method: rtn, bits: 4, group_size: 32, heads: true,
               overrides: [{pattern: "lm_head*", bits: 8}]}
    export:
      - {format: hf, weights: gptq}
      - {format: hf, weights: float, dtype: bfloat16}
      - {format: gguf, multi: true}
  - name: gptq-act-order
    model: builtin:tiny
    output: out/gptq-act-order
    quantize: {method: gptq, bits: 4, group_size: 32, gptq: {act_order: true}}
    export: [{format: hf}]
  - name: gptq-static-asym
    model: builtin:tiny
    output: out/gptq-static-asym
    quantize: {method: gptq, bits: 4, group_size: 64, sym: false,
               gptq: {act_order: true, static_groups: true}}
    export: [{format: hf}, {format: gguf, multi: true}]
  - name: awq-shared-heads
    model: builtin:tiny-shared
    output: out/awq-shared-heads
    quantize: {method: awq, bits: 4, group_size: 32, sym: false, heads: true}
    export: [{format: hf}, {format: gguf, multi: true, exits: [2, 5]}]
"""

CLI = [
    ["inspect", "builtin:tiny", "--json", "cli/inspect.json"],
    ["quantize", "builtin:tiny", "--method", "rtn", "--bits", "8", "--group-size", "32", "--out", "cli/rtn8"],
    [
        "quantize",
        "builtin:tiny-shared",
        "--method",
        "gptq",
        "--bits",
        "4",
        "--group-size",
        "32",
        "--samples",
        "8",
        "--seq-len",
        "128",
        "--heads",
        "--out",
        "cli/gptq4",
    ],
    ["export", "cli/rtn8", "--format", "gguf", "--multi", "--out", "cli/rtn8-gguf"],
    ["export", "cli/gptq4", "--format", "gguf", "--multi", "--out", "cli/gptq4-gguf"],
    ["export", "cli/gptq4", "--format", "hf", "--out", "cli/gptq4-hf"],
    [
        "export",
        "cli/gptq4",
        "--format",
        "hf",
        "--weights",
        "float",
        "--dtype",
        "float16",
        "--out",
        "cli/gptq4-hf-fp16",
    ],
    [
        "export",
        "--from",
        "cli/gptq4-gguf/tiny-shared-family-q4_0.gguf",
        "--exit",
        "3",
        "--out",
        "cli/extracted",
    ],
    ["eval", "builtin:tiny-shared", "cli/gptq4", "--samples", "4", "--seq-len", "64", "--out", "cli/eval"],
]


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in VOLATILE and not k.endswith("_seconds")}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def digest_file(path: Path, root: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".json":
        try:
            text = data.decode().replace(str(root), "<work>")
            data = json.dumps(_strip(json.loads(text)), sort_keys=True).encode()
        except ValueError:
            pass
    return hashlib.sha256(data).hexdigest()


def digest_tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): digest_file(p, root) for p in sorted(root.rglob("*")) if p.is_file()
    }


def run_all(work: Path, demo: bool) -> dict[str, str]:
    from ruyi_quant.cli import main

    (work / "tiny.yaml").write_text(TINY_RECIPE)
    assert main(["run", str(work / "tiny.yaml")]) == 0
    (work / "cli").mkdir()
    for argv in CLI:
        argv = [str(work / a) if a.startswith("cli/") else a for a in argv]
        assert main(argv) == 0, argv
    if demo:
        recipe = (ROOT / "recipes" / "demo.yaml").read_text().replace("../out/", "demo/")
        (work / "demo.yaml").write_text(recipe)
        assert main(["run", str(work / "demo.yaml")]) == 0
    return {k: v for k, v in digest_tree(work).items() if not k.endswith(".yaml")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="JSON file for {artifact: sha256}")
    ap.add_argument("--demo", action="store_true", help="also run recipes/demo.yaml (ruyi-mini)")
    ap.add_argument("--compare", metavar="JSON", help="a digest to compare with")
    ap.add_argument("--keep", metavar="DIR", type=Path, help="run in DIR (new) and keep the outputs")
    args = ap.parse_args()
    if args.keep:
        args.keep.mkdir(parents=True)
        digest = run_all(args.keep.resolve(), args.demo)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            digest = run_all(Path(tmp), args.demo)
    Path(args.out).write_text(json.dumps(digest, indent=1, sort_keys=True) + "\n")
    print(f"{len(digest)} artifacts -> {args.out}")
    if args.compare:
        old = json.loads(Path(args.compare).read_text())
        differ = sorted(k for k in old.keys() & digest.keys() if old[k] != digest[k])
        only_old, only_new = sorted(old.keys() - digest.keys()), sorted(digest.keys() - old.keys())
        for label, items in (("differ", differ), ("only before", only_old), ("only after", only_new)):
            for k in items:
                print(f"{label}: {k}")
        same = len(old.keys() & digest.keys()) - len(differ)
        print(f"identical: {same} of {len(old)} before, {len(digest)} after")
        return 1 if differ or only_old or only_new else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
