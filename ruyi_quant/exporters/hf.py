"""Per-exit Hugging Face checkpoints: a plain `Qwen2ForCausalLM` (or `LlamaForCausalLM`, see
`architecture`) of e+1 layers per exit.

Weights are floating point (bf16 by default; quantized linears dequantized), the GPTQ v1
layout, or AWQ's gemm layout, with the `quantization_config` that transformers (through
GPTQModel), GPTQModel and vLLM read.
The contract is exporters/hf.md.
"""

from __future__ import annotations

import json
from collections import Counter
from functools import lru_cache
from pathlib import Path

import torch

from .. import __version__, names
from ..errors import UserError
from ..log import bar
from ..model.layout import LAYER_LINEARS, exit_folder, is_layer_bias
from ..names import MARKER
from ..quant.family import QuantizedFamily
from ..quant.plan import QuantSpec
from ..recipe import DTYPES
from ..store.checkpoint import copy_tokenizer, grid_entries
from ..store.files import disk_bytes, write_marker
from ..store.safetensors import Entry, entry_of, write_sharded
from ..text import reproduced_by_qwen2_tokenizer

WEIGHTS = ("auto", "float", "gptq", "awq")
ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}


def exit_entries(
    fam: QuantizedFamily, j: int, layout: str | None, float_dtype: torch.dtype
) -> tuple[list[Entry], dict[str, QuantSpec]]:
    """Plain-Qwen2 tensors of exit j, each produced when it is written (stream.Entry), and the
    grids of its quantized linears (plain names). layout None dequantizes; otherwise quantized
    linears are written in that layout."""
    exit_map = fam.config.exit_map(j)
    entries, specs, packed = [], {}, {}
    for name in list(fam.tensors):
        new = exit_map.rename(name)
        if new is not None:
            shape, dtype = fam.tensor_info(name)
            d = float_dtype if dtype.is_floating_point else dtype
            entries.append(Entry(new, shape, d, lambda name=name, d=d: fam.tensors[name].to(d)))
    for mod, grid in fam.grids.items():
        new_mod = exit_map.rename(mod)
        if new_mod is None:
            continue
        if layout is None:
            entries.append(
                Entry(
                    new_mod + ".weight",
                    grid.shape,
                    float_dtype,
                    lambda mod=mod: fam.grids[mod].dequantize().to(float_dtype),
                )
            )
            continue
        specs[new_mod] = grid.spec
        packed[mod] = new_mod
    return entries + grid_entries(fam, layout, packed), specs


def architecture(fam: QuantizedFamily, exit_map, tokenizer_dir: Path | None) -> tuple[str, bool]:
    """(model type, attention_bias) of an exit's export. `qwen2` when transformers' Qwen2Tokenizer,
    which AutoTokenizer picks for that type whatever tokenizer_config.json says, reproduces the
    tokenizer (text.py, the pre-tokenizer table); otherwise `llama`, whose AutoTokenizer reads tokenizer.json as
    written: with attention_bias when some q/k/v bias is not zero (o_proj then gets zero biases)."""
    path = Path(tokenizer_dir) / "tokenizer.json" if tokenizer_dir is not None else None
    qwen2_tok = path is None or not path.is_file() or _qwen2_tokenizer(str(path), path.stat().st_mtime_ns)
    if qwen2_tok and fam.stock_arch() == "qwen2":
        return "qwen2", True
    bias = any(
        fam.tensors[n].any() for n in fam.tensors if is_layer_bias(n) and exit_map.rename(n) is not None
    )
    return "llama", bias


@lru_cache(maxsize=8)
def _qwen2_tokenizer(path: str, mtime_ns: int) -> bool:
    """reproduced_by_qwen2_tokenizer of a tokenizer.json, parsed once per file version (an export
    asks once per exit, and Qwen2's tokenizer.json is 7 MB)."""
    return reproduced_by_qwen2_tokenizer(json.loads(Path(path).read_text(encoding="utf-8")))


def gptq_config(specs: dict[str, QuantSpec], all_linears: list[str], desc_act: bool = False) -> dict:
    """quantization_config for GPTQModel/transformers/vLLM; mixed grids go in `dynamic`."""
    common, _ = Counter(specs.values()).most_common(1)[0]
    dynamic = {}
    for m in all_linears:
        s = specs.get(m)
        if s is None:
            dynamic[f"-:^{m.replace('.', '[.]')}$"] = {}
        elif s != common:
            dynamic[f"+:^{m.replace('.', '[.]')}$"] = s.to_json()
    cfg = {
        "quant_method": "gptq",
        "bits": common.bits,
        "group_size": common.group_size,
        "desc_act": desc_act,
        "sym": common.sym,
        "checkpoint_format": "gptq",
        "pack_dtype": "int32",
        "static_groups": False,
        "true_sequential": True,
        "lm_head": names.PLAIN_HEAD in specs,
        "meta": {"quantizer": [f"ruyi-quant:{__version__}"]},
    }
    if dynamic:
        cfg["dynamic"] = dynamic
    return cfg


# --- the format's contract (exporters/__init__.py) ------------------------------------------
def check(target, ex) -> None:
    """weights awq: AWQ's format holds one 4-bit grid for every quantized module, its group size
    dividing every input width, no act-order. Says what to change otherwise."""
    target.refuse_blocks("hf")
    if ex.weights == "awq" and target.plan:
        check_awq(target.plan, target.widths, target.act_order)


def export(
    fam: QuantizedFamily, out_root: Path, tokenizer_dir: Path, ex, progress: bool = True, calibration=None
) -> dict:
    """One checkpoint per exit under out_root/exit-E (out_root is a fresh directory)."""
    from . import Target

    check(Target.of_family(fam), ex)  # before any progress bar: one clean line if refused
    written = []
    for e in bar(fam.config.exit_list(ex.exits), desc="export hf", unit="exit", enabled=progress):
        d = out_root / exit_folder(e)
        d.mkdir(parents=True)
        export_exit(fam, e, d, tokenizer_dir, ex.weights, DTYPES[ex.dtype])
        written.append(d.name)
    return {"exits": written}


def folder(fam: QuantizedFamily, ex) -> str:
    if ex.weights == "auto":
        return f"hf-{fam.layout if fam.modules else ex.dtype}"
    return f"hf-{ex.dtype if ex.weights == 'float' else ex.weights}"


def written(info: dict, out: Path) -> list[str]:
    lines = [f"wrote {out / d} ({disk_bytes(out / d) / 1e6:.2f} MB on disk)" for d in info["exits"]]
    if info["exits"]:
        note = load_note(json.loads((out / info["exits"][0] / MARKER).read_text())["weights"])
        if note:
            lines.append(f"note: {note}")
    return lines


def check_awq(modules: dict[str, QuantSpec], widths: dict[str, int], act_order) -> None:
    """AWQ's limits on a quantization (module -> spec, input widths, the modules with act-order
    groups)."""
    specs = set(modules.values())
    if len(specs) > 1 or next(iter(specs)).bits != 4:
        raise UserError(
            "weights: awq needs every quantized module at 4 bits with one group size "
            "(found "
            + ", ".join(sorted(f"{s.bits}-bit g{s.group_size}" for s in specs))
            + "); drop the overrides or export weights: gptq"
        )
    gs = next(iter(specs)).group_size
    for m, k in widths.items():
        if gs != -1 and k % gs:
            raise UserError(
                f"weights: awq needs the group size to divide every input width ({m} has "
                f"{k} columns, group_size {gs}); export weights: gptq, or quantize with a "
                "group_size that divides it"
            )
    if act_order:
        raise UserError(
            f"weights: awq cannot hold act-order groups ({act_order[0]}); export weights: "
            "gptq, or quantize with act_order: false (or static_groups: true)"
        )


def awq_config(specs: dict[str, QuantSpec], all_linears: list[str]) -> dict:
    """quantization_config of AutoAWQ's gemm checkpoints (transformers/vLLM read it)."""
    spec = next(iter(specs.values()))
    skip = [m for m in all_linears if m not in specs]
    return {
        "quant_method": "awq",
        "version": "gemm",
        "bits": spec.bits,
        "group_size": spec.group_size,
        "zero_point": True,
        "modules_to_not_convert": skip or None,
    }


def export_exit(
    fam: QuantizedFamily,
    exit: int,
    out_dir: Path,
    tokenizer_dir: Path | None,
    weights: str = "auto",
    float_dtype: torch.dtype = torch.bfloat16,
) -> dict:
    """Write exit `exit` (a layer index) into the existing directory out_dir; return its metadata."""
    cfg = fam.config
    j = cfg.exit_index(exit)
    e = cfg.exits[j]
    layout = (
        (fam.layout if fam.modules else None)
        if weights == "auto"
        else (None if weights == "float" else weights)
    )
    if layout is not None and not fam.modules:
        raise UserError(
            f"weights: {weights} needs a quantized family; add a quantize section or use weights: float"
        )
    entries, specs = exit_entries(fam, j, layout, float_dtype)
    exit_map = cfg.exit_map(j)
    quantized = layout is not None
    tie = (
        cfg.tie_word_embeddings
        and names.PLAIN_HEAD + ".weight" not in {x.name for x in entries}
        and names.PLAIN_HEAD not in specs
    )
    out_dir = Path(out_dir)
    arch, bias = architecture(fam, exit_map, tokenizer_dir)
    if arch == "llama" and not bias:  # zero q/k/v biases: a plain Llama has none
        entries = [x for x in entries if not is_layer_bias(x.name)]
    elif arch == "llama":  # Llama's attention_bias gives o_proj one too
        for i in range(e + 1):
            o = f"{names.PLAIN_LAYER.format(i=i)}.self_attn.o_proj"
            entries.append(entry_of(f"{o}.bias", torch.zeros(cfg.hidden_size, dtype=float_dtype)))
    write_sharded(out_dir, entries, metadata={"format": "pt"})  # sharded past 5 GB, as HF does
    hf = cfg.qwen2(num_layers=e + 1) if arch == "qwen2" else cfg.llama(e + 1, attention_bias=bias)
    hf.architectures = [ARCHITECTURES[arch]]
    hf.tie_word_embeddings = tie
    hf.dtype = float_dtype
    linears = [f"{names.PLAIN_LAYER.format(i=i)}.{lin}" for i in range(e + 1) for lin in LAYER_LINEARS] + [
        names.PLAIN_HEAD
    ]
    if layout == "gptq":
        desc_act = any(g.act_order for m, g in fam.grids.items() if exit_map.rename(m) in specs)
        qcfg = gptq_config(specs, [m for m in linears if m in specs or m != names.PLAIN_HEAD], desc_act)
    elif layout == "awq":
        qcfg = awq_config(specs, linears)
    if quantized:
        hf.quantization_config = qcfg
        (out_dir / "quantize_config.json").write_text(json.dumps(qcfg, indent=2) + "\n")
    hf.save_pretrained(str(out_dir))
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, out_dir)
    meta = {
        "ruyi_quant_version": __version__,
        "kind": "hf-exit",
        "exit": e,
        "exit_index": j,
        "exits": cfg.exits,
        "weights": layout or str(float_dtype).removeprefix("torch."),
        "method": fam.method,
        "num_hidden_layers": e + 1,
        "architecture": ARCHITECTURES[arch],
    }
    (out_dir / "README.md").write_text(model_card(meta, tokenizer_dir is not None), encoding="utf-8")
    write_marker(out_dir, meta)  # last: it lists every file written
    return meta


# what transformers 5 needs installed to load each layout (its GPTQ/AWQ quantizers' checks)
LOAD_NEEDS = {"gptq": "pip install gptqmodel optimum", "awq": "pip install gptqmodel accelerate"}


def load_note(layout: str | None) -> str | None:
    """One line on what loading a quantized export in transformers needs, or None."""
    if layout not in LOAD_NEEDS:
        return None
    return (
        f"transformers loads {layout.upper()} weights only with GPTQModel installed "
        f"({LOAD_NEEDS[layout]}); for weights it loads as they are, export with --weights float"
    )


def model_card(meta: dict, tokenizer: bool) -> str:
    """README.md of an exit's export: what it is and how to load it."""
    e, arch, weights = meta["exit"], meta["architecture"], meta["weights"]
    lines = [
        f"# Exit {e} of a familial model ({weights} weights)",
        "",
        f"Layers 0..{e} of the shared trunk plus exit {e}'s own branch layer, norm and head, as "
        f"a plain `{arch}` ({meta['num_hidden_layers']} layers), written by ruyi-quant "
        f"{meta['ruyi_quant_version']} (method: {meta['method']}).",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("THIS_DIR")',
    ]
    if tokenizer:
        lines.append('tokenizer = AutoTokenizer.from_pretrained("THIS_DIR")')
    lines += ["```", ""]
    note = load_note(weights)
    if note:
        lines += [note[0].upper() + note[1:] + ".", ""]
    if arch == "LlamaForCausalLM":
        lines += [
            "Written as Llama rather than Qwen2 because transformers' Qwen2 tokenizer class would "
            "replace this tokenizer's own pre-tokenizer; the layers compute the same.",
            "",
        ]
    return "\n".join(lines)
