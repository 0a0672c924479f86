"""Calibrated K-quant families: GPTQ inside llama.cpp's block types, written exactly into the
files llama.cpp's quantizer would type the same way, run by llama.cpp like our dequantized model."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from conftest import calib_ids, kl_top1, needs_llama

from ruyi_quant import names
from ruyi_quant.errors import UserError
from ruyi_quant.quant import kquant as K
from ruyi_quant.quant.family import QuantizedFamily
from ruyi_quant.recipe import GGUFExport, HFExport, ONNXExport, Provenance, Quantize
from ruyi_quant.store.checkpoint import load_family, load_model, save_family

pytestmark = needs_llama


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    """A tiny family whose rows are multiples of 256 (K-quants native) except ffn_down's 320
    (fallback blocks), deep enough that exits' files type the same layer differently."""
    from ruyi_quant.sources.tiny import build_tiny

    return build_tiny(
        tmp_path_factory.mktemp("wide") / "m", hidden=256, intermediate=320, layers=10, exits=(3, 6, 9)
    )


@pytest.fixture(scope="module")
def calibrated(wide_dir):
    from ruyi_quant.pipeline import quantize

    q = Quantize(method="gptq", gguf="q4_k_m")
    fam = quantize(load_model(wide_dir), q, calib_ids(wide_dir, 16, 64), progress=False)
    fam.provenance = Provenance(model=str(wide_dir), quantize=q)
    return fam


def tensors_of(path):
    return {t.name: (t.tensor_type, np.asarray(t.data)) for t in gguf.GGUFReader(str(path)).tensors}


def test_per_exit_files_have_llama_cpps_types_and_sizes(calibrated, wide_dir, tmp_path):
    """Each exit's file has exactly the tensor names, types and byte sizes of llama.cpp's own
    q4_k_m file of the float family; the calibrated tensors hold other bytes than llama.cpp's."""
    from ruyi_quant.exporters import export

    ours = export(calibrated, tmp_path / "ours", wide_dir, GGUFExport(), progress=False)
    float_fam = QuantizedFamily.from_model(load_model(wide_dir))
    float_fam.provenance = calibrated.provenance
    theirs = export(
        float_fam, tmp_path / "theirs", wide_dir, GGUFExport(type="q4_k_m", imatrix=False), progress=False
    )
    kinds = set()
    for a, b in zip(ours["exits"], theirs["exits"]):
        e = a["exit"]
        t_ours = tensors_of(tmp_path / "ours" / f"exit-{e}" / a["file"])
        t_theirs = tensors_of(tmp_path / "theirs" / f"exit-{e}" / b["file"])
        assert {n: (t, d.nbytes) for n, (t, d) in t_ours.items()} == {
            n: (t, d.nbytes) for n, (t, d) in t_theirs.items()
        }
        changed = [n for n in t_ours if not np.array_equal(t_ours[n][1], t_theirs[n][1])]
        linears = [n for n, (t, _) in t_ours.items() if t not in (0, 1) and n != "token_embd.weight"]
        assert set(changed) == set(linears), set(linears) - set(changed)
        assert np.array_equal(t_ours["token_embd.weight"][1], t_theirs["token_embd.weight"][1])
        kinds |= {gguf.GGMLQuantizationType(t).name for t, _ in t_ours.values()}
    assert {"Q4_K", "Q6_K", "Q5_0", "Q8_0"} <= kinds, kinds


@pytest.fixture(scope="module", params=["gptq", "awq", "awq+gptq"])
def any_calibrated(request, wide_dir, calibrated):
    """A q4_k_m family of each calibration method: GPTQ, AWQ (its scales, then llama.cpp's own
    rounding), AWQ's scales then GPTQ."""
    from ruyi_quant.pipeline import quantize

    if request.param == "gptq":
        return calibrated
    method, _, then = request.param.partition("+")
    q = Quantize(method=method, gguf="q4_k_m", gptq={"awq_scales": bool(then)})
    fam = quantize(load_model(wide_dir), q, calib_ids(wide_dir, 16, 64), progress=False)
    fam.provenance = Provenance(model=str(wide_dir), quantize=q)
    assert fam.stats["awq_scale_ratios"] and fam.layout == "ggml"
    return fam


def test_llama_cpp_runs_every_exit_like_our_dequantized_model(any_calibrated, wide_dir, tmp_path, eval_ids):
    """llama.cpp's logits of each exit's file against our model on the same weights: each
    module dequantized (by us) in the type that exit's file gives it."""
    from ruyi_quant.exporters import export
    from ruyi_quant.exporters.gguf.files import exit_blocks
    from ruyi_quant.exporters.gguf.llamacpp import open_llama
    from ruyi_quant.quant.ggml_quantizer import quantize_rows

    calibrated = any_calibrated
    info = export(calibrated, tmp_path / "g", wide_dir, GGUFExport(), progress=False)
    ids = eval_ids[0, :96]
    deq = calibrated.dequantized_model()
    state = deq.state_dict()
    for j, x in enumerate(info["exits"]):
        e = x["exit"]
        for m, t in exit_blocks(calibrated, j).items():
            if m in calibrated.grids:
                w = calibrated.grids[m].dequantize(t)
            else:  # the embedding: ggml's own rounding, as in the file
                emb = calibrated.tensors[f"{m}.weight"].half().float().numpy()
                w = torch.from_numpy(
                    K.dequantize(*K.decode(quantize_rows(K.TYPES[t].qtype, emb, None), t, emb.shape[1]), t)
                )
            state[f"{m}.weight"].copy_(w)
        with torch.no_grad():
            ref = deq(ids[None], exit=e).logits[0]
        llm = open_llama(
            tmp_path / "g" / f"exit-{e}" / x["file"], n_ctx=128, logits_all=True, verbose=False, n_threads=2
        )
        llm.eval(ids.tolist())
        got = torch.tensor(np.array(llm.scores[: ids.numel()]), dtype=torch.float32)
        llm.close()
        kl, top1 = kl_top1(ref, got)
        # measured (AMD EPYC, AVX2) KL 9e-5 to 2.6e-4, top-1 100%
        assert kl < 1e-3 and top1 >= 0.97, (e, kl, top1)


def test_a_saved_block_family_loads_back_byte_for_byte(calibrated, wide_dir, tmp_path):
    (tmp_path / "fam").mkdir()
    save_family(calibrated, tmp_path / "fam", wide_dir)
    back = load_family(tmp_path / "fam")
    assert back.gguf == "q4_k_m" and back.layout == "ggml"
    assert back.modules == calibrated.modules
    for m, g in calibrated.grids.items():
        got = back.grids[m].get()
        assert got.spec.ggml == g.spec.ggml
        for t in g.spec.ggml:
            assert torch.equal(got.data[t], g.data[t]), (m, t)
    assert any(len(s.ggml) > 1 for s in back.modules.values())  # a layer typed twice


def test_a_corrupt_block_scale_is_one_line(calibrated, wide_dir, tmp_path):
    """A block whose fp16 scale d is Inf (the file's bytes changed in place) is refused in one
    line when the grid is read."""
    import json
    import struct

    (tmp_path / "fam").mkdir()
    save_family(calibrated, tmp_path / "fam", wide_dir)
    f = next((tmp_path / "fam").glob("*.safetensors"))
    raw = bytearray(f.read_bytes())
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + hlen])
    name = next(n for n in header if n.endswith(".ggml") and "q_proj" in n)
    at = 8 + hlen + header[name]["data_offsets"][0]  # row 0, block 0: d first (Q4_K)
    raw[at : at + 2] = b"\x00\x7c"  # fp16 +Inf
    f.write_bytes(bytes(raw))
    fam = load_family(tmp_path / "fam", hashes=False)
    with pytest.raises(UserError, match="not finite") as e:
        fam.grids[name.removesuffix(".ggml")].get()
    assert "\n" not in str(e.value) and str(e.value).startswith(str(f))


@pytest.mark.parametrize("ex", [HFExport(), HFExport(weights="gptq"), ONNXExport()])
def test_hf_and_onnx_refuse_block_grids_in_one_line(calibrated, wide_dir, tmp_path, ex):
    from ruyi_quant.exporters import export

    with pytest.raises(UserError, match="6-bit sub-block scales") as e:
        export(calibrated, tmp_path / "x", wide_dir, ex, progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("ex", "words"),
    [
        (GGUFExport(type="q5_k_m"), "type q5_k_m"),
        (GGUFExport(type="q4_0"), "q4_0"),
    ],
)
def test_gguf_refuses_other_types(calibrated, wide_dir, tmp_path, ex, words):
    from ruyi_quant.exporters import export

    with pytest.raises(UserError, match=words):
        export(calibrated, tmp_path / "x", wide_dir, ex, progress=False)


def test_gguf_quantize_needs_a_calibrated_method():
    with pytest.raises(ValueError, match="need method gptq or awq, not rtn"):
        Quantize(method="rtn", gguf="q4_k_m")


def test_the_multi_exit_file_holds_each_module_once_in_its_most_bits(calibrated, wide_dir, tmp_path):
    """The multi-exit file stores every block grid once, in the type with the most bits that any
    exit's file gives it; an exit copied out of it runs in llama.cpp and is never smaller than
    that exit's own file."""
    from ruyi_quant.exporters import export
    from ruyi_quant.exporters.gguf.export import extract
    from ruyi_quant.exporters.gguf.llamacpp import open_llama

    info = export(calibrated, tmp_path / "g", wide_dir, GGUFExport(multi=True), progress=False)
    multi = tmp_path / "g" / info["multi"]["file"]
    stored = tensors_of(multi)
    for m, g in calibrated.grids.items():
        t, data = stored[names.gguf_multi_name(f"{m}.weight")]
        assert gguf.GGMLQuantizationType(t).name.lower() == g.spec.ggml[0]
        assert np.array_equal(data.reshape(-1), g.data[g.spec.ggml[0]].numpy().reshape(-1))
    per_exit = sum(x["bytes"] for x in info["exits"])
    assert info["multi"]["bytes"] < per_exit
    (tmp_path / "x").mkdir()
    for x, y in zip(extract(multi, None, tmp_path / "x"), info["exits"]):
        path = tmp_path / "x" / f"exit-{x['exit']}" / x["file"]
        assert x["bytes"] >= y["bytes"]
        llm = open_llama(path, n_ctx=64, logits_all=True, verbose=False, n_threads=2)
        llm.eval([1, 2, 3, 4])
        assert np.isfinite(np.array(llm.scores[:4])).all()
        llm.close()


@pytest.mark.parametrize("change", [{"gguf": "q9_k"}, {"layout": "gptq"}])
def test_a_malformed_block_family_manifest_is_one_line(calibrated, wide_dir, tmp_path, change):
    import json

    (tmp_path / "fam").mkdir()
    save_family(calibrated, tmp_path / "fam", wide_dir)
    meta_path = tmp_path / "fam" / "ruyi_quant.json"
    meta = json.loads(meta_path.read_text())
    meta["quantization"].update(change)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="malformed|disagree") as e:
        load_family(tmp_path / "fam", hashes=False)
    assert "\n" not in str(e.value)
