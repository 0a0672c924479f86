"""Scores and surviving mutants of a mutmut run, each survivor with the reason it survives.

    OMP_NUM_THREADS=1 mutmut run --max-children 2       # docs/testing.md (about an hour)
    python scripts/mutation_report.py > benchmarks/results/mutation.md

A survivor is either killed by a new test or explained here: by kind (code that only acts on
a GPU, message text, dtype no-ops, defaults every caller overrides) or one by one (`EXPLAINED`:
function, the changed text, why no input the callers can give tells the two apart). A survivor
that matches nothing is listed as unexplained; the goal is none.
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter, defaultdict

KINDS = {
    "A": "device placement and GPU-only paths (on a CPU every device is the CPU; the offload path "
    "is tested for bit-identical grids, test_offloaded_activations_give_the_same_family)",
    "B": "message, label or progress-bar text (tests match the key phrases, not the wording), "
    "einsum letters in upper case, float('INF')",
    "C": "dtype no-ops: a dtype that is already the default or already the tensor's own",
    "D": "defaults no caller relies on (every caller passes the value)",
    "E": "equivalent for every input the callers can give (one by one below)",
}

# (function name fragment, text in the mutated line, why it cannot be told apart)
EXPLAINED = [
    ("grid_type", "bits <= 5", "no 5-bit grid exists (plan.BITS is 2, 3, 4, 8)"),
    ("block_groups", "blocks[:, 1]", "every column of a block was checked to share one group"),
    ("encode_grid", "codes + z", "Q8_0: int8 wrap-around makes c + 128 and c - 128 the same byte"),
    ("encode_grid", "reshape(n, -2)", "numpy infers any negative dimension"),
    ("inverse_hessian_factor", "h.shape[1]", "H is square"),
    (
        "inverse_hessian_factor",
        "or 2.0",
        "the fallback needs an all-zero diagonal, which dead-column handling (H[dead, dead] = 1) rules out",
    ),
    (
        "inverse_hessian_factor",
        "range(5)",
        "a fifth damping attempt (1000x) is never reached: "
        "the fourth already makes any positive semi-definite H + damping definite",
    ),
    (
        "gptq_quantize",
        "H[dead, dead] = 2",
        "those columns' weights are zeroed first: their error is zero whatever the diagonal",
    ),
    (
        "gptq_quantize",
        "group_size == +1",
        "group -1: the lazy path computes the single grid at "
        "column 0, before any column is updated: the same grid as the static one",
    ),
    ("gptq_quantize", "group_size == -2", "as above: group -1 takes the lazy path, same grid"),
    ("quantize_linear", "what=None", "the linear's name only labels an error message"),
    ("quantize_linear", "spec, **self.opts)", "the linear's name only labels an error message"),
    ("capture_inputs", "{1: linear}", "the key is ignored by the callback"),
    ("check_tokens", "default=1", "only an empty plan has no widest layer; 0 and 1 both warn never"),
    ("unpack_rows", "words[:2]", "one more all-zero padding row, never read"),
    (
        "awq_pack",
        "torch.where(words",
        "the final .to(torch.int32) wraps int64 to int32 two's "
        "complement anyway: the where() is redundant, any variant gives the same words",
    ),
    ("pack_rows", "torch.where(acc", "as awq_pack: .to(torch.int32) wraps int64 words anyway"),
    ("pack_rows", "words + 2, n", "one more all-zero row, cut off by acc[:words]"),
    (
        "search_scales",
        ".reshape(-1, gs)",
        "the per-group maximum is the same whether rows and groups "
        "are one axis or two; the next reshape restores [N, K]",
    ),
    (
        "quantization_json",
        "sort_keys",
        "to_json() always lists the same keys in the same order: "
        "sorting changes no string that the set compares",
    ),
    (
        "quantization_json",
        "to_json(), )",
        "as above: to_json() lists the same keys in the same order, so the set compares the same strings",
    ),
    (
        "dequantized_model",
        "strict=None",
        "state is built from every key of the model's own "
        "state_dict: strict loading can find nothing missing or unexpected",
    ),
    ("dequantized_model", "strict=False", "as above: state has exactly the model's keys"),
    ("dequantized_model", "load_state_dict(state, assign=True)", "strict defaults to True"),
    ("group_qparams", "amax == 1, torch.ones_like", "an absmax of exactly 1 is replaced by 1"),
    (
        "group_qparams",
        "(maxq + 1) / 2, dtype=torch.int64",
        "maxq + 1 is even: the division is exact and the int64 fill holds the same value",
    ),
    ("group_qparams", "(maxq + 2) // 2", "maxq = 2^b - 1 is odd: (maxq + 2) // 2 == (maxq + 1) // 2"),
    ("group_qparams", "bits <= 5", "no 5-bit grid exists (plan.BITS is 2, 3, 4, 8)"),
    ("group_index", "torch.arange(k) / spec.width(k)", "non-negative: truncation by .to(int32) is the floor"),
    (
        "size",
        "torch.empty(dtype=float_dtype)",
        "an empty tensor of that dtype has the same element size as a 0-d one",
    ),
    (
        "exact_min_scale",
        "e - keep + 2",
        "skips the 10-bit candidate, which never decides: a scale "
        "that must lose exactly one bit has an odd 11-bit mantissa, and rounding it half-to-even to "
        "10 bits gives the 9-bit candidate's value; later candidates are the same steps",
    ),
    (
        "exact_min_scale",
        "e - keep - 1",
        "the same candidates, two rounds later: only the 2- and "
        "1-bit ones are lost, never needed for 4-bit zeros (keep >= 7)",
    ),
    (
        "awq_unpack",
        "torch.arange(9",
        "a ninth nibble of a 32-bit word is always 0 and is dropped by the AWQ_INVERSE indexing",
    ),
    ("to_awq", "(k / groups)", "k % groups == 0 was checked just before: the division is exact"),
    ("from_awq", "torch.arange(k) / gs", "non-negative: truncation by .to(int32) is the floor"),
    ("awq_fits", "group_size == +1", "group -1: k % -1 == 0 in Python, as the -1 test said"),
    ("awq_fits", "group_size == -2", "group -1: k % -1 == 0 in Python, as the -1 test said"),
    (
        "search_scales",
        "loss <= losses[best]",
        "an exact tie of two ratios' float losses: either scaling gives the same loss",
    ),
    (
        "search_scales",
        "(s.max() * s.min()).sqrt()",
        "group-wise RTN of W*s divided by s is "
        "invariant to a global factor in s up to fp16 rounding of the scales",
    ),
    ("search_scales", "(s.max() / s.min()).sqrt()", "a global factor in s, as above"),
    (
        "finish_head",
        "pop(name, None)",
        "observe_head records the head's norms before finish_head "
        "for every head in the plan: the default is never used",
    ),
    ("finish_head", "pop(name, )", "as above: the default is never used"),
    ("exact_min_scale", "range(11, 0, -1)", "keeping 11 bits rounds an fp16 scale to itself"),
    ("exact_min_scale", "range(10, 1, -1)", "a 4-bit zero costs at most 4 bits: keep never falls below 7"),
    (
        "exact_min_scale",
        "bool(None)",
        "the break is an early exit; later rounds leave exact entries unchanged (torch.where(exact, ...))",
    ),
]


def names_and_status() -> list[tuple[str, str]]:
    out = subprocess.run(["mutmut", "results", "--all", "true"], capture_output=True, text=True).stdout
    return [
        tuple(part.strip() for part in line.rsplit(":", 1))
        for line in out.splitlines()
        if ":" in line and "__mutmut_" in line
    ]


def changed_lines(name: str) -> tuple[str, str]:
    diff = subprocess.run(["mutmut", "show", name], capture_output=True, text=True).stdout
    old = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("-") and not ln.startswith("---")]
    new = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    return " ".join(old), " ".join(new)


def _strings_out(line: str) -> str:
    return re.sub(r"(?i)(f?\"[^\"]*\"|f?'[^']*')", "S", line)


def kind(name: str, old: str, new: str) -> tuple[str, str]:
    for fn, text, why in EXPLAINED:
        if fn in name and text in new:
            return "E", why
    if re.search(r"pick_device|should_offload|Activations", name) or re.search(
        r"device|\.cpu\(\)|non_blocking|offload", old
    ):
        return "A", ""
    if (
        old
        and _strings_out(old) == _strings_out(new)
        or "tqdm(" in old
        or "einsum(" in old
        or 'float("INF")' in new
        or re.search(r"warn\(None\)|NotExact\(None\)|what: str", new + old)
    ):
        return "B", ""
    if (
        re.search(r"dtype=None|\.to\(None\)|astype\(None\)", new)
        or (re.search(r"dtype=torch\.\w+", old) and not re.search(r"dtype=torch\.\w+", new))
        or re.search(r"\.to\((prev|linear)\.\w+\.dtype\)", old)
        and new.count("dtype") < old.count("dtype")
    ):
        return "C", ""
    if (
        old.startswith("def ")
        or re.search(r"^\w+: \w+ = |self\.opts = dict|self\.damp_used", old)
        or re.search(r"max_shrink: float|clip: bool = True\) -> None", old)
    ):
        return "D", ""
    return "?", ""


def main() -> None:
    results = names_and_status()
    by_file: dict[str, Counter] = defaultdict(Counter)
    for name, status in results:
        module = name.split(".x")[0].removeprefix("ruyi_quant.")
        by_file[module][status] += 1
    print("# Mutation testing of `ruyi_quant/quant/` and the GGUF block encoders (mutmut)\n")
    print(
        "Command: `OMP_NUM_THREADS=1 mutmut run --max-children 2` (pyproject.toml `[tool.mutmut]`: "
        "fast tests, the llama.cpp ones left out); report: `python scripts/mutation_report.py`.\n"
    )
    print("| module | mutants | killed | survived | other | killed % |\n|---|---|---|---|---|---|")
    quant = Counter()
    for module, c in sorted(by_file.items()):
        total = sum(c.values())
        other = total - c["killed"] - c["survived"]
        print(
            f"| {module} | {total} | {c['killed']} | {c['survived']} | {other} | "
            f"{100 * c['killed'] / max(1, c['killed'] + c['survived']):.1f} |"
        )
        if module.startswith("quant."):
            quant.update(c)
    print(
        f"\nquant/: {quant['killed']} killed of {quant['killed'] + quant['survived']} run "
        f"({100 * quant['killed'] / max(1, quant['killed'] + quant['survived']):.1f}%); "
        f"statuses: {dict(quant)}\n"
    )
    groups: dict[str, list] = defaultdict(list)
    for name, status in results:
        if status != "survived":
            continue
        old, new = changed_lines(name)
        k, why = kind(name, old, new)
        groups[k].append((name.removeprefix("ruyi_quant."), old, new, why))
    print("## Surviving mutants, by kind\n")
    for k in list(KINDS) + ["?"]:
        items = groups.get(k, [])
        title = KINDS.get(k, "NOT EXPLAINED")
        print(f"### {k}: {title} ({len(items)})\n")
        for name, old, new, why in items:
            line = f"- `{name}`: `{old[:90]}` -> `{new[:90]}`"
            print(line + (f": {why}" if why else ""))
        print()


if __name__ == "__main__":
    main()
