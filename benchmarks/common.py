"""What the timing benchmarks share: the CPU's instruction sets, the digest of a tree of outputs,
and writing a result as JSON and Markdown."""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_flags() -> str:
    """`avx2`, `avx512f`, both or neither, as /proc/cpuinfo lists them."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return "unknown"
    return " ".join(f for f in ("avx2", "avx512f") if f in flags)


@functools.cache
def _behaviour_digest():
    spec = importlib.util.spec_from_file_location(
        "behaviour_digest", ROOT / "scripts" / "behaviour_digest.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def digest_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under root; JSON files without their timings (scripts/behaviour_digest.py)."""
    return _behaviour_digest().digest_tree(root)


def write_result(out: Path, result: dict, text: str) -> None:
    """Print the Markdown `text` and write out.json (result) and out.md (text)."""
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(text)
