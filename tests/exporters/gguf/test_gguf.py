"""GGUF export: exact block encodings, stock llama.cpp loading and logits, the multi-exit file,
Ollama Modelfiles, refusals. llama.cpp checks skip (with the reason) when llama-cpp-python is
not installed; .ci/run installs it."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from conftest import MIXED_TEXT, kl_top1, needs_llama, needs_smollm2
from gguf import GGMLQuantizationType as T

from ruyi_quant import names
from ruyi_quant.errors import UserError
from ruyi_quant.exporters import gguf as G
from ruyi_quant.exporters.gguf.ggml import NotExact, encode_grid
from ruyi_quant.exporters.gguf.llamacpp import open_llama
from ruyi_quant.model import layout
from ruyi_quant.quant.family import QuantizedFamily
from ruyi_quant.quant.ggml_quantizer import quantize_rows
from ruyi_quant.quant.pack import dequantize
from ruyi_quant.quant.plan import QuantSpec
from ruyi_quant.quant.rtn import group_qparams, rtn_family, rtn_quantize
from ruyi_quant.recipe import Provenance, Quantize
from ruyi_quant.store.checkpoint import load_family, load_model

try:
    import llama_cpp
except ImportError:  # pragma: no cover - CI installs it
    llama_cpp = None


def linears(model, heads=False):
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and (heads or not n.startswith("lm_head"))
    ]


def rtn_fam(model, bits=4, gs=32, sym=True, heads=False, source="builtin:tiny"):
    fam = rtn_family(model, {n: QuantSpec(bits, gs, sym) for n in linears(model, heads)}, progress=False)
    fam.provenance = Provenance(model=source, quantize=Quantize(method="rtn"))
    return fam


# --- pure encodings ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bits,sym,qtype",
    [(4, True, T.Q4_0), (4, False, T.Q4_1), (3, True, T.Q4_0), (2, False, T.Q4_1), (8, True, T.Q8_0)],
)
@pytest.mark.parametrize("gs", [32, 128, -1])
def test_grid_blocks_decode_to_our_weights_bit_for_bit(bits, sym, qtype, gs):
    g = torch.Generator().manual_seed(bits * 10 + gs)
    w = torch.randn(48, 256, generator=g) * torch.logspace(-3, 0, 48).unsqueeze(1) + 0.02
    spec = QuantSpec(bits, gs, sym)
    grid = rtn_quantize(w, spec)
    data, got = encode_grid(*grid, bits, sym)
    assert got == qtype and data.dtype == np.uint8
    assert data.shape == (48, 256 // 32 * gguf.GGML_QUANT_SIZES[qtype][1])
    ours = dequantize(*grid).numpy()
    # the gguf package's own decoder (llama.cpp's layout) gives our weights exactly
    np.testing.assert_array_equal(gguf.quants.dequantize(data, qtype), ours)


def test_asymmetric_mins_are_fp16_numbers():
    g = torch.Generator().manual_seed(0)
    for mag in (1e-4, 1e-2, 1.0, 30.0):
        w = torch.randn(512, 128, generator=g) * mag + mag * torch.rand(512, 1, generator=g)
        scale, zero = group_qparams(w, QuantSpec(4, 128, sym=False))
        m = -(scale.double() * zero.double())
        assert torch.equal(m.half().double(), m)
        # the scale moved by less than 1% of itself from the plain fp16 range/15
        plain = ((w.max(1).values.clamp(min=0) - w.min(1).values.clamp(max=0)) / 15).half().double()
        big = plain > 2.0**-14  # normal fp16 scales
        assert mag < 1e-3 or float(((scale.double() - plain).abs() / plain)[big].max()) < 0.01


def test_asymmetric_grid_whose_mins_are_not_fp16_is_refused():
    """Q4_1 stores m = -scale*zero in fp16: a grid whose mins are not fp16 numbers (an fp16
    scale not rounded by exact_min_scale) cannot be written exactly, and is refused."""
    q = torch.randint(0, 16, (64, 4), generator=torch.Generator().manual_seed(0))
    scales = torch.full((2, 4), 0.0123, dtype=torch.float16)  # 11 significant bits
    zeros = torch.full((2, 4), 7)
    assert ((-(scales.double() * 7)).half().double() != -(scales.double() * 7)).all()
    with pytest.raises(NotExact, match="not fp16 numbers"):
        encode_grid(q, scales, zeros, torch.arange(64) // 32, 4, False)


def test_grids_ggml_cannot_hold_are_refused():
    w = torch.randn(16, 64)
    with pytest.raises(NotExact, match="32-column blocks"):
        encode_grid(*rtn_quantize(w, QuantSpec(4, 16, True)), 4, True)
    with pytest.raises(NotExact, match="8-bit asymmetric"):
        encode_grid(*rtn_quantize(w, QuantSpec(8, 32, False)), 8, False)
    q, s, z, g_idx = rtn_quantize(w, QuantSpec(4, 32, True))
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(NotExact, match="act-order"):
        encode_grid(q[perm], s, z, g_idx[perm], 4, True)


# --- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["tiny_dir", "tiny_shared_dir"])
def test_multi_exit_names_map_to_the_per_exit_names(which, request):
    fam = QuantizedFamily.from_model(load_model(request.getfixturevalue(which)))
    cfg = fam.config
    for j, e in enumerate(cfg.exits):
        direct = {names.gguf_name(cfg.exit_map(j).rename(f)) for f in fam.exit_tensor_names(j)}
        via_multi = {
            names.gguf_multi_to_exit(names.gguf_multi_name(f), cfg.exit_map(j)) for f in fam.tensors
        } - {None}
        assert direct == via_multi
        assert f"blk.{e}.attn_q.weight" in direct and f"blk.{e + 1}.attn_q.weight" not in direct


# --- files ------------------------------------------------------------------------------------


def tensors_of(path):
    r = gguf.GGUFReader(str(path))
    return {t.name: (T(t.tensor_type), np.asarray(t.data).tobytes()) for t in r.tensors}, {
        k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")
    }


def test_per_exit_file_metadata(tiny_dir, tmp_path):
    model = load_model(tiny_dir)
    fam = rtn_fam(model, sym=False)
    cfg = fam.config
    for e in cfg.exits:
        info = G.write_exit(fam, e, tmp_path / f"e{e}.gguf", tiny_dir)
        tensors, kv = tensors_of(tmp_path / f"e{e}.gguf")
        assert kv["general.architecture"] == "qwen2" and kv["qwen2.block_count"] == e + 1
        assert kv["tokenizer.ggml.pre"] == "qwen2" and kv["tokenizer.ggml.model"] == "gpt2"
        assert len(kv["tokenizer.ggml.tokens"]) == cfg.vocab_size
        assert kv["ruyi.exit"] == e and kv["ruyi.exits"] == cfg.exits and kv["ruyi.method"] == "rtn"
        assert (kv["ruyi.bits"], kv["ruyi.group_size"], kv["ruyi.sym"]) == (4, 32, False)
        assert "<|im_start|>" in kv["tokenizer.chat_template"]
        assert tensors[f"blk.{e}.ffn_down.weight"][0] == T.Q4_1
        assert tensors["token_embd.weight"][0] == T.Q8_0 and tensors["output.weight"][0] == T.Q8_0
        assert tensors["blk.0.attn_norm.weight"][0] == T.F32 and tensors["blk.0.attn_q.bias"][0] == T.F32
        assert len([n for n in tensors if n.startswith("blk.")]) == (e + 1) * 12
        assert info["types"] == ["F32", "Q4_1", "Q8_0"]
        # the branch layer is block e, not trunk layer e
        j = cfg.exit_index(e)
        if e != cfg.num_layers - 1:
            branch = encode_grid(*fam.grid(f"model.eelayers.{j}.mlp.down_proj"), 4, False)[0]
            assert tensors[f"blk.{e}.ffn_down.weight"][1] == branch.tobytes()


@pytest.mark.parametrize("which", ["tiny_dir", "tiny_shared_dir"])
def test_multi_exit_file_stores_each_tensor_once_and_extracts_byte_identical(which, request, tmp_path):
    src = request.getfixturevalue(which)
    model = load_model(src)
    fam = rtn_fam(model, sym=True, heads=True)
    cfg = fam.config
    info = G.write_multi(fam, tmp_path / "family.gguf", src)
    multi, kv = tensors_of(tmp_path / "family.gguf")
    assert (
        kv["general.architecture"] == "ruyi"
        and json.loads(kv["ruyi.config"])["early_exit_points"] == cfg.exits
    )
    distinct = {names.gguf_multi_name(n) for n in fam.weight_names()}
    assert set(multi) == distinct  # every tensor once
    assert info["bytes"] - info["tensor_bytes"] < 64 * 1024 + 64 * len(multi)  # metadata + padding
    for e in cfg.exits:
        G.write_exit(fam, e, tmp_path / f"direct-{e}.gguf", src)
        (tmp_path / f"x{e}").mkdir()
        G.extract_exit(tmp_path / "family.gguf", e, tmp_path / f"x{e}" / f"x-{e}.gguf")
        direct, kv_d = tensors_of(tmp_path / f"direct-{e}.gguf")
        copied, kv_x = tensors_of(tmp_path / f"x{e}" / f"x-{e}.gguf")
        assert direct.keys() == copied.keys()
        assert all(direct[n] == copied[n] for n in direct)  # type and bytes
        assert kv_d == kv_x
        assert (tmp_path / f"x{e}" / "Modelfile").is_file()


@pytest.mark.parametrize("which", ["tiny_dir", "tiny_shared_dir"])
def test_export_encodes_each_shared_module_once_into_the_same_files(which, request, tmp_path, monkeypatch):
    """A per-exit + multi-exit export encodes each module once (the trunk is in every file), and
    every file is byte for byte what writing it alone gives; the cache leaves nothing behind."""
    import hashlib
    from collections import Counter

    from ruyi_quant.exporters import export as export_gguf
    from ruyi_quant.exporters.gguf import tensors as gt
    from ruyi_quant.recipe import GGUFExport

    src = request.getfixturevalue(which)
    fam = rtn_fam(load_model(src), sym=False, heads=True)
    calls = Counter()
    real = gt.encode_module
    monkeypatch.setattr(gt, "encode_module", lambda f, m, *a: calls.update([m]) or real(f, m, *a))
    alone = {}
    for e in fam.config.exits:
        G.write_exit(fam, e, tmp_path / f"alone-{e}.gguf", src)
        alone[e] = hashlib.sha256((tmp_path / f"alone-{e}.gguf").read_bytes()).hexdigest()
    assert max(calls.values()) > 1  # written alone, the trunk is encoded per file
    calls.clear()
    G.write_multi(fam, tmp_path / "alone-multi.gguf", src)
    every = set(calls)  # the multi-exit file holds every module
    calls.clear()
    info = export_gguf(fam, tmp_path / "g", src, GGUFExport(multi=True), progress=False)
    assert calls == Counter(every)  # each encoded once
    for x in info["exits"]:
        got = (tmp_path / "g" / f"exit-{x['exit']}" / x["file"]).read_bytes()
        assert hashlib.sha256(got).hexdigest() == alone[x["exit"]]
    multi = (tmp_path / "g" / info["multi"]["file"]).read_bytes()
    assert multi == (tmp_path / "alone-multi.gguf").read_bytes()
    assert not (tmp_path / "g" / ".encoded").exists()


def test_extract_refuses_a_stock_file(tiny_dir, tmp_path):
    fam = QuantizedFamily.from_model(load_model(tiny_dir))
    G.write_exit(fam, 3, tmp_path / "e3.gguf", tiny_dir)
    with pytest.raises(UserError, match="not a ruyi-quant multi-exit GGUF"):
        G.extract_exit(tmp_path / "e3.gguf", 3, tmp_path / "x.gguf")
    G.write_multi(fam, tmp_path / "m.gguf", tiny_dir)
    with pytest.raises(UserError, match="exits at layers"):
        G.extract_exit(tmp_path / "m.gguf", 4, tmp_path / "x.gguf")


def test_cli_extracts_every_exit_when_none_is_named(tiny_dir, tmp_path):
    """`export gguf --from FAMILY.gguf` without --exit copies every exit out, as --exits says."""
    from ruyi_quant.cli import main

    fam = QuantizedFamily.from_model(load_model(tiny_dir))
    G.write_multi(fam, tmp_path / "m-family-f16.gguf", tiny_dir)
    assert (
        main(["export", "gguf", "--from", str(tmp_path / "m-family-f16.gguf"), "--out", str(tmp_path / "x")])
        == 0
    )
    got = sorted(p.relative_to(tmp_path / "x").as_posix() for p in (tmp_path / "x").rglob("*.gguf"))
    assert got == [f"exit-{e}/m-e{e}-f16.gguf" for e in fam.config.exits]


def test_modelfile_template_renders_the_chat_template(tiny_dir, tmp_path):
    from transformers import AutoTokenizer

    fam = QuantizedFamily.from_model(load_model(tiny_dir))
    G.write_exit(fam, 5, tmp_path / "e5.gguf", tiny_dir)
    text = (tmp_path / "Modelfile").read_text()
    assert text.startswith("FROM ./e5.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in text
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    # expand Ollama's `range .Messages` by hand and compare with transformers' rendering
    body, tail = re.fullmatch(r"\{\{- range \.Messages \}\}(.*?)\{\{ end \}\}(.*)", template, re.S).group(
        1, 2
    )
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    ours = (
        "".join(body.replace("{{ .Role }}", m["role"]).replace("{{ .Content }}", m["content"]) for m in msgs)
        + tail
    )
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert ours == tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


def test_export_refusals_write_nothing(tiny_dir, tmp_path):
    from ruyi_quant.store.checkpoint import save_family

    model = load_model(tiny_dir)
    for spec, opts, msg in [
        (QuantSpec(4, 16, True), [], "group_size a multiple of 32"),
        (QuantSpec(8, 32, False), [], "8-bit asymmetric"),
        (QuantSpec(4, 32, False), ["--type", "q4_0"], "Q4_0 cannot hold"),
    ]:
        fam = rtn_family(model, {n: spec for n in linears(model)}, progress=False)
        d = tmp_path / f"fam-{spec.bits}-{spec.group_size}-{spec.sym}-{len(opts)}"
        d.mkdir()
        save_family(fam, d, tiny_dir)
        out = tmp_path / f"out-{d.name}"
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "ruyi_quant.cli",
                "export",
                str(d),
                "--format",
                "gguf",
                "--out",
                str(out),
                *opts,
            ],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 2, r.stderr
        assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert not out.exists()


def test_pre_tokenizer_names():
    from ruyi_quant import text as P

    qwen2 = {
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": P.QWEN2_REGEX}, "behavior": "Isolated"},
                {"type": "ByteLevel", "use_regex": False},
            ],
        }
    }
    smol = {
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": True},
                {"type": "ByteLevel", "use_regex": True},
            ],
        }
    }
    gpt2 = {"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}
    assert [P.pre_tokenizer_name(x) for x in (qwen2, smol, gpt2)] == ["qwen2", "smollm", "gpt-2"]
    # the tokenizer.json fragments we write name themselves
    assert all(P.pre_tokenizer_name({"pre_tokenizer": j}) == n for n, j in P.PRE_TOKENIZER_JSON.items())
    with pytest.raises(UserError, match="unknown pre-tokenizer"):
        P.pre_tokenizer_name({"pre_tokenizer": {"type": "Metaspace"}})
    # Qwen2Tokenizer (transformers 5) reproduces only NFC + Qwen2's regex
    assert P.reproduced_by_qwen2_tokenizer({**qwen2, "normalizer": {"type": "NFC"}})
    assert not P.reproduced_by_qwen2_tokenizer(qwen2)
    assert not P.reproduced_by_qwen2_tokenizer({**smol, "normalizer": {"type": "NFC"}})
    assert not P.reproduced_by_qwen2_tokenizer({"pre_tokenizer": {"type": "Metaspace"}})


# --- llama.cpp --------------------------------------------------------------------------------


def llama_logits(path, ids: torch.Tensor) -> torch.Tensor:
    llm = open_llama(
        path, n_ctx=max(64, ids.numel()), logits_all=True, verbose=False, n_threads=2, n_batch=ids.numel()
    )
    llm.eval(ids.tolist())
    out = torch.tensor(np.array(llm.scores[: ids.numel()]), dtype=torch.float32)
    llm.close()
    return out


@needs_llama
@pytest.mark.parametrize("which", ["tiny_dir", "tiny_shared_dir"])
@pytest.mark.parametrize("ftype", ["f32", "f16"])
def test_llama_cpp_runs_float_exits_like_our_model(which, ftype, request, tmp_path, eval_ids):
    src = request.getfixturevalue(which)
    model = load_model(src)
    fam = QuantizedFamily.from_model(model)
    ids = eval_ids[0, :96]
    for e in fam.config.exits:
        path = tmp_path / f"e{e}.gguf"
        G.write_exit(fam, e, path, src, G.GGUFOptions(type=ftype))
        with torch.no_grad():
            ref = model(ids[None], exit=e).logits[0]
        kl, top1 = kl_top1(ref, llama_logits(path, ids))
        # measured KL 3e-9 to 8.8e-7 (f32 and f16), top-1 100%
        assert kl < 1e-5 and top1 >= 0.99, (e, kl, top1)


@needs_llama
@pytest.mark.parametrize("sym", [True, False])
def test_llama_cpp_runs_int4_exits_like_our_dequantized_model(sym, tiny_dir, tmp_path, eval_ids):
    from ruyi_quant.pipeline import quantize
    from ruyi_quant.recipe import Quantize

    model = load_model(tiny_dir)
    calib = eval_ids[:, :64]
    fam = quantize(model, Quantize(method="gptq", bits=4, group_size=32, sym=sym), calib, progress=False)
    fam.provenance = Provenance(model="builtin:tiny")
    deq = fam.dequantized_model()
    ids = eval_ids[1, :96]
    for e in fam.config.exits:
        path = tmp_path / f"e{e}.gguf"
        info = G.write_exit(fam, e, path, tiny_dir, G.GGUFOptions(embed_type="f32", head_type="f32"))
        assert ("Q4_0" if sym else "Q4_1") in info["types"]
        with torch.no_grad():
            ref = deq(ids[None], exit=e).logits[0]
        kl, top1 = kl_top1(ref, llama_logits(path, ids))
        # measured KL 4.9e-5 to 2.2e-4, top-1 97.9-100%
        assert kl < 1e-3 and top1 >= 0.97, (e, kl, top1)


@needs_llama
@pytest.mark.parametrize("which,pre", [("tiny_dir", "qwen2"), ("tiny_smollm_dir", "smollm")])
def test_llama_cpp_tokenizes_like_transformers(which, pre, request, tmp_path):
    """The GGUF of an exit tokenizes as the source tokenizer does and as AutoTokenizer reads the
    HF export of the same exit (Qwen2's pre-tokenizer, and SmolLM2's)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from ruyi_quant.exporters.hf import export_exit

    src = request.getfixturevalue(which)
    fam = QuantizedFamily.from_model(load_model(src))
    G.write_exit(fam, 2, tmp_path / "e2.gguf", src)
    assert tensors_of(tmp_path / "e2.gguf")[1]["tokenizer.ggml.pre"] == pre
    (tmp_path / "hf").mkdir()
    export_exit(fam, 2, tmp_path / "hf", src, weights="float")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "e2.gguf"), vocab_only=True, verbose=False)
    ours = PreTrainedTokenizerFast.from_pretrained(src)(MIXED_TEXT, add_special_tokens=False)["input_ids"]
    auto = AutoTokenizer.from_pretrained(tmp_path / "hf")(MIXED_TEXT, add_special_tokens=False)["input_ids"]
    assert llm.tokenize(MIXED_TEXT.encode(), add_bos=False, special=False) == ours == auto
    assert llm.detokenize(ours).decode() == MIXED_TEXT


@pytest.mark.parametrize("which", ["tiny_dir", "tiny_shared_dir"])
def test_a_saved_family_exports_the_same_bytes_as_in_memory(which, request, tmp_path):
    """Saving a family and loading it back changes nothing a per-exit GGUF file holds, not even
    the tensor order (a loaded family once listed its tensors in safetensors file order)."""
    from ruyi_quant.store.checkpoint import save_family

    src = request.getfixturevalue(which)
    fam = rtn_fam(load_model(src), sym=False, heads=True)
    (tmp_path / "fam").mkdir()
    save_family(fam, tmp_path / "fam", src)
    back = load_family(tmp_path / "fam")
    for f, name in ((fam, "a"), (back, "b")):
        G.write_exit(f, 3, tmp_path / f"{name}.gguf", src)
        G.write_multi(f, tmp_path / f"{name}-multi.gguf", src)
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
    # the multi-exit file's tensors too (its ruyi.config carries the saved config.json's extras)
    ta, tb = (gguf.GGUFReader(str(tmp_path / f"{n}-multi.gguf")).tensors for n in "ab")
    assert [(t.name, np.asarray(t.data).tobytes()) for t in ta] == [
        (t.name, np.asarray(t.data).tobytes()) for t in tb
    ]


def test_special_token_ids_are_under_the_keys_llama_cpp_reads(tiny_dir, tmp_path):
    """bos/eos/pad ids go under gguf-py's Keys.Tokenizer names, which mirror llama.cpp's: the pad
    id is `tokenizer.ggml.padding_token_id` (a hand-spelled `pad_token_id` was silently ignored
    by llama.cpp). No tokenizer key outside that table."""
    fam = QuantizedFamily.from_model(load_model(tiny_dir))
    G.write_exit(fam, 2, tmp_path / "e2.gguf", tiny_dir)
    _, kv = tensors_of(tmp_path / "e2.gguf")
    special = gguf.SpecialVocab(tiny_dir, load_merges=False).special_token_ids
    assert {"eos", "pad"} <= set(special)
    for typ, tid in special.items():
        assert kv[getattr(gguf.Keys.Tokenizer, f"{typ.upper()}_ID")] == tid, typ
    known = {v for k, v in vars(gguf.Keys.Tokenizer).items() if k.isupper()}
    assert {k for k in kv if k.startswith("tokenizer.")} <= known


@needs_llama
def test_llama_cpp_reads_the_pad_token(tiny_dir, tmp_path):
    fam = QuantizedFamily.from_model(load_model(tiny_dir))
    G.write_exit(fam, 2, tmp_path / "e2.gguf", tiny_dir)
    llm = llama_cpp.Llama(model_path=str(tmp_path / "e2.gguf"), vocab_only=True, verbose=False)
    pad = gguf.SpecialVocab(tiny_dir, load_merges=False).special_token_ids["pad"]
    assert llama_cpp.llama_vocab_pad(llama_cpp.llama_model_get_vocab(llm.model)) == pad


@pytest.mark.slow
@needs_llama
@needs_smollm2
def test_ruyi_mini_tokenizes_as_smollm2(tmp_path):
    """ruyi-mini's tokenizer is SmolLM2's own: llama.cpp on the GGUF SmolLM2 ships in (its
    `smollm` pre-tokenizer), transformers on ruyi-mini, AutoTokenizer on an exit's HF export and on
    the saved family, and llama.cpp on that exit's GGUF give the same ids on mixed text."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from ruyi_quant.exporters.hf import export_exit
    from ruyi_quant.sources import resolve_model
    from ruyi_quant.sources.smollm2 import smollm2_gguf_path
    from ruyi_quant.store.checkpoint import save_family

    def cpp(path):
        llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        return llm.tokenize(MIXED_TEXT.encode(), add_bos=False, special=False)

    def auto(d):
        return AutoTokenizer.from_pretrained(d)(MIXED_TEXT, add_special_tokens=False)["input_ids"]

    want = cpp(smollm2_gguf_path())
    src = resolve_model("builtin:ruyi-mini")
    assert (
        PreTrainedTokenizerFast.from_pretrained(src)(MIXED_TEXT, add_special_tokens=False)["input_ids"]
        == want
    )
    fam = QuantizedFamily.from_model(load_model(src, dtype=None))
    (tmp_path / "hf").mkdir()
    export_exit(fam, 12, tmp_path / "hf", src, weights="float")
    G.write_exit(fam, 12, tmp_path / "e12.gguf", src)
    (tmp_path / "fam").mkdir()
    save_family(fam, tmp_path / "fam", src)
    assert auto(tmp_path / "hf") == want and auto(tmp_path / "fam") == want
    assert cpp(tmp_path / "e12.gguf") == want


@pytest.mark.slow
@needs_llama
@needs_smollm2
def test_ruyi_mini_gguf_every_exit_in_llama_cpp(tmp_path):
    """ruyi-mini, RTN 4-bit g128 asym (Q4_1): every exit's stock file runs in llama.cpp like our
    dequantized model; the last exit's F16 file like the float model; the multi-exit file stores
    the trunk once; llama.cpp tokenizes SmolLM2's vocabulary like transformers."""
    from transformers import AutoTokenizer

    from ruyi_quant.exporters import export as export_gguf
    from ruyi_quant.recipe import GGUFExport
    from ruyi_quant.sources import resolve_model
    from ruyi_quant.text import consecutive_windows, load_text, load_tokenizer, tokenize

    src = resolve_model("builtin:ruyi-mini")
    model = load_model(src)
    fam = rtn_fam(model, bits=4, gs=128, sym=False, source="builtin:ruyi-mini")
    info = export_gguf(fam, tmp_path / "g", src, GGUFExport(multi=True), progress=False)
    ids = consecutive_windows(tokenize(load_tokenizer(src), load_text("builtin:pydoc/eval")), 1, 256, "eval")[
        0
    ]
    deq = fam.dequantized_model()
    with torch.no_grad():
        ref_q = deq.forward_exits(ids[None])
    for x in info["exits"]:
        e = x["exit"]
        kv = tensors_of(tmp_path / "g" / f"exit-{e}" / x["file"])[1]
        assert kv["tokenizer.ggml.pre"] == "smollm" and kv["general.license"] == "apache-2.0"
        assert kv["qwen2.rope.freq_base"] == 100000.0 and kv["qwen2.block_count"] == e + 1
        # against our dequantized int4 model: the same Q4_1 weights, the tied head kept in f16.
        # llama.cpp multiplies Q4 weights with 8-bit-quantized activations, and that rounding
        # alone flips ruyi-mini's near-ties: over 512 tokens llama.cpp reads KL 0.0018-0.0032,
        # top-1 95.1-97.7% per exit, and our own model with the same 8-bit activation rounding
        # reads KL 0.0019-0.0032, top-1 94.7-97.7% against itself
        # (benchmarks/llama_cpp_agreement.py; F16 files: 100%), so top-1 only guards against
        # gross errors here
        path = tmp_path / f"e{e}-f16-head.gguf"
        G.write_exit(fam, e, path, src, G.GGUFOptions(embed_type="f16"))
        kl, top1 = kl_top1(ref_q[e][0], llama_logits(path, ids))
        assert kl < 0.02 and top1 >= 0.90, (e, kl, top1)
    # the multi-exit file: each tensor once, no bigger than 1.15x the largest exit's file
    m = info["multi"]
    # beyond its tensors it holds what a per-exit file holds (the 1.7 MB tokenizer), not more:
    # ruyi-mini's 49k-token vocabulary alone keeps it ~1.8% above its tensors' bytes
    overhead = max(x["bytes"] - x["tensor_bytes"] for x in info["exits"])
    assert m["bytes"] - m["tensor_bytes"] <= overhead + 64 * 1024
    assert m["bytes"] <= 1.15 * max(x["bytes"] for x in info["exits"])
    assert sum(x["bytes"] for x in info["exits"]) > 3 * m["bytes"]
    # every float exit
    with torch.no_grad():
        ref = model.forward_exits(ids[None])
    for e in fam.config.exits:
        G.write_exit(
            QuantizedFamily.from_model(model), e, tmp_path / "f16.gguf", src, G.GGUFOptions(type="f16")
        )
        kl, top1 = kl_top1(ref[e][0], llama_logits(tmp_path / "f16.gguf", ids))
        assert kl < 1e-3 and top1 >= 0.99, (e, kl, top1)
    llm = llama_cpp.Llama(model_path=str(tmp_path / "f16.gguf"), vocab_only=True, verbose=False)
    hf = AutoTokenizer.from_pretrained(src)(MIXED_TEXT, add_special_tokens=False)["input_ids"]
    assert llm.tokenize(MIXED_TEXT.encode(), add_bos=False, special=False) == hf


@needs_llama
def test_k_quants_through_llama_cpp(tiny_dir, tmp_path, eval_ids):
    from ruyi_quant.exporters import export as export_gguf
    from ruyi_quant.recipe import GGUFExport

    model = load_model(tiny_dir)
    fam = QuantizedFamily.from_model(model)
    info = export_gguf(fam, tmp_path / "k", tiny_dir, GGUFExport(type="q6_k", exits=[5]), progress=False)
    path = tmp_path / "k" / "exit-5" / info["exits"][0]["file"]
    assert path.name.endswith("-q6_k.gguf") and not list(path.parent.glob("*.tmp.gguf"))
    assert (path.parent / "Modelfile").read_text().startswith(f"FROM ./{path.name}\n")
    ids = eval_ids[0, :96]
    with torch.no_grad():
        ref = model(ids[None], exit=5).logits[0]
    kl, top1 = kl_top1(ref, llama_logits(path, ids))
    # measured KL 5.9e-4, top-1 100% (llama.cpp's own Q6_K of the float exit)
    assert kl < 3e-3 and top1 >= 0.95, (kl, top1)
    with pytest.raises(UserError, match="already quantized"):
        export_gguf(rtn_fam(model), tmp_path / "k2", tiny_dir, GGUFExport(type="q6_k"), progress=False)


def test_act_order_needs_static_groups_for_gguf(tiny_dir, eval_ids, tmp_path):
    from ruyi_quant.exporters import FORMATS, Target
    from ruyi_quant.pipeline import quantize

    gguf_format = FORMATS["gguf"]
    from ruyi_quant.recipe import GGUFExport, GPTQOptions, Quantize

    for static in (True, False):
        q = Quantize(
            method="gptq", bits=4, group_size=32, gptq=GPTQOptions(act_order=True, static_groups=static)
        )
        fam = quantize(load_model(tiny_dir), q, eval_ids[:, :64], progress=False)
        if not static:
            with pytest.raises(UserError, match="static_groups: true"):
                gguf_format.check(Target.of_family(fam), GGUFExport())
            continue
        gguf_format.check(Target.of_family(fam), GGUFExport())
        G.write_exit(fam, 5, tmp_path / "x.gguf", tiny_dir)
        tensors, _ = tensors_of(tmp_path / "x.gguf")
        data = np.frombuffer(tensors["blk.1.ffn_up.weight"][1], np.uint8).reshape(
            fam.linear_shape("model.layers.1.mlp.up_proj")[0], -1
        )
        np.testing.assert_array_equal(
            gguf.quants.dequantize(data, T.Q4_0), fam.weight("model.layers.1.mlp.up_proj").numpy()
        )


@needs_llama
def test_k_quants_with_our_importance_matrix(tmp_path):
    """Q4_K_M with and without our importance matrix: the same tensor types (llama.cpp's mix);
    ggml's quantizer called by us without a matrix gives llama.cpp's bytes exactly; with the
    matrix every re-encoded tensor has a lower matrix-weighted rounding error."""
    from ruyi_quant.exporters import export as export_gguf
    from ruyi_quant.exporters.gguf import imatrix as IM
    from ruyi_quant.recipe import Calibration, GGUFExport
    from ruyi_quant.sources.tiny import build_tiny
    from ruyi_quant.text import calib_windows

    src = build_tiny(tmp_path / "m", hidden=256, intermediate=512, layers=4, exits=(1, 3))
    model = load_model(src)
    fam = QuantizedFamily.from_model(model)
    fam.provenance = Provenance(model=str(src))
    cal = Calibration(source="builtin:pydoc/calib", samples=8, seq_len=64)
    plain = export_gguf(
        fam, tmp_path / "p", src, GGUFExport(type="q4_k_m", imatrix=False), progress=False, calibration=cal
    )
    weighted = export_gguf(
        fam, tmp_path / "w", src, GGUFExport(type="q4_k_m"), progress=False, calibration=cal
    )
    matrices = IM.collect(model, calib_windows(src, cal), progress=False)
    for j, e in enumerate(fam.config.exits):
        G.write_exit(fam, e, tmp_path / "f16.gguf", src, G.GGUFOptions(type="f16"))
        f16 = tensors_of(tmp_path / "f16.gguf")[0]
        p, _ = tensors_of(tmp_path / "p" / f"exit-{e}" / plain["exits"][j]["file"])
        w, kv = tensors_of(tmp_path / "w" / f"exit-{e}" / weighted["exits"][j]["file"])
        m = IM.for_exit(matrices, fam.config, j)
        assert kv["quantize.imatrix.dataset"].startswith("builtin:pydoc/calib 8x64")
        assert {n: t for n, (t, _) in p.items()} == {n: t for n, (t, _) in w.items()}
        kinds = {p[n][0] for n in p}
        assert {T.Q4_K, T.Q6_K} <= kinds  # real K-quant blocks in this test
        n_changed = 0
        for name, (qtype, data) in p.items():
            if qtype in (T.F32, T.F16):
                continue
            cols = 512 if "ffn_down" in name else 256  # intermediate / hidden width
            x = np.frombuffer(f16[name][1], np.float16).astype(np.float32).reshape(-1, cols)
            np.testing.assert_array_equal(
                quantize_rows(qtype, x, None).reshape(-1), np.frombuffer(data, np.uint8)
            )
            if name not in m:
                assert name == "token_embd.weight" and w[name][1] == data  # a lookup: no matrix
                continue
            deq = [
                gguf.quants.dequantize(np.frombuffer(d, np.uint8).reshape(len(x), -1), qtype)
                for d in (data, w[name][1])
            ]
            err = [float((m[name] * (x - d) ** 2).sum()) for d in deq]
            assert err[1] < err[0], (name, err)
            n_changed += 1
        assert n_changed == 7 * (e + 1) + 1 == kv["quantize.imatrix.entries_count"]


def test_k_quant_export_with_missing_calibration_text_writes_nothing(tiny_dir, tmp_path, capsys):
    from ruyi_quant.cli import main

    code = main(
        [
            "export",
            str(tiny_dir),
            "--format",
            "gguf",
            "--type",
            "q4_k_m",
            "--calib",
            str(tmp_path / "missing.txt"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "missing.txt" in err[0], err
    assert not (tmp_path / "out").exists()


# --- Llama sources ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tiny_dir):
    """A plain Llama checkpoint (no biases, HF's rotate-half RoPE) with the tiny tokenizer and
    a peaked head (the head is a scaled copy of the embeddings)."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    hf = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=512,
            hidden_size=128,
            intermediate_size=320,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            initializer_range=0.08,
            tie_word_embeddings=False,
        )
    )
    with torch.no_grad():
        hf.lm_head.weight.copy_(hf.model.embed_tokens.weight * 40)
    hf.save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_dir / f, d / f)
    return d


@needs_llama
def test_llama_source_exports_llama_architecture(llama_dir, tmp_path, eval_ids):
    """A plain Llama checkpoint becomes a stock `llama` file (q/k rows in llama.cpp's RoPE order,
    no biases) that llama.cpp runs like our model, in F32 and, through a saved int4 family and
    the multi-exit file, in Q4_0."""
    from ruyi_quant.store.checkpoint import save_family

    model = load_model(llama_dir)
    ids = eval_ids[0, :96]
    with torch.no_grad():
        ref = model(ids[None]).logits[0]
    G.write_exit(
        QuantizedFamily.from_model(model), 2, tmp_path / "f32.gguf", llama_dir, G.GGUFOptions(type="f32")
    )
    tensors, kv = tensors_of(tmp_path / "f32.gguf")
    assert kv["general.architecture"] == "llama" and kv["llama.block_count"] == 3
    assert not [n for n in tensors if n.endswith(".bias")]
    kl, top1 = kl_top1(ref, llama_logits(tmp_path / "f32.gguf", ids))
    # measured KL 6.2e-6, top-1 100%
    assert kl < 5e-5 and top1 >= 0.99, (kl, top1)

    fam = rtn_fam(model, source=str(llama_dir))
    (tmp_path / "fam").mkdir()
    save_family(fam, tmp_path / "fam", llama_dir)
    fam = load_family(tmp_path / "fam")  # the source architecture survives saving
    opt = G.GGUFOptions(embed_type="f32", head_type="f32")  # the reference's float head
    G.write_exit(fam, 2, tmp_path / "q.gguf", llama_dir, opt)
    G.write_multi(fam, tmp_path / "family.gguf", llama_dir, opt)
    G.extract_exit(tmp_path / "family.gguf", 2, tmp_path / "x.gguf")
    direct, kv = tensors_of(tmp_path / "q.gguf")
    copied, kv_x = tensors_of(tmp_path / "x.gguf")
    assert direct == copied and kv_x["general.architecture"] == kv["general.architecture"] == "llama"
    assert direct["blk.0.attn_q.weight"][0] == T.Q4_0
    with torch.no_grad():
        ref_q = fam.dequantized_model()(ids[None]).logits[0]
    kl, top1 = kl_top1(ref_q, llama_logits(tmp_path / "x.gguf", ids))
    # measured KL 0.0104, top-1 97.9% (this llama source's RTN grid is coarser than the tiny
    # qwen2's GPTQ one above, and llama.cpp rounds activations to 8 bits before Q4_0 products)
    assert kl < 0.02 and top1 >= 0.97, (kl, top1)


def test_llama_rope_rows_and_when_llama_is_chosen(llama_dir, tiny_dir):
    # rows of one head [a0 a1 b0 b1] (rotate-half pairs a_i, b_i) become [a0 b0 a1 b1]
    x = np.arange(8)[:, None] * np.ones((1, 3))
    got = G.llama_rope_rows(x, n_head=2)[:, 0]
    np.testing.assert_array_equal(got, [0, 2, 1, 3, 4, 6, 5, 7])
    fam = QuantizedFamily.from_model(load_model(llama_dir))
    assert G.exit_arch(fam) == "llama"
    fam.tensors["model.layers.1.self_attn.k_proj.bias"][3] = 0.5  # a bias llama cannot hold
    assert G.exit_arch(fam) == "qwen2"
    assert G.exit_arch(QuantizedFamily.from_model(load_model(tiny_dir))) == "qwen2"


@pytest.mark.parametrize("which", ["tiny_dir", "tiny_shared_dir"])
def test_imatrix_streamed_layer_by_layer_equals_the_whole_model_pass(which, request):
    """collect() reads one layer at a time; its matrices equal, bit for bit, hooks on the whole
    float model run window by window over every exit (what it did before it streamed)."""
    from torch import nn

    from ruyi_quant.exporters.gguf import imatrix as IM

    src = request.getfixturevalue(which)
    model = load_model(src)
    fam = QuantizedFamily.from_model(model)
    windows = torch.randint(0, model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(3))
    sums, counts = {}, {}

    def add(key, x):
        x = x.detach().float().reshape(-1, x.shape[-1])
        sums[key] = sums.get(key, 0) + (x * x).sum(0)
        counts[key] = counts.get(key, 0) + x.shape[0]

    cfg = model.config
    heads = {layout.head_prefix(cfg.shared_heads, j) for j in range(len(cfg.exits))}
    hooks = [
        m.register_forward_pre_hook(lambda _m, a, n=n: add(n, a[0]))
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n not in heads
    ]
    hooks += [
        norm.register_forward_hook(lambda _m, _a, out, j=j: add(IM.HEAD_KEY.format(j=j), out))
        for j, norm in enumerate(model.model.norms)
    ]
    with torch.no_grad():
        for w in windows:
            model.forward_exits(w[None])
    for h in hooks:
        h.remove()
    whole = {k: sums[k] / counts[k] for k in sums}
    streamed = IM.collect(fam, windows, progress=False)
    assert streamed.keys() == whole.keys()
    assert len(whole) == sum(
        isinstance(m, nn.Linear) for n, m in model.named_modules() if n not in heads
    ) + len(cfg.exits)  # every linear and head seen
    assert all(torch.equal(streamed[k], whole[k]) for k in whole)


def test_imatrix_names_follow_the_exit_file():
    """Trunk layers keep their block, the branch becomes block e, the head input is `output`'s
    matrix, or `token_embd`'s when the head is tied to the embedding (llama-imatrix's names)."""
    from ruyi_quant.exporters.gguf import imatrix as IM
    from ruyi_quant.model.config import parse_config
    from ruyi_quant.sources.tiny import tiny_config

    imat = {
        "model.layers.1.mlp.up_proj": torch.ones(4),
        "model.eelayers.0.mlp.up_proj": 2 * torch.ones(4),
        "model.layers.5.mlp.up_proj": 3 * torch.ones(4),
        "head@0": 4 * torch.ones(4),
        "head@2": 5 * torch.ones(4),
    }  # exits 2, 3, 5
    for tied in (False, True):
        cfg = parse_config({**tiny_config(shared_heads=True), "tie_word_embeddings": tied})
        got = {k: float(v[0]) for k, v in IM.for_exit(imat, cfg, 0).items()}
        head = "token_embd.weight" if tied else "output.weight"
        assert got == {"blk.1.ffn_up.weight": 1.0, "blk.2.ffn_up.weight": 2.0, head: 4.0}, got
        got = {k: float(v[0]) for k, v in IM.for_exit(imat, cfg, 2).items()}
        assert got == {"blk.1.ffn_up.weight": 1.0, "blk.5.ffn_up.weight": 3.0, head: 5.0}, got


@pytest.mark.slow
@needs_llama
@needs_smollm2
def test_smollm2_as_a_llama_file(tmp_path):
    """The real plain Llama source (SmolLM2-135M: 9 heads, 3 KV heads) as a stock `llama` F16
    file: llama.cpp's logits match our model's, and greedy chat answers the capital question."""
    from ruyi_quant.recipe import Eval
    from ruyi_quant.sources import resolve_model
    from ruyi_quant.text import eval_windows

    src = resolve_model("builtin:smollm2")
    model = load_model(src)
    fam = QuantizedFamily.from_model(model)
    fam.provenance = Provenance(model="builtin:smollm2")
    G.write_exit(fam, 29, tmp_path / "s.gguf", src, G.GGUFOptions(type="f16"))
    assert tensors_of(tmp_path / "s.gguf")[1]["general.architecture"] == "llama"
    ids = eval_windows(src, Eval(samples=1, seq_len=256))[0]
    with torch.no_grad():
        ref = model(ids[None]).logits[0]
    kl, top1 = kl_top1(ref, llama_logits(tmp_path / "s.gguf", ids))
    assert kl < 1e-3 and top1 >= 0.99, (kl, top1)
    llm = open_llama(tmp_path / "s.gguf", n_ctx=512, verbose=False, n_threads=2)
    reply = llm.create_chat_completion(
        [{"role": "user", "content": "What is the capital of France?"}], max_tokens=30, temperature=0
    )["choices"][0]["message"]["content"]
    llm.close()
    assert "Paris" in reply, reply


def test_multi_exit_config_is_the_models_not_the_checkpoints(tiny_dir, tmp_path):
    """Found while making loading lazy: a multi-exit GGUF exported from a saved family carried the
    family checkpoint's quantization_config in ruyi.config (the tensors' description, not the
    model's), so the same family gave different files from memory and from disk."""
    import gguf as gg

    from ruyi_quant.cli import main

    q = tmp_path / "q"
    assert main(["quantize", str(tiny_dir), "--bits", "8", "--group-size", "32", "--out", str(q)]) == 0
    assert main(["export", str(q), "--format", "gguf", "--multi-only", "--out", str(tmp_path / "g")]) == 0
    r = gg.GGUFReader(str(next((tmp_path / "g").glob("*.gguf"))))
    cfg = json.loads(r.fields["ruyi.config"].contents())
    src = json.loads((tiny_dir / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["early_exit_points"] == src["early_exit_points"] and cfg["hidden_size"] == src["hidden_size"]
