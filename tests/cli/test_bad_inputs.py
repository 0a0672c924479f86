"""The bad-input suite: every case runs the CLI in-process on a workspace holding a copy of
the tiny family (`model`), a 4-bit RTN quantization of it (`fam`) and a few text files, and asserts
exit code 2, exactly one line on stderr that starts `ruyi-quant: error:` and names the file, flag
or recipe key (the case's needles), no traceback, and a workspace that is byte for byte what it
was before (nothing new, nothing changed, nothing removed).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import error_lines
from safetensors.torch import load_file, save_file

from ruyi_quant.cli import main


# --- the workspace -------------------------------------------------------------------------
@pytest.fixture(scope="session")
def quantized_tiny(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bad-inputs") / "fam"
    assert main(["quantize", str(tiny_dir), "--out", str(out), "--bits", "4", "--group-size", "32"]) == 0
    return out


@pytest.fixture(scope="session")
def gguf_multi(quantized_tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("bad-inputs-gguf") / "g"
    assert main(["export", str(quantized_tiny), "--format", "gguf", "--multi-only", "--out", str(out)]) == 0
    return next(out.glob("*.gguf"))


@pytest.fixture
def ws(tmp_path, tiny_dir, quantized_tiny, gguf_multi):
    shutil.copytree(tiny_dir, tmp_path / "model")
    shutil.copytree(quantized_tiny, tmp_path / "fam")
    shutil.copy(gguf_multi, tmp_path / "family.gguf")
    (tmp_path / "good.txt").write_text("Plain text for calibration. " * 400)
    (tmp_path / "afile").write_text("a file, not a directory")
    main(["inspect", "builtin:tiny"])  # the builtin cache exists before the snapshot
    return tmp_path


def snapshot(root: Path) -> dict:
    return {
        p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
        for p in sorted(root.rglob("*"))
    }


# --- ways to break a file ------------------------------------------------------------------
def st_truncate(p):
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def st_empty(p):
    p.write_bytes(b"")


def st_bad_header(p):
    data = p.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    p.write_bytes(data[:8] + b"{" + b"x" * (n - 1) + data[8 + n :])


def st_huge_header(p):
    data = p.read_bytes()
    p.write_bytes(struct.pack("<Q", 1 << 62) + data[8:])


def edit_json(p, fn):
    d = json.loads(p.read_text())
    fn(d)
    p.write_text(json.dumps(d))


def edit_state(p, fn):
    s = load_file(p)
    fn(s)
    save_file(s, p)


def flip_packed_bit(p):
    """One bit of a packed weight (a qweight's last byte) flipped: the file still reads, and its
    codes still form a grid."""
    import safetensors

    with safetensors.safe_open(p, "pt") as f:
        name = next(n for n in f.keys() if n.endswith(".qweight"))
    data = bytearray(p.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    end = 8 + n + header[name]["data_offsets"][1]
    data[end - 1] ^= 0x01
    p.write_bytes(bytes(data))


def change_whitespace(p):
    """One byte of a JSON file's whitespace changed (a space of indentation to a tab): the same
    JSON, other bytes."""
    data = p.read_bytes()
    i = data.index(b"\n ") + 1
    p.write_bytes(data[:i] + b"\t" + data[i + 1 :])


def set_key(**kw):
    return lambda d: d.update(kw)


def int32_weight(s):
    s["model.layers.1.mlp.up_proj.weight"] = torch.zeros(320, 128, dtype=torch.int32)


def pop(name):
    return lambda s: s.pop(name)


def put(name, t):
    return lambda s: s.__setitem__(name, t)


def set_module_bits(d):
    m = next(iter(d["quantization"]["modules"]))
    d["quantization"]["modules"][m]["bits"] = 8


def set_module_spec(**kw):
    def apply(d):
        m = next(iter(d["quantization"]["modules"]))
        assert m == "model.layers.0.self_attn.q_proj", m
        d["quantization"]["modules"][m].update(kw)

    return apply


def fill_tensor(name, value):
    """Overwrite one float tensor's bytes in place with `value` (same file size, other bytes)."""

    def apply(p):
        data = bytearray(p.read_bytes())
        n = struct.unpack("<Q", data[:8])[0]
        info = json.loads(data[8 : 8 + n])[name]
        dtype = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}[info["dtype"]]
        start, end = (8 + n + o for o in info["data_offsets"])
        count = (end - start) // dtype.itemsize
        data[start:end] = torch.full((count,), value, dtype=dtype).view(torch.uint8).numpy().tobytes()
        p.write_bytes(bytes(data))

    return apply


def drop_modules(d):
    d["quantization"]["modules"] = {"model.layers.0.mlp.up_proj": [4, 32]}


def unknown_module(d):
    spec = next(iter(d["quantization"]["modules"].values()))
    d["quantization"]["modules"]["model.layers.0.mlp.gate_up"] = spec


def shard(d):
    """The model as two shards and an index; returns nothing (used by setups below)."""
    s = load_file(d / "model.safetensors")
    names = sorted(s)
    half = len(names) // 2
    save_file({k: s[k] for k in names[:half]}, d / "model-00001-of-00002.safetensors")
    save_file({k: s[k] for k in names[half:]}, d / "model-00002-of-00002.safetensors")
    wmap = {
        k: "model-00001-of-00002.safetensors" if i < half else "model-00002-of-00002.safetensors"
        for i, k in enumerate(names)
    }
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))


def shard_missing(d):
    shard(d)
    (d / "model-00002-of-00002.safetensors").unlink()


def index_wrong_shard(d):
    shard(d)
    p = d / "model.safetensors.index.json"
    index = json.loads(p.read_text())
    first = min(index["weight_map"])  # in shard 1; the index says shard 2
    index["weight_map"][first] = "model-00002-of-00002.safetensors"
    p.write_text(json.dumps(index))


def shard_bad_index(d):
    shard(d)
    (d / "model.safetensors.index.json").write_text('{"weight_map": ')


# --- cases ---------------------------------------------------------------------------------
@dataclass
class Case:
    argv: list[str]
    needles: list[str]
    setup: object = None  # fn(workspace)
    env: dict = field(default_factory=dict)
    recipe: str | None = None  # written to {ws}/recipe.yaml before the snapshot


CASES: dict[str, Case] = {}


def case(name, argv, needles, setup=None, env=None, recipe=None):
    assert name not in CASES, name
    CASES[name] = Case(argv.split() if isinstance(argv, str) else argv, needles, setup, env or {}, recipe)


def on(rel, fn):
    """A setup that applies fn to the file {ws}/rel."""
    return lambda ws: fn(ws / rel)


# broken source checkpoints, met by every command that reads one
MODEL_BREAKS = {
    "truncated safetensors": (
        on("model/model.safetensors", st_truncate),
        ["model.safetensors", "not a readable safetensors"],
    ),
    "empty safetensors": (on("model/model.safetensors", st_empty), ["model.safetensors", "header too small"]),
    "bad safetensors header": (
        on("model/model.safetensors", st_bad_header),
        ["model.safetensors", "invalid JSON in header"],
    ),
    "huge safetensors header": (
        on("model/model.safetensors", st_huge_header),
        ["model.safetensors", "header too large"],
    ),
    "int32 weight": (
        on("model/model.safetensors", lambda p: edit_state(p, int32_weight)),
        ["model.layers.1.mlp.up_proj.weight", "int32"],
    ),
    "float8 weight": (
        on(
            "model/model.safetensors",
            lambda p: edit_state(
                p, put("model.layers.1.mlp.up_proj.weight", torch.zeros(320, 128, dtype=torch.float8_e4m3fn))
            ),
        ),
        ["model.layers.1.mlp.up_proj.weight", "F8_E4M3"],
    ),
    "absurd hidden_size": (
        on("model/config.json", lambda p: edit_json(p, set_key(hidden_size=10**12))),
        ["config.json", "'hidden_size'", "implausibly large"],
    ),
    "config not UTF-8": (
        on("model/config.json", lambda p: p.write_bytes(b'{"model_type": "\xff\xfe"}')),
        ["config.json", "not UTF-8"],
    ),
    "config not JSON": (
        on("model/config.json", lambda p: p.write_text("{model_type: ruyi")),
        ["config.json", "not valid JSON"],
    ),
    "config a list": (
        on("model/config.json", lambda p: p.write_text("[1, 2]")),
        ["config.json", "JSON object"],
    ),
    "config binary": (
        on("model/config.json", lambda p: p.write_bytes(b"\x00\x01\x02" * 10)),
        ["config.json", "binary data"],
    ),
    "missing shard": (on("model", shard_missing), ["model-00002-of-00002.safetensors", "missing"]),
    "index points at the wrong shard": (
        on("model", index_wrong_shard),
        ["model-00002-of-00002.safetensors", "the index lists"],
    ),
    "bad index": (on("model", shard_bad_index), ["model.safetensors.index.json", "not valid JSON"]),
    "index not a map": (
        on(
            "model",
            lambda d: (shard(d), (d / "model.safetensors.index.json").write_text('{"weight_map": 3}')),
        ),
        ["model.safetensors.index.json", "weight_map"],
    ),
    "exit norm NaN": (
        on(
            "model/model.safetensors",
            lambda p: edit_state(p, put("model.norms.0.weight", torch.full((128,), float("nan")))),
        ),
        ["model/model.safetensors", "model.norms.0.weight", "NaN"],
    ),
}
MODEL_COMMANDS = {
    "inspect": "inspect {ws}/model",
    "quantize": "quantize {ws}/model --out {ws}/out --bits 8",
    "export": "export {ws}/model --out {ws}/out",
    "eval": "eval {ws}/model {ws}/fam --samples 1 --seq-len 32",
}
for bname, (setup, needles) in MODEL_BREAKS.items():
    for cname, argv in MODEL_COMMANDS.items():
        if cname == "inspect" and "NaN" in bname:
            continue  # inspect reads headers only (lazy loading): values are not read
        case(f"{cname}: {bname}", argv, needles, setup)

# broken tokenizers: every command that reads one
TOKENIZER_BREAKS = {
    "tokenizer not JSON": (
        on("model/tokenizer.json", lambda p: p.write_text('{"version": ')),
        ["tokenizer.json", "not valid JSON"],
    ),
    "tokenizer not UTF-8": (
        on("model/tokenizer.json", lambda p: p.write_bytes(b'{"a": "\xc3\x28"}')),
        ["tokenizer.json", "not UTF-8"],
    ),
    "tokenizer not a tokenizer": (
        on("model/tokenizer.json", lambda p: p.write_text('{"model": 3}')),
        ["tokenizer.json", "cannot load it"],
    ),
}
TOKENIZER_COMMANDS = {
    "quantize gptq": "quantize {ws}/model --out {ws}/out --method gptq --samples 2 --seq-len 32 --group-size 32",
    "eval": "eval {ws}/model {ws}/fam --samples 1 --seq-len 32",
    "export gguf": "export {ws}/model --format gguf --out {ws}/out",
}
for bname, (setup, needles) in TOKENIZER_BREAKS.items():
    for cname, argv in TOKENIZER_COMMANDS.items():
        case(f"{cname}: {bname}", argv, needles, setup)

# broken quantized families: every command that reads one
FAMILY_BREAKS = {
    "family lacks a float tensor": (
        on("fam/model.safetensors", lambda p: edit_state(p, pop("model.norms.1.weight"))),
        ["missing tensor model.norms.1.weight"],
    ),
    "family lacks a packed tensor": (
        on("fam/model.safetensors", lambda p: edit_state(p, pop("model.layers.0.mlp.up_proj.scales"))),
        ["missing tensor model.layers.0.mlp.up_proj.scales"],
    ),
    "family has an extra tensor": (
        on("fam/model.safetensors", lambda p: edit_state(p, put("stray.weight", torch.zeros(2)))),
        ["unexpected tensor stray.weight"],
    ),
    "packed tensor of the wrong shape": (
        on(
            "fam/model.safetensors",
            lambda p: edit_state(
                p, put("model.layers.0.mlp.up_proj.qweight", torch.zeros(8, 320, dtype=torch.int32))
            ),
        ),
        ["model.layers.0.mlp.up_proj", "disagree with ruyi_quant.json"],
    ),
    "bits disagree with the packed tensors": (
        on("fam/ruyi_quant.json", lambda p: edit_json(p, set_module_bits)),
        ["disagree with ruyi_quant.json"],
    ),
    "manifest not JSON": (
        on("fam/ruyi_quant.json", lambda p: p.write_text("{")),
        ["ruyi_quant.json", "not valid JSON"],
    ),
    "manifest not UTF-8": (
        on("fam/ruyi_quant.json", lambda p: p.write_bytes(b'{"kind": "\xff"}')),
        ["ruyi_quant.json", "not UTF-8"],
    ),
    "manifest a list": (
        on("fam/ruyi_quant.json", lambda p: p.write_text("[]")),
        ["ruyi_quant.json", "not a ruyi-quant manifest"],
    ),
    "manifest bad layout": (
        on("fam/ruyi_quant.json", lambda p: edit_json(p, lambda d: d["quantization"].update(layout="exl2"))),
        ["ruyi_quant.json", "'quantization' is malformed"],
    ),
    "manifest spec malformed": (
        on("fam/ruyi_quant.json", lambda p: edit_json(p, drop_modules)),
        ["ruyi_quant.json", "malformed"],
    ),
    "manifest names a module the model lacks": (
        on("fam/ruyi_quant.json", lambda p: edit_json(p, unknown_module)),
        ["ruyi_quant.json", "model.layers.0.mlp.gate_up"],
    ),
    "family safetensors truncated": (
        on("fam/model.safetensors", st_truncate),
        ["fam/model.safetensors", "not a readable"],
    ),
    "manifest bits out of range": (
        on("fam/ruyi_quant.json", lambda p: edit_json(p, set_module_spec(bits=5))),
        ["ruyi_quant.json", "the grid of model.layers.0.self_attn.q_proj", "bits must be one of"],
    ),
    "manifest group size out of range": (
        on("fam/ruyi_quant.json", lambda p: edit_json(p, set_module_spec(group_size=48))),
        ["ruyi_quant.json", "the grid of model.layers.0.self_attn.q_proj", "group_size"],
    ),
    "Inf in a family norm": (
        on("fam/model.safetensors", fill_tensor("model.norms.1.weight", float("inf"))),
        ["fam/model.safetensors", "model.norms.1.weight", "Inf"],
    ),
    "one bit flipped in a packed weight": (
        on("fam/model.safetensors", flip_packed_bit),
        ["fam/model.safetensors", "sha256", "ruyi_quant.json", "damaged"],
    ),
    "one byte changed in the tokenizer": (
        on("fam/tokenizer.json", change_whitespace),
        ["fam/tokenizer.json", "sha256", "damaged"],
    ),
    "a listed file grown": (
        on("fam/tokenizer_config.json", lambda p: p.write_bytes(p.read_bytes() + b" ")),
        ["fam/tokenizer_config.json", "bytes, ruyi_quant.json lists", "damaged"],
    ),
    "a listed file missing": (
        on("fam/tokenizer_config.json", lambda p: p.unlink()),
        ["fam/tokenizer_config.json", "listed in ruyi_quant.json but missing"],
    ),
}
FAMILY_COMMANDS = {
    "inspect": "inspect {ws}/fam",
    "export hf": "export {ws}/fam --out {ws}/out",
    "export gguf": "export {ws}/fam --format gguf --out {ws}/out",
    "eval": "eval {ws}/model {ws}/fam --samples 1 --seq-len 32",
}
for bname, (setup, needles) in FAMILY_BREAKS.items():
    for cname, argv in FAMILY_COMMANDS.items():
        if cname == "inspect" and ("sha256" in needles or "NaN" in needles or "Inf" in needles):
            continue  # inspect reads headers and sizes only: no value is read or hashed
        case(f"{cname}: {bname}", argv, needles, setup)

# NaN scales: named as such where the grid is unpacked; an export that copies the packed tensors
# as stored (hf, gptq layout) is stopped by the sha256 of the file
for cname, argv in {
    "export gguf": FAMILY_COMMANDS["export gguf"],
    "eval": FAMILY_COMMANDS["eval"],
    "export hf": FAMILY_COMMANDS["export hf"],
}.items():
    case(
        f"{cname}: NaN scale",
        argv,
        ["fam/model.safetensors"]
        + (["sha256", "damaged"] if cname == "export hf" else ["model.layers.0.mlp.up_proj.scales", "NaN"]),
        on("fam/model.safetensors", fill_tensor("model.layers.0.mlp.up_proj.scales", float("nan"))),
    )

# a damaged family met by the other commands that read one whole
for cname, argv in {
    "export onnx": "export {ws}/fam --format onnx --out {ws}/out",
    "generate": "generate hi --family {ws}/fam --max-new-tokens 2 --device cpu --compile off",
    "run": "run {ws}/recipe.yaml",
}.items():
    case(
        f"{cname}: one bit flipped in a packed weight",
        argv,
        ["fam/model.safetensors", "sha256", "damaged"],
        on("fam/model.safetensors", flip_packed_bit),
        recipe="jobs:\n  - name: a\n    model: {ws}/fam\n    output: out/a\n    quantize: {method: none}\n"
        "    export: [{format: gguf}]\n"
        if cname == "run"
        else None,
    )


# outputs that cannot or must not be written, for every command that writes one
def long_path(ws):
    return str(ws / "/".join(["d" * 200] * 21))


OUTPUT_COMMANDS = {
    "quantize": "quantize {ws}/model --bits 8 --out {out}",
    "export hf": "export {ws}/fam --out {out}",
    "export gguf": "export {ws}/fam --format gguf --out {out}",
    "extract gguf": "export gguf --from {ws}/family.gguf --out {out}",
    "eval": "eval {ws}/model {ws}/fam --samples 1 --seq-len 32 --out {out}",
    "make-familial": "make-familial {ws}/model --exits 2 --out {out}",
}
OUTPUT_BREAKS = {
    "parent is a file": ("{ws}/afile/out", None, ["afile is a file"]),
    "name too long": ("{ws}/" + "n" * 250, None, ["too long for its temporary sibling"]),
    "component too long": ("{ws}/" + "n" * 256 + "/out", None, ["longer than 255 bytes"]),
    "path too long": ("{long}", None, ["the path is too long"]),
    "unwritable location": ("/sys/ruyi-quant-out", None, ["cannot write in /sys"]),
    "not ours": (
        "{ws}/mine",
        lambda ws: ((ws / "mine").mkdir(), (ws / "mine" / "notes.txt").write_text("x")),
        ["mine", "not written by ruyi-quant"],
    ),
    "empty marker": (
        "{ws}/mine",
        lambda ws: (
            (ws / "mine").mkdir(),
            (ws / "mine" / "ruyi_quant.json").write_text("{}"),
            (ws / "mine" / "notes.txt").write_text("x"),
        ),
        ["not written by ruyi-quant"],
    ),
    "ours plus a user's file": (
        "{ws}/fam2",
        lambda ws: (shutil.copytree(ws / "fam", ws / "fam2"), (ws / "fam2" / "notes.txt").write_text("x")),
        ["holds notes.txt", "did not write"],
    ),
    "exists without --force": (
        "{ws}/fam2",
        lambda ws: shutil.copytree(ws / "fam", ws / "fam2"),
        ["pass --force"],
    ),
    "inside the model": ("{ws}/model/out", None, ["lies inside the input"]),
}
OUTPUT_KINDS = {
    "quantize": "family",
    "export hf": "export",
    "export gguf": "export",
    "extract gguf": "export",
    "eval": "eval",
    "make-familial": "source",
}


def output_of_kind(kind):
    """{ws}/fam2: an output of ours of this kind (a copy of the family, its manifest's kind set)."""

    def setup(ws):
        shutil.copytree(ws / "fam", ws / "fam2")
        edit_json(ws / "fam2" / "ruyi_quant.json", set_key(kind=kind))

    return setup


for bname, (out, setup, needles) in OUTPUT_BREAKS.items():
    for cname, argv in OUTPUT_COMMANDS.items():
        if bname == "exists without --force":  # what --force would replace: its own kind
            setup = output_of_kind(OUTPUT_KINDS[cname])
        if bname == "inside the model" and cname.startswith(("export", "extract")):
            if cname == "extract gguf":
                continue
            case(f"{cname} output: inside the family", argv.replace("{out}", "{ws}/fam/out"), needles)
            continue
        case(f"{cname} output: {bname}", argv.replace("{out}", out), needles, setup)


# --force replaces an output of the same kind only: never a job or a family with evaluation files
def job_output(ws):
    (ws / "r.yaml").write_text(
        f"jobs:\n  - name: j\n    model: {ws}/model\n    output: job\n"
        "    quantize: {bits: 8, group_size: 32}\n"
    )
    assert main(["run", str(ws / "r.yaml")]) == 0


for cname, argv in {
    "eval": "eval {ws}/model {ws}/fam --samples 1 --seq-len 32 --force --out",
    "export hf": "export {ws}/fam --force --out",
    "quantize": "quantize {ws}/model --bits 8 --force --out",
    "eval --runtime": "eval {ws}/model {ws}/fam --runtime int4 --samples 1 --seq-len 32 --force --out",
}.items():
    case(
        f"{cname} --force over a job",
        f"{argv} {{ws}}/job",
        ["{ws}/job", "holds a ruyi-quant job", "not even with --force"],
        job_output,
    )
case(
    "eval --force over a family",
    "eval {ws}/model {ws}/fam --samples 1 --seq-len 32 --force --out {ws}/fam2",
    ["{ws}/fam2", "holds a ruyi-quant family", "not even with --force"],
    lambda ws: shutil.copytree(ws / "fam", ws / "fam2"),
)
case(
    "export gguf --force over a family",
    "export {ws}/fam --format gguf --force --out {ws}/fam2",
    ["holds a ruyi-quant family", "an export never replaces"],
    lambda ws: shutil.copytree(ws / "fam", ws / "fam2"),
)
case(
    "eval without --force over a job: no hint to force it",
    "eval {ws}/model {ws}/fam --samples 1 --seq-len 32 --out {ws}/job",
    ["holds a ruyi-quant job", "choose another output path"],
    job_output,
)
case(
    "quantize output: is the input",
    "quantize {ws}/model --out {ws}/model --force",
    ["is, holds or lies inside the input"],
)
case(
    "quantize output: holds the input",
    "quantize {ws}/model --out {ws} --force",
    ["is, holds or lies inside the input"],
)
case("export output: is its input", "export {ws}/fam --out {ws}/fam --force", ["input"])
case("extract output: holds its input", "export gguf --from {ws}/family.gguf --out {ws} --force", ["input"])
case("inspect --json: a directory", "inspect {ws}/model --json {ws}/fam", ["--json", "is a directory"])
case(
    "inspect --json: parent is a file",
    "inspect {ws}/model --json {ws}/afile/i.json",
    ["--json", "afile is a file"],
)
case(
    "inspect --json: unwritable", "inspect {ws}/model --json /sys/i.json", ["--json", "cannot write in /sys"]
)
case(
    "cache is a file",
    "inspect builtin:tiny-shared",
    ["RUYI_QUANT_CACHE", "afile is a file"],
    env={"RUYI_QUANT_CACHE": "{ws}/afile/cache"},
)


def corrupt_cache(ws):
    """A copy of the built-in cache whose tiny model's weights are truncated."""
    import os

    shutil.copytree(os.environ["RUYI_QUANT_CACHE"], ws / "cache")
    st_truncate(next((ws / "cache" / "models").glob("tiny-v*")) / "model.safetensors")


for cname, argv in {
    "inspect": "inspect builtin:tiny",
    "quantize": "quantize builtin:tiny --out {ws}/out",
    "eval": "eval builtin:tiny {ws}/fam --samples 1 --seq-len 32",
}.items():
    case(
        f"{cname}: corrupt built-in cache",
        argv,
        ["cache/models/tiny-v", "not a readable safetensors"],
        corrupt_cache,
        env={"RUYI_QUANT_CACHE": "{ws}/cache"},
    )
case(
    "cache unwritable",
    "inspect builtin:tiny-shared",
    ["RUYI_QUANT_CACHE", "cannot write in /sys"],
    env={"RUYI_QUANT_CACHE": "/sys/ruyi-cache"},
)


# quantize settings
def text_files(ws):
    (ws / "latin1.txt").write_bytes("café crème ".encode("latin-1") * 200)
    (ws / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    (ws / "notext.jsonl").write_text('{"body": "no text field"}\n')
    (ws / "empty.txt").write_text("  \n\n ")
    (ws / "short.txt").write_text("a few words")


Q = "quantize {ws}/model --out {ws}/out "
for name, extra, needles in [
    ("bits 5", "--bits 5", ["--bits"]),
    ("gguf with rtn", "--method rtn --gguf q4_k_m", ["--gguf q4_k_m", "need method gptq or awq, not rtn"]),
    ("gguf type", "--method gptq --gguf q3_k_s", ["--gguf q3_k_s"]),
    (
        "gguf with an override",
        "--method gptq --gguf q4_k_m --override lm_head*:bits=8",
        ["--gguf q4_k_m", "drop the overrides"],
    ),
    ("group 100", "--group-size 100", ["--group-size"]),
    ("group larger than K", "--group-size 256", ["group_size 256"]),
    ("method", "--method magic", ["--method"]),
    ("samples 0", "--method gptq --samples 0", ["--samples"]),
    ("seq-len 4", "--method gptq --seq-len 4", ["--seq-len"]),
    (
        "seq-len past the model",
        "--method gptq --seq-len 4096",
        ["--seq-len 4096", "max_position_embeddings (2048)"],
    ),
    ("seed negative", "--seed -1", ["--seed"]),
    ("seed huge", f"--seed {2**70}", ["--seed"]),
    ("damp 0", "--method gptq --damp 0", ["--damp"]),
    ("damp nan", "--method gptq --damp nan", ["--damp"]),
    ("damp 2", "--method gptq --damp 2", ["--damp"]),
    ("device cuda", "--device cuda", ["--device cuda", "CUDA is not available"]),
    ("device cuda:7", "--device cuda:7", ["--device cuda:7"]),
    ("device banana", "--device banana", ["--device", "'banana' is not a device"]),
    ("device cuda on rtn", "--method rtn --device cuda", ["--device cuda"]),
    ("override unknown setting", "--override lm_head*:bitz=8", ["--override", "bitz"]),
    ("override bad number", "--override lm_head*:bits=x", ["--override", "'x' is not a number"]),
    ("override matches nothing", "--override model.layer.*:bits=8", ["model.layer.*", "matches no module"]),
    ("override bad bits", "--override lm_head*:bits=7", ["--override", "bits must be one of"]),
    ("skip matches nothing", "--skip nothing.here", ["nothing.here", "matches no module"]),
    ("calib missing", "--method gptq --calib {ws}/none.txt", ["none.txt", "no such text file"]),
    (
        "calib binary",
        "--method gptq --calib {ws}/model/model.safetensors",
        ["model.safetensors", "binary data"],
    ),
    ("calib not UTF-8", "--method awq --calib {ws}/latin1.txt", ["latin1.txt", "not UTF-8"]),
    ("calib JSONL not JSON", "--method gptq --calib {ws}/bad.jsonl", ["bad.jsonl:2", "not valid JSON"]),
    ("calib JSONL no text", "--method gptq --calib {ws}/notext.jsonl", ["notext.jsonl:1", "'text'"]),
    ("calib empty", "--method gptq --calib {ws}/empty.txt", ["empty.txt", "no text"]),
    (
        "calib too short",
        "--method gptq --calib {ws}/short.txt --seq-len 64",
        ["short.txt", "fewer than seq_len 64"],
    ),
    ("unknown builtin", None, ["builtin:huge", "unknown built-in model"]),
    ("model missing", None, ["nowhere", "no such model directory"]),
]:
    argv = (
        Q + extra
        if extra
        else (
            "quantize builtin:huge --out {ws}/out"
            if "builtin" in name
            else "quantize {ws}/nowhere --out {ws}/out"
        )
    )
    case(f"quantize: {name}", argv, needles, text_files)


# eval settings
E = "eval {ws}/model {ws}/fam "
for name, extra, needles in [
    ("samples 0", "--samples 0", ["--samples"]),
    ("seq-len 4", "--seq-len 4", ["--seq-len"]),
    ("seq-len past the model", "--seq-len 100000", ["--seq-len 100000", "max_position_embeddings"]),
    ("batch 0", "--batch 0", ["--batch"]),
    ("exit the model lacks", "--exits 4", ["exit 4", "[2, 3, 5]"]),
    ("exits not numbers", "--exits a,b", ["--exits a,b"]),
    ("data missing", "--data {ws}/none.txt", ["none.txt", "no such text file"]),
    ("data binary", "--data {ws}/family.gguf", ["family.gguf", "binary data"]),
    ("data not UTF-8", "--data {ws}/latin1.txt", ["latin1.txt", "not UTF-8"]),
    ("unknown corpus", "--data builtin:wiki/eval", ["builtin:wiki/eval", "unknown corpus"]),
]:
    case(f"eval: {name}", E + extra, needles, text_files)
case(
    "eval: a reference that is not the source",
    "eval {ws}/other {ws}/fam --samples 1 --seq-len 32",
    ["is not a quantization of", "token embeddings differ"],
    lambda ws: (
        shutil.copytree(ws / "model", ws / "other")
        and edit_state(
            ws / "other" / "model.safetensors",
            lambda s: s.__setitem__("model.embed_tokens.weight", torch.randn(512, 128)),
        )
    ),
)
case(
    "eval: a family of another shape",
    "eval builtin:tiny-shared {ws}/fam --samples 1 --seq-len 32",
    ["is not a quantization of", "its shared_heads is False, the reference's True"],
)
case("eval: reference missing", "eval {ws}/nowhere {ws}/fam", ["nowhere", "no such model directory"])
case("eval: quantized missing", "eval {ws}/model {ws}/nowhere --samples 1 --seq-len 32", ["nowhere"])

# export settings
X = "export {ws}/fam --out {ws}/out "
for name, extra, needles in [
    ("format", "--format onnx2", ["--format onnx2"]),
    ("weights", "--weights int3", ["--weights"]),
    ("dtype", "--dtype float8", ["--dtype"]),
    ("gguf type", "--format gguf --type q9_9", ["--type"]),
    ("gguf embed type", "--format gguf --embed-type q4_k_m", ["--embed-type"]),
    ("gguf head type", "--format gguf --head-type nope", ["--head-type"]),
    ("exit the model lacks", "--exits 4", ["exit 4"]),
    ("gguf exit the model lacks", "--format gguf --exits 9", ["exit 9"]),
    ("exits not numbers", "--exits two", ["--exits two"]),
    ("K-quant of a quantized family", "--format gguf --type q4_k_m", ["q4_k_m"]),
]:
    case(f"export: {name}", X + extra, needles)
case(
    "export: from a missing gguf",
    "export gguf --from {ws}/none.gguf --out {ws}/out",
    ["none.gguf", "no such file"],
)
case(
    "export: from a corrupt gguf",
    "export gguf --from {ws}/bad.gguf --out {ws}/out",
    ["bad.gguf"],
    lambda ws: (ws / "bad.gguf").write_bytes(b"GGUF" + b"\x00" * 20),
)
case(
    "export: from a non-gguf",
    "export gguf --from {ws}/model/model.safetensors.gguf --out {ws}/out",
    ["model.safetensors.gguf"],
    lambda ws: shutil.copy(ws / "model" / "model.safetensors", ws / "model" / "model.safetensors.gguf"),
)
case(
    "export: extract an exit the file lacks",
    "export gguf --from {ws}/family.gguf --exit 4 --out {ws}/out",
    ["4"],
)
case("export: no family", "export --out {ws}/out", ["name the family"])

# make-familial settings (validated before the model is read)
M = "make-familial {ws}/model --exits 2 --out {ws}/out "
for name, extra, needles in [
    ("steps -1", "--steps -1", ["--steps"]),
    ("steps 1", "--steps 1", ["--steps"]),
    ("steps 2", "--steps 2", ["--steps"]),
    ("windows 0", "--windows 0", ["--windows"]),
    ("positions 0", "--positions 0", ["--positions"]),
    ("seq-len 0", "--seq-len 0", ["--seq-len"]),
    ("lr nan", "--lr nan", ["--lr"]),
    ("lr -1", "--lr -1", ["--lr"]),
    ("lr inf", "--lr inf", ["--lr"]),
    ("distill -5", "--distill -5", ["--distill -5.0:"]),
    ("distill 2", "--distill 2", ["--distill 2.0:"]),
    ("seed huge", f"--seed {2**64}", ["--seed"]),
    ("train missing", "--train {ws}/none.txt", ["none.txt"]),
    ("already a family", "", ["already a family"]),
]:
    case(f"make-familial: {name}", M + extra, needles)
case(
    "make-familial: exits outside",
    "make-familial {ws}/plain --exits 1,99 --out {ws}/out",
    ["--exits", "99"],
    lambda ws: make_plain(ws),
)
case(
    "make-familial: exits not numbers",
    "make-familial {ws}/plain --exits x --out {ws}/out",
    ["--exits x"],
    lambda ws: make_plain(ws),
)
case(
    "make-familial: seq-len past the model",
    "make-familial {ws}/plain --exits 2 --seq-len 4096 --out {ws}/out",
    ["--seq-len 4096", "max_position_embeddings"],
    lambda ws: make_plain(ws),
)


def make_plain(ws):
    """A plain qwen2 model: the tiny family's last exit."""
    d = ws / "plain"
    d.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ws / "model" / f, d / f)
    cfg = json.loads((ws / "model" / "config.json").read_text())
    cfg = {
        k: v
        for k, v in cfg.items()
        if k not in ("early_exit_points", "default_early_exit_point", "shared_heads")
    }
    cfg["model_type"] = "qwen2"
    (d / "config.json").write_text(json.dumps(cfg))
    s = load_file(ws / "model" / "model.safetensors")
    plain = {k: v for k, v in s.items() if k.startswith("model.layers.") or k == "model.embed_tokens.weight"}
    plain["model.norm.weight"] = s["model.norms.2.weight"]
    plain["lm_head.weight"] = s["lm_head.2.weight"]
    save_file(plain, d / "model.safetensors")


# recipes: every section's keys, and the outputs of all jobs checked before any job runs
JOB = "  - name: a\n    model: {ws}/model\n    output: out/a\n"
for name, body, needles in [
    ("not UTF-8", None, ["recipe.yaml", "not UTF-8"]),
    ("calibration.samples", JOB + "    calibration: {samples: 0}\n", ["jobs[0].calibration.samples"]),
    ("calibration.seed", JOB + "    calibration: {seed: -3}\n", ["jobs[0].calibration.seed"]),
    (
        "calibration.seq_len past the model",
        JOB + "    quantize: {method: gptq}\n    calibration: {seq_len: 9999}\n",
        ["jobs[0].calibration.seq_len 9999", "max_position_embeddings"],
    ),
    (
        "calibration.source",
        JOB + "    quantize: {method: awq}\n    calibration: {source: nowhere.txt}\n",
        ["nowhere.txt"],
    ),
    (
        "calibration.field",
        JOB + "    quantize: {method: gptq}\n    calibration: {source: notext.jsonl}\n",
        ["notext.jsonl:1"],
    ),
    (
        "quantize.device banana",
        JOB + "    quantize: {device: banana}\n",
        ["jobs[0].quantize.device", "banana"],
    ),
    ("quantize.device cuda", JOB + "    quantize: {device: 'cuda:3'}\n", ["jobs[0].quantize.device cuda:3"]),
    (
        "quantize.gptq.damp_percent",
        JOB + "    quantize: {gptq: {damp_percent: 2}}\n",
        ["jobs[0].quantize.gptq.damp_percent"],
    ),
    ("quantize.awq.grid", JOB + "    quantize: {awq: {grid: 1}}\n", ["jobs[0].quantize.awq.grid"]),
    ("quantize.group_size", JOB + "    quantize: {group_size: 48}\n", ["jobs[0].quantize.group_size"]),
    (
        "quantize.overrides",
        JOB + "    quantize: {overrides: [{pattern: 'x*', bitz: 8}]}\n",
        ["unknown key 'bitz'"],
    ),
    ("export.format", JOB + "    export: [{format: onnx2}]\n", ["jobs[0].export[0]"]),
    ("export.exits", JOB + "    export: [{format: hf, exits: [4]}]\n", ["jobs[0].export[0].exits", "exit 4"]),
    ("export.type", JOB + "    export: [{format: gguf, type: q9}]\n", ["jobs[0].export[0].gguf.type"]),
    ("eval.seq_len past the model", JOB + "    eval: {seq_len: 100000}\n", ["jobs[0].eval.seq_len 100000"]),
    ("eval.exits", JOB + "    eval: {exits: [9]}\n", ["jobs[0].eval.exits", "exit 9"]),
    ("eval.batch", JOB + "    eval: {batch: 0}\n", ["jobs[0].eval.batch"]),
    (
        "eval.source binary",
        JOB + "    eval: {source: model/model.safetensors}\n",
        ["model.safetensors", "binary data"],
    ),
    ("output unwritable", JOB.replace("out/a", "/sys/ruyi"), ["jobs[0].output", "cannot write"]),
    ("output is the model", JOB.replace("out/a", "model"), ["jobs[0].output", "input"]),
    ("output not ours", JOB.replace("out/a", "afile"), ["jobs[0].output", "not a directory"]),
    (
        "two jobs one output",
        JOB + JOB.replace("name: a", "name: b"),
        ["jobs[1].output 'out/a' is also jobs[0].output"],
    ),
    (
        "nested outputs",
        JOB + JOB.replace("name: a", "name: b").replace("out/a", "out/a/b"),
        ["jobs[1].output 'out/a/b' overlaps jobs[0].output"],
    ),
    (
        "second job bad, first not run",
        JOB + JOB.replace("name: a", "name: b").replace("out/a", "/sys/b"),
        ["jobs[1].output", "cannot write"],
    ),
    (
        "second job device",
        JOB + JOB.replace("name: a", "name: b").replace("out/a", "out/b") + "    quantize: {device: cuda}\n",
        ["jobs[1].quantize.device cuda"],
    ),
    ("model missing", JOB.replace("{ws}/model", "{ws}/nowhere"), ["nowhere", "no such model directory"]),
    (
        "quantize.group_size past K",
        JOB + "    quantize: {group_size: 256}\n",
        ["jobs[0].quantize.group_size: 256"],
    ),
    (
        "export awq of act-order",
        JOB + "    quantize: {method: gptq, group_size: 32, gptq: {act_order: true}}\n"
        "    export: [{format: hf, weights: awq}]\n",
        ["jobs[0].export[0]: weights: awq cannot hold act-order"],
    ),
    (
        "export awq of 8 bits",
        JOB + "    quantize: {bits: 8}\n    export: [{format: hf, weights: awq}]\n",
        ["jobs[0].export[0]: weights: awq needs every quantized module at 4 bits"],
    ),
    (
        "gguf K-quant of a quantized job",
        JOB + "    export: [{format: gguf, type: q4_k_m}]\n",
        ["jobs[0].export[0]: type q4_k_m"],
    ),
    (
        "gguf q4_0 of an asymmetric grid",
        JOB + "    quantize: {sym: false, group_size: 32}\n    export: [{format: gguf, type: q4_0}]\n",
        ["jobs[0].export[0]: type q4_0", "asymmetric"],
    ),
    (
        "gguf of 8-bit asymmetric",
        JOB + "    quantize: {bits: 8, sym: false, group_size: 32}\n    export: [{format: gguf}]\n",
        ["jobs[0].export[0]: gguf", "cannot go into GGUF exactly"],
    ),
    (
        "gguf of act-order",
        JOB + "    quantize: {method: gptq, group_size: 32, gptq: {act_order: true}}\n"
        "    export: [{format: gguf}]\n",
        ["jobs[0].export[0]", "act-order"],
    ),
    (
        "two exports one folder",
        JOB + "    export: [{format: hf}, {format: hf}]\n",
        ["jobs[0].export[1]: writes to the same folder as jobs[0].export[0]"],
    ),
    (
        "export folder escapes",
        JOB + "    export: [{format: hf, folder: ../x}]\n",
        ["jobs[0].export[0].hf.folder"],
    ),
]:
    case(
        f"run: {name}",
        "run {ws}/recipe.yaml",
        needles,
        text_files,
        recipe=None if body is None else "jobs:\n" + body,
    )


# names that become paths: one plain path component, checked before any work
for name, value, needle in [
    ("parent", "../../x", "path separator"),
    ("nested", "a/b", "path separator"),
    ("dot-dot", "..", "starts with '.'"),
    ("hidden", ".x", "starts with '.'"),
    ("empty", "", "is empty"),
    ("backslash", "a\\b", "path separator"),
    ("control character", "a\tb", "control character"),
    ("too long", "n" * 201, "longer than 200 bytes"),
]:
    case(
        f"export gguf --name: {name}",
        ["export", "{ws}/fam", "--format", "gguf", "--name", value, "--out", "{ws}/out/e"],
        ["--name", needle],
    )
    yaml_value = json.dumps(value)
    case(
        f"run: job name {name}",
        "run {ws}/recipe.yaml",
        ["jobs[0].name", needle],
        recipe="jobs:\n" + JOB.replace("name: a", f"name: {yaml_value}"),
    )
    case(
        f"run: gguf name {name}",
        "run {ws}/recipe.yaml",
        ["jobs[0].export[0].gguf.name", needle],
        recipe="jobs:\n" + JOB + f"    export: [{{format: gguf, name: {yaml_value}}}]\n",
    )
    for fmt in ("hf", "gguf", "onnx"):
        case(
            f"run: {fmt} folder {name}",
            "run {ws}/recipe.yaml",
            [f"jobs[0].export[0].{fmt}.folder", needle],
            recipe="jobs:\n" + JOB + f"    export: [{{format: {fmt}, folder: {yaml_value}}}]\n",
        )
for folder in ("family", "ruyi_quant.json", "eval.json"):
    case(
        f"run: hf folder {folder}",
        "run {ws}/recipe.yaml",
        ["jobs[0].export[0].hf.folder", "the job's own"],
        recipe="jobs:\n" + JOB + f"    export: [{{format: hf, folder: {folder}}}]\n",
    )
case(
    "export gguf --name: a user's Modelfile outside --out",
    ["export", "{ws}/fam", "--format", "gguf", "--name", "../../x", "--out", "{ws}/deep/out/e"],
    ["--name", "path separator"],
    lambda ws: ((ws / "deep").mkdir(), (ws / "deep" / "Modelfile").write_text("FROM mine\n")),
)

# duplicates and empty settings
for cname, argv in {
    "export hf": "export {ws}/fam --out {ws}/out",
    "export gguf": "export {ws}/fam --format gguf --out {ws}/out",
    "export onnx": "export {ws}/fam --format onnx --out {ws}/out",
    "eval": "eval {ws}/model {ws}/fam --samples 1 --seq-len 32",
    "make-familial": "make-familial {ws}/plain --out {ws}/out",
}.items():
    case(
        f"{cname}: exits twice",
        f"{argv} --exits 2,2",
        ["--exits 2,2", "exit 2 is given twice"],
        make_plain if cname == "make-familial" else None,
    )
case("quantize: override without settings", Q + "--override lm_head*", ["--override lm_head*", "no settings"])
case(
    "quantize: override with an empty setting list",
    Q + "--override lm_head*:,",
    ["--override", "no settings"],
)
case("quantize: override with an empty pattern", Q + "--override :bits=8", ["--override", "pattern is empty"])
case("quantize: skip with an empty pattern", Q.split() + ["--skip", ""], ["--skip", "is empty"])
# empty values and a repeatable option given the same value twice, on every subcommand
for cname, argv, flag in [
    ("inspect: empty model", ["inspect", ""], "MODEL"),
    ("run: empty recipe", ["run", ""], "RECIPE"),
    ("quantize: empty calib", Q.split() + ["--method", "gptq", "--calib", ""], "--calib"),
    ("quantize: empty out", ["quantize", "{ws}/model", "--out", ""], "--out"),
    ("eval: empty data", E.split() + ["--data", ""], "--data"),
    ("export: blank license", X.split() + ["--format", "gguf", "--license", " "], "--license"),
    ("make-familial: empty train", M.split() + ["--train", ""], "--train"),
    ("generate: empty family", ["generate", "hi", "--family", ""], "--family"),
    ("chat: empty exit", ["chat", "--family", "{ws}/fam", "--exit", ""], "--exit"),
]:
    case(cname, argv, [f"{flag} '': is empty"])
for cname, argv, needle in [
    ("quantize: skip twice", Q + "--skip lm_head* --skip lm_head*", "--skip lm_head*: given twice"),
    (
        "quantize: override twice",
        Q + "--override lm_head*:bits=8 --override lm_head*:bits=8",
        "--override lm_head*:bits=8: given twice",
    ),
    ("make-familial: train twice", M + "--train {ws}/good.txt --train {ws}/good.txt", "given twice"),
    ("run: only twice", "run {ws}/recipe.yaml --only a --only a", "--only a: given twice"),
]:
    case(cname, argv, [needle], text_files, recipe="jobs:\n" + JOB if cname.startswith("run") else None)
for name, body, needles in [
    (
        "hf export of K-quant blocks",
        JOB + "    quantize: {method: gptq, gguf: q4_k_m}\n    export: [{format: hf}]\n",
        ["jobs[0].export[0]", "q4_k_m blocks", "6-bit sub-block scales"],
    ),
    (
        "K-quant blocks exported as another K-quant",
        JOB + "    quantize: {method: gptq, gguf: q4_k_m}\n    export: [{format: gguf, type: q6_k}]\n",
        ["jobs[0].export[0]", "type q6_k", "use type auto"],
    ),
    (
        "export exits twice",
        JOB + "    export: [{format: hf, exits: [2, 2]}]\n",
        ["jobs[0].export[0].hf.exits", "twice"],
    ),
    (
        "export exits empty",
        JOB + "    export: [{format: gguf, exits: []}]\n",
        ["jobs[0].export[0].gguf.exits", "at least one"],
    ),
    (
        "eval exits twice",
        JOB + "    eval: {exits: [3, 3]}\n",
        ["jobs[0].eval.exits", "exit 3 is given twice"],
    ),
    (
        "override without settings",
        JOB + "    quantize: {overrides: [{pattern: 'lm_head*'}]}\n",
        ["jobs[0].quantize.overrides[0]", "sets nothing"],
    ),
    (
        "override with an empty pattern",
        JOB + "    quantize: {overrides: [{pattern: '', bits: 8}]}\n",
        ["jobs[0].quantize.overrides[0]", "pattern is empty"],
    ),
]:
    case(f"run: {name}", "run {ws}/recipe.yaml", needles, recipe="jobs:\n" + body)


# --- the test ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name, ws, capsys, monkeypatch):
    c = CASES[name]

    def fill(text):
        return text.replace("{ws}", str(ws)).replace("{long}", long_path(ws))

    if c.setup:
        c.setup(ws)
    if name == "run: not UTF-8":
        (ws / "recipe.yaml").write_bytes(b"jobs:\n  - name: \xe9t\xe9\n")
    elif c.recipe:
        (ws / "recipe.yaml").write_text(fill(c.recipe))
    for k, v in c.env.items():
        monkeypatch.setenv(k, fill(v))
    before = snapshot(ws)
    capsys.readouterr()
    code = main([fill(a) for a in c.argv])
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert code == 2, (code, err)
    assert len(lines) == 1, err
    assert lines[0].startswith("ruyi-quant: error: ") and "Traceback" not in err
    for n in c.needles:
        assert fill(n) in lines[0], (n, lines[0])
    assert snapshot(ws) == before


def test_the_suite_covers_every_subcommand():
    """At least 120 cases, and every subcommand among them."""
    assert len(CASES) >= 120, len(CASES)
    used = {c.argv[0] for c in CASES.values()}
    assert used == {"inspect", "quantize", "export", "eval", "make-familial", "run", "generate", "chat"}


# --- standard input closed -----------------------------------------------------------------
def run_without_stdin(argv, cwd):
    """The CLI in a process whose file descriptor 0 is closed (a shell's `0<&-`)."""
    import os
    import subprocess
    import sys

    return subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, sys; os.close(0); from ruyi_quant.cli import main; "
            "sys.stdin = None; sys.exit(main(sys.argv[1:]))",
            *argv,
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_chat_with_standard_input_closed_is_one_line(ws):
    """chat reads its turns from standard input: closed, it is one line and exit 2, before any loading."""
    before = snapshot(ws)
    done = run_without_stdin(["chat", "--family", str(ws / "fam"), "--device", "cpu"], ws)
    lines = [x for x in done.stderr.splitlines() if x.strip()]
    assert done.returncode == 2, done.stderr
    assert lines == [
        "ruyi-quant: error: chat: standard input is closed; run it in a terminal or pipe "
        "the turns in, one per line"
    ], done.stderr
    assert snapshot(ws) == before


@pytest.mark.parametrize(
    "argv",
    [
        ["inspect", "{ws}/fam"],
        ["export", "{ws}/fam", "--format", "gguf", "--out", "{ws}/g"],
        [
            "generate",
            "hi",
            "--family",
            "{ws}/fam",
            "--max-new-tokens",
            "2",
            "--device",
            "cpu",
            "--compile",
            "off",
        ],
    ],
    ids=["inspect", "export gguf", "generate"],
)
def test_commands_that_do_not_read_standard_input_run_without_it(argv, ws):
    done = run_without_stdin([a.replace("{ws}", str(ws)) for a in argv], ws)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
