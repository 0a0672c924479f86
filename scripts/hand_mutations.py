"""Put each planted bug (BUGS, below) into a copy of the project, one at a time, and run the fast
quantization tests against it: every bug must fail at least one test.

    python scripts/hand_mutations.py            # all bugs, every failing test (about 50 min)
    python scripts/hand_mutations.py --first    # all bugs, up to the first failing test each (3 min)
    python scripts/hand_mutations.py M3 M6      # some of them

Prints one row per bug with the tests that failed (a bug no test catches is a gap). The copy
lives in a temporary directory; the working tree is never changed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = [
    "tests/quant/test_calibration_oracle.py",
    "tests/quant/test_gptq.py",
    "tests/quant/test_awq.py",
    "tests/quant/test_rtn.py",
    "tests/quant/test_pack.py",
]

CAL = "ruyi_quant/quant/calibrate.py"
WALK = "    steps = list(cfg.walk())\n"
RUN = "        out = run_layer(model.get_submodule(step.prefix), step.prefix, xs)\n"
ON = "            xs = out\n"

# name: (what the bug is, file, [(text to find, text to put instead), ...])
BUGS = {
    "M1": (
        "branches calibrated on the float trunk's activations",
        CAL,
        [
            (WALK, WALK + "    import copy\n    fmodel, xs_f = copy.deepcopy(model), xs\n"),
            (
                RUN,
                RUN.replace(
                    ", xs)", ", xs_f if step.kind == 'exit' and step.j < len(cfg.exits) - 1 else xs)"
                ),
            ),
            (
                ON,
                ON + "            xs_f = xs_f.map(lambda x, p=step.prefix: "
                "fmodel.get_submodule(p).to(dev)(x, **kw))\n",
            ),
        ],
    ),
    "M2": (
        "a branch calibrated on trunk layer e's output, not its input",
        CAL,
        [(WALK, "    steps = sorted(cfg.walk(), key=lambda s: (s.layer, s.kind == 'exit'))\n")],
    ),
    "M3": (
        "AWQ's activation statistic replaced by ones",
        "ruyi_quant/quant/awq.py",
        [("    x_mean = x.abs().mean(0)\n", "    x_mean = torch.ones_like(x.abs().mean(0))\n")],
    ),
    "M4": (
        "AWQ never keeps the identity",
        "ruyi_quant/quant/awq.py",
        [("    if identity <= losses[best]:\n", "    if False:\n")],
    ),
    "M5": (
        "GPTQ without the cross-block error update",
        "ruyi_quant/quant/gptq.py",
        [("        W[:, i2:] -= Err @ U[i1:i2, i2:]\n", "        pass\n")],
    ),
    "M6": (
        "GPTQ without dead-column handling",
        "ruyi_quant/quant/gptq.py",
        [("    H[dead, dead] = 1\n    W[:, dead] = 0\n", "")],
    ),
    "M7": (
        "GPTQ never escalates damping",
        "ruyi_quant/quant/gptq.py",
        [("    for attempt in range(4):\n", "    for attempt in range(1):\n")],
    ),
    "M8": (
        "asymmetric zero point floored instead of rounded",
        "ruyi_quant/quant/rtn.py",
        [("    zero = torch.round(-lo / scale.float())\n", "    zero = torch.floor(-lo / scale.float())\n")],
    ),
}


def apply(tree: Path, bug: str) -> None:
    _, rel, edits = BUGS[bug]
    path = tree / rel
    text = path.read_text()
    for old, new in edits:
        if text.count(old) != 1:
            raise SystemExit(f"{bug}: the code it mutates has changed ({rel}); update this script")
        text = text.replace(old, new)
    path.write_text(text)


def failing_tests(tree: Path, first: bool = False) -> list[str]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            "not slow",
            "-rf",
            *(["-x"] if first else []),
            *TESTS,
        ],
        cwd=tree,
        capture_output=True,
        text=True,
    )
    return sorted(
        {line.split()[1].split("::", 1)[1] for line in out.stdout.splitlines() if line.startswith("FAILED ")}
    )


def main(argv: list[str]) -> int:
    first = "--first" in argv
    bugs = [a for a in argv if a != "--first"] or list(BUGS)
    rows = []
    for bug in bugs:
        with tempfile.TemporaryDirectory() as tmp:
            tree = Path(tmp) / "p"
            shutil.copytree(
                ROOT, tree, ignore=shutil.ignore_patterns(".git", ".venv", "out", "mutants", "__pycache__")
            )
            apply(tree, bug)
            failed = failing_tests(tree, first)
        rows.append((bug, BUGS[bug][0], failed))
        print(f"{bug} {BUGS[bug][0]}: {len(failed)} failing: {', '.join(failed) or 'NONE'}", flush=True)
    print("\n| bug | what | tests that fail |\n|---|---|---|")
    for bug, what, failed in rows:
        print(f"| {bug} | {what} | {len(failed)}: {', '.join(failed) or '**none**'} |")
    return 1 if any(not f for *_, f in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
