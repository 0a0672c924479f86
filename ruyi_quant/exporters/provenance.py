"""What made a family, as every exported file records it (GGUF ruyi.* keys, ONNX metadata_props)."""

from __future__ import annotations

LICENSES = {"builtin:ruyi-mini": "apache-2.0", "builtin:smollm2": "apache-2.0"}


def provenance(fam, license: str | None = None) -> dict:
    """source_model, license, exits, method; bits, group_size and sym when quantized; calibration
    for GPTQ/AWQ. Values are None where unknown."""
    prov = fam.provenance
    source = prov.model if prov else None
    q, cal = (prov.quantize, prov.calibration) if prov else (None, None)
    common = fam.quantization_json()["common"] or (q.model_dump() if q else {})
    out = {
        "source_model": str(source or "unknown"),
        "license": license or LICENSES.get(source or ""),
        "exits": list(fam.config.exits),
        "method": fam.method,
    }
    if fam.grids:
        out.update(
            bits=int(common.get("bits", 0)),
            group_size=int(common.get("group_size", 0)),
            sym=bool(common.get("sym", True)),
        )
    if cal is not None and fam.method in ("gptq", "awq"):
        out["calibration"] = f"{cal.source} {cal.samples}x{cal.seq_len} seed {cal.seed}"
    return out
