"""Recipe YAML -> validated, typed jobs. Every key is documented in recipes/README.md.

A recipe holds one or more jobs; `defaults` (optional) is merged into every job first:

    defaults:
      model: builtin:tiny
    jobs:
      - name: tiny-rtn4
        output: out/tiny-rtn4
        quantize: {method: rtn, bits: 4, group_size: 32}
        export: [{format: hf, exits: all}]
        eval: {source: builtin:pydoc/eval, samples: 8, seq_len: 128}

A bad key or value is one line naming the file, the line and the key (load.py reads the file).
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, ClassVar, Literal, Union

import torch
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from ..errors import name_problem
from ..names import MARKER
from ..quant.plan import check_bits, check_blocks, check_group_size

Bits = Annotated[int, AfterValidator(check_bits)]
SEED_LIMIT = 1 << 63  # torch's generators take a 64-bit seed
GroupSize = Annotated[int, AfterValidator(check_group_size)]


def check_device_name(device: str) -> str:
    """auto, cpu, cuda or cuda:N (whether that device exists is checked when a run starts)."""
    import re

    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise ValueError(f"'{device}' is not a device: give auto, cpu, cuda or cuda:N")
    return device


JOB_FAMILY = "family"  # the quantized family's folder inside a job's output
JOB_FILES = (MARKER, JOB_FAMILY, "eval.json", "eval.md", "eval.png")  # a job's own names


def check_name(name: str | None) -> str | None:
    """A name that becomes a file or folder name: one plain path component."""
    problem = None if name is None else name_problem(name)
    if problem:
        raise ValueError(f"'{name}' {problem}")
    return name


def check_folder(folder: str | None) -> str | None:
    """An export's folder: one plain folder name inside the job's output, none of the job's own."""
    check_name(folder)
    if folder in JOB_FILES:
        raise ValueError(
            f"'{folder}' is the job's own {'folder' if folder == JOB_FAMILY else 'file'}; "
            "give the export another folder name"
        )
    return folder


def check_exits(exits):
    """An exit list: at least one exit, each once."""
    if isinstance(exits, list):
        if not exits:
            raise ValueError("give at least one exit layer, or all")
        dup = next((e for e in exits if exits.count(e) > 1), None)
        if dup is not None:
            raise ValueError(f"exit {dup} is given twice; give each exit once")
    return exits


Folder = Annotated[str | None, AfterValidator(check_folder)]
Name = Annotated[str | None, AfterValidator(check_name)]


# settings whose command-line flag is not `--` + the field's name, by their place in a job
FLAGS = {
    "calibration.source": "--calib",
    "eval.source": "--data",
    "quantize.gptq.damp_percent": "--damp",
    "quantize.awq.max_tokens": "--awq-tokens",
    "quantize.awq.clip": "--no-clip",
    "training.distill_weight": "--distill",
    "training.sources": "--train",
}


def cli_flag(section: str, key: str) -> str:
    """The command-line flag of a setting (`key` in `section`, or a dotted key below it)."""
    where = f"{section}.{key}"
    return FLAGS.get(where, "--" + where.rsplit(".", 1)[-1].replace("_", "-"))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Calibration(Strict):
    """Text the quantizer calibrates on (GPTQ/AWQ; RTN ignores it)."""

    SECTION: ClassVar[str] = "calibration"  # its place among the settings (cli_flag)

    source: str = "builtin:pydoc/calib + builtin:stdlib/calib"  # English docs and Python source, half each
    field: str = "text"  # JSONL field that holds the text
    samples: int = Field(32, ge=1)
    seq_len: int = Field(256, ge=8)
    seed: int = Field(0, ge=0, lt=SEED_LIMIT)


class Override(Strict):
    """A grid for the modules a pattern matches (quant/plan.py: make_plan)."""

    SECTION: ClassVar[str] = "quantize.overrides"  # its place among the settings (cli_flag)

    pattern: str  # shell-style module pattern, e.g. "lm_head*"
    bits: Bits | None = None
    group_size: GroupSize | None = None
    sym: bool | None = None
    skip: bool = False

    @model_validator(mode="after")
    def _has_a_setting(self):
        if not self.pattern:
            raise ValueError("the pattern is empty; give a module pattern like 'lm_head*'")
        if not self.skip and self.bits is None and self.group_size is None and self.sym is None:
            raise ValueError(
                f"override '{self.pattern}' sets nothing; give bits, group_size or sym (or skip: true)"
            )
        return self


class GPTQOptions(Strict):
    SECTION: ClassVar[str] = "quantize.gptq"  # its place among the settings (cli_flag)
    damp_percent: float = Field(0.01, gt=0, le=1, allow_inf_nan=False)  # dampening, fraction of mean diag(H)
    block_size: int = Field(128, ge=1)  # columns per lazy batch update
    act_order: bool | None = None  # desc_act: columns by decreasing diag(H); None: on with gguf only
    static_groups: bool = False  # group grids fixed up front (with act_order)
    awq_scales: bool = False  # AWQ's scales searched and folded in first (quant/smooth.py)


class AWQOptions(Strict):
    SECTION: ClassVar[str] = "quantize.awq"  # its place among the settings (cli_flag)
    grid: int = Field(20, ge=2)  # scale exponents r = 0, 1/grid, ... tried
    max_shrink: float = Field(0.5, ge=0, lt=1, allow_inf_nan=False)  # clipping: to (1 - it) x max
    clip: bool = True  # search clipping ranges (q/k never clipped)
    max_tokens: int = Field(2048, ge=16)  # activation rows sampled per search


GGUFType = Literal["auto", "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"]
# llama.cpp's K-quant mixes (llama-cpp-python): its quantizer's, or ours by quantize.gguf
KQuantType = Literal["q4_k_m", "q5_k_m", "q6_k"]


class Quantize(Strict):
    SECTION: ClassVar[str] = "quantize"  # its place among the settings (cli_flag)
    method: Literal["rtn", "gptq", "awq", "none"] = "rtn"
    bits: Bits = 4
    group_size: GroupSize = 128
    sym: bool = True
    heads: bool = False  # quantize the heads too
    overrides: list[Override] = []
    gptq: GPTQOptions = GPTQOptions()
    awq: AWQOptions = AWQOptions()
    device: Annotated[str, AfterValidator(check_device_name)] = "auto"  # auto (cuda when
    # present), cpu, cuda, cuda:1, ... (availability: pick_device)
    batch: int = Field(8, ge=1)  # calibration windows per forward pass
    gguf: Union[KQuantType, None] = None  # gptq into llama.cpp's blocks (quant/plan.py: block_plan)

    @field_validator("gguf")
    @classmethod
    def _gguf_needs_gptq(cls, v, info):
        return check_blocks(v, info.data.get("method"), info.data.get("overrides"))


Exits = Annotated[Union[Literal["all"], list[int]], AfterValidator(check_exits)]


class HFExport(Strict):
    SECTION: ClassVar[str] = "export"  # its place among the settings (cli_flag)
    format: Literal["hf"] = "hf"
    exits: Exits = "all"
    weights: Literal["auto", "float", "gptq", "awq"] = "auto"
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    folder: Folder = None  # inside the job's output; default hf-gptq / hf-awq / hf-bfloat16


class GGUFExport(Strict):
    SECTION: ClassVar[str] = "export"  # its place among the settings (cli_flag)
    format: Literal["gguf"] = "gguf"
    exits: Exits = "all"
    type: Union[GGUFType, KQuantType] = "auto"  # auto: our grids exactly, float linears f16
    embed_type: GGUFType = "auto"  # auto: q8_0 in 4-bit files, else as type
    head_type: GGUFType = "auto"  # a float head's type (a quantized head keeps its grid)
    per_exit: bool = True  # one stock qwen2 file per exit (+ Ollama Modelfile)
    multi: bool = False  # one multi-exit file with the trunk stored once
    imatrix: bool = True  # K-quants: weigh rounding by an importance matrix that we
    # compute from the job's calibration set
    name: Name = None  # general.name and the files' names (default: the model's name)
    license: str | None = None  # general.license (default: the source's, when known)
    folder: Folder = None  # inside the job's output; default gguf-<type>


class ONNXExport(Strict):
    SECTION: ClassVar[str] = "export"  # its place among the settings (cli_flag)
    format: Literal["onnx"] = "onnx"
    exits: Exits = "all"
    dtype: Literal["float32", "float16"] = "float32"  # float weights and the compute type
    weights: Literal["auto", "float"] = "auto"  # auto: our grids in MatMulNBits; float: dequantized
    head: Literal["auto", "float", "int8"] = "auto"  # int8: a float head rounded to 8 bits
    embed: Literal["float", "int8", "head"] = "float"  # int8: one scale per row; head: the rows of
    # a tied, quantized head's grid (no bytes of its own)
    accuracy_level: Literal[0, 1, 2, 3, 4] = 4  # MatMulNBits: 0 float compute, 4 int8 activations
    per_exit: bool = True  # one folder per exit that onnxruntime-genai loads as it is
    multi: bool = False  # one folder whose single data file holds the trunk once
    folder: Folder = None  # inside the job's output; default onnx-<int4|float32|...>


def _export_kind(v) -> str:
    return v.get("format", "hf") if isinstance(v, dict) else getattr(v, "format", "hf")


Export = Annotated[
    Union[
        Annotated[HFExport, Tag("hf")], Annotated[GGUFExport, Tag("gguf")], Annotated[ONNXExport, Tag("onnx")]
    ],
    Discriminator(_export_kind),
]


class Eval(Strict):
    SECTION: ClassVar[str] = "eval"  # its place among the settings (cli_flag)
    source: str = "builtin:pydoc/eval"
    field: str = "text"
    samples: int = Field(16, ge=1)
    seq_len: int = Field(256, ge=8)
    exits: Exits = "all"
    batch: int = Field(4, ge=1)
    plot: bool = True


class Job(Strict):
    name: Annotated[str, AfterValidator(check_name)]
    model: str  # a checkpoint directory or builtin:tiny / builtin:tiny-shared
    output: str  # directory; relative paths are relative to the recipe file
    calibration: Calibration = Calibration()
    quantize: Quantize = Quantize()
    export: list[Export] = []
    eval: Eval | None = None

    def digest(self) -> str:
        """Hash of everything that determines the job's outputs."""
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()[:16]


class Training(Strict):
    """make-familial: how the branch layers and exit norms are trained (sources/branches.py)."""

    SECTION: ClassVar[str] = "training"  # its place among the settings (cli_flag)

    sources: list[str] = ["builtin:pydoc/train", "builtin:stdlib/train"]
    windows: int = Field(192, ge=1)  # training windows of seq_len tokens
    seq_len: int = Field(256, ge=8)
    steps: int = Field(400, ge=3)  # optimizer steps per exit (one-cycle needs 3)
    batch: int = Field(8, ge=1)
    lr: float = Field(1e-3, gt=0, le=1, allow_inf_nan=False)  # one-cycle peak
    positions: int = Field(48, ge=1)  # loss positions per window and step
    distill_weight: float = Field(0.5, ge=0, le=1, allow_inf_nan=False)  # weight of KL(last exit || exit)
    seed: int = Field(0, ge=0, lt=SEED_LIMIT)


# --- running a family: the int4 runtime and generation ---------------------------------------
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
DtypeName = Literal["bf16", "fp16", "fp32", "bfloat16", "float16", "float32"]


def dtype_of(name: str) -> torch.dtype:
    """A floating dtype by its name (bfloat16, float16, float32) or short name (bf16, fp16, fp32)."""
    return DTYPES[DTYPE_ALIASES.get(name, name)]


class Runtime(Strict):
    """Where and how a family runs on our runtime (generate, chat, eval --runtime)."""

    SECTION: ClassVar[str] = "runtime"  # its place among the settings (cli_flag)

    device: Annotated[str, AfterValidator(check_device_name)] = "auto"
    dtype: DtypeName = "bf16"  # activations, and the float side of the model
    compile: Literal["auto", "on", "off"] = "auto"  # auto: on CUDA (with CUDA graphs)


class Sampling(Strict):
    """How tokens are picked: greedy, or a seeded draw after temperature, top-k and top-p."""

    SECTION: ClassVar[str] = "sampling"  # its place among the settings (cli_flag)

    max_new_tokens: int = Field(64, ge=1)
    sample: bool = False
    temperature: float = Field(1.0, gt=0, allow_inf_nan=False)
    top_k: int = Field(50, ge=0)  # 0: every token
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = Field(0, ge=0, lt=SEED_LIMIT)

    def search(self) -> dict:
        """The keyword arguments of runtime.generate and the ONNX runner."""
        return self.model_dump(exclude={"max_new_tokens"})


class Benchmark(Strict):
    """eval --runtime: what is timed per exit."""

    SECTION: ClassVar[str] = "benchmark"  # its place among the settings (cli_flag)

    prefill: int = Field(256, ge=1)  # prompt tokens
    decode_tokens: int = Field(32, ge=1)  # tokens decoded
    prompts: int = Field(1, ge=1)  # batch of prompts
    repeats: int = Field(3, ge=1)  # timed runs (the median is reported)


class Provenance(BaseModel):
    """What made a family, kept in its ruyi_quant.json (as `recipe`): the source model and the
    quantize and calibration settings; a recipe job's other keys ride along."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    calibration: Calibration | None = None
    quantize: Quantize | None = None


def check_ray_address(address: str) -> str:
    if not address.strip():
        raise ValueError("is empty: give local, auto, HOST:PORT or ray://HOST:PORT")
    return address


class RaySettings(Strict):
    """Where a recipe's jobs run as Ray tasks (pipeline/cluster.py); `ray: true` or `ray: ADDRESS`
    for short."""

    address: Annotated[str, AfterValidator(check_ray_address)] = "local"  # local: a cluster started
    # for the run; auto, HOST:PORT, ray://HOST:PORT: an existing one
    cpus_per_job: int | None = Field(None, ge=1)  # CPUs a CPU job asks for and the torch threads
    # every job computes with; default: the driver's torch threads, what a serial run here uses,
    # so the files are the serial run's bit for bit (a CUDA job asks for one GPU and one CPU)


def _ray_shorthand(v):
    if v is True:
        return {}
    if v is False:
        return None
    if isinstance(v, str):
        return {"address": v}
    return v


class Recipe(Strict):
    defaults: dict = {}
    jobs: list[Job] = Field(min_length=1)
    # run the jobs on Ray (`ruyi-quant run --ray` does the same); false or absent: one after another
    ray: Annotated[Union[RaySettings, None], BeforeValidator(_ray_shorthand)] = None
