"""One exit of a family as an ONNX decoder with a KV cache, built node by node with `onnx.helper`
(not by tracing PyTorch): standard ops of opset 23 (RMSNormalization, RotaryEmbedding) plus
onnxruntime's `com.microsoft` MatMulNBits (our grids), GroupQueryAttention (grouped KV heads,
a past/present buffer onnxruntime-genai shares) and GatherBlockQuantized (embed head).

Exit e is the plain model of e+1 layers that layout.exit_map describes (trunk layers 0..e-1, the
exit's branch layer, its norm and head), with the I/O onnxruntime-genai expects:

    input_ids [batch, seq] int64, attention_mask [batch, past+seq] int64, position_ids [batch, seq]
    past_key_values.{i}.key / .value [batch, kv_heads, past, head_dim]
    -> logits [batch, seq, vocab], present.{i}.key / .value [batch, kv_heads, past+seq, head_dim]

Initializers are named by the family's own tensor names, so the graphs of several exits written
into one data file (files.DataFile) share every tensor they have in common.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from ... import names
from ...errors import UserError
from ...model import layout
from .weights import check_grid, fusable, fuse, int8_grid, int8_rows, layout_of, nbits_arrays

OPSET = 23
DTYPES = {
    "float32": (TensorProto.FLOAT, np.float32, torch.float32),
    "float16": (TensorProto.FLOAT16, np.float16, torch.float16),
}


def check_onnx(config, modules: dict, ex) -> None:
    """Refuse, in one line naming the setting, what these graphs cannot hold (`modules`: module ->
    QuantSpec, of a family or of a job's plan); run before anything is written."""
    if config.rope_scaled:
        raw = config.raw
        raise UserError(
            "onnx: scaled RoPE is not exported; the model uses "
            f"{raw.get('rope_parameters') or raw.get('rope_scaling')}"
        )
    if ex.embed == "head" and not (
        config.shared_heads
        and config.tie_word_embeddings
        and names.SHARED_HEAD in modules
        and ex.weights == "auto"
        and ex.head == "auto"
    ):
        raise UserError(
            "onnx embed head: gathers the embedding from the head's grid, so it needs a "
            "head tied to the embedding and quantized (quantize with heads: true), "
            "weights auto and head auto; use embed float or int8"
        )
    if ex.weights == "auto":
        for m, spec in modules.items():
            if not (ex.head == "float" and layout.is_head(m)):  # int8 keeps a head's grid
                check_grid(m, spec)


class Graph:
    """Nodes, and initializers that go to a DataFile as soon as they are made."""

    def __init__(self, data, opt):
        self.data, self.opt = data, opt
        self.elem, self.np, self.torch = DTYPES[opt.dtype]
        self.nodes: list[onnx.NodeProto] = []
        self.consts: list[onnx.TensorProto] = []
        self.count = 0

    def op(self, op_type: str, *inputs: str, outputs: int = 1, domain: str = "", names=None, **attrs):
        """A node; its outputs are named `names` (graph outputs) or after the node."""
        self.count += 1
        outs = names or [f"{op_type}_{self.count}" + (f"_{i}" if outputs > 1 else "") for i in range(outputs)]
        while inputs and inputs[-1] == "":  # trailing optional inputs left out
            inputs = inputs[:-1]
        self.nodes.append(
            helper.make_node(
                op_type, list(inputs), outs, name=f"{op_type}_{self.count}", domain=domain or None, **attrs
            )
        )
        return outs[0] if len(outs) == 1 else outs

    def const(self, value, dtype=np.int64) -> str:
        """A small constant stored in the graph itself."""
        name = f"const_{len(self.consts)}"
        self.consts.append(
            helper.make_tensor(
                name,
                helper.np_dtype_to_tensor_dtype(np.dtype(dtype)),
                np.shape(value),
                np.asarray(value, dtype).flatten().tolist(),
            )
        )
        return name

    def weight(self, name: str, produce) -> str:
        """An initializer in the data file (made by produce() unless the file already has it)."""
        self.data.add(name, produce)
        return name


class Decoder:
    """The decoder graph of one exit (see the module docstring)."""

    def __init__(self, fam, j: int, opt, data):
        self.fam, self.cfg, self.opt = fam, fam.config, opt
        self.map = self.cfg.exit_map(j)
        raw = self.cfg.raw
        self.heads = int(raw["num_attention_heads"])
        self.kv_heads = int(raw.get("num_key_value_heads") or self.heads)
        self.eps = float(raw.get("rms_norm_eps", 1e-6))
        self.g = Graph(data, opt)

    # --- tensors ---------------------------------------------------------------------------
    def float_weight(self, name: str) -> str:
        return self.g.weight(name, lambda: self.fam.tensors[name].to(self.g.torch).numpy())

    def grid_of(self, module: str, head: bool):
        """(name prefix, grid or a maker of one) of a linear written as MatMulNBits, or None."""
        opt, grid = self.opt, self.fam.grids.get(module)
        if head and opt.head == "float":
            return None
        if head and opt.head == "int8" and (grid is None or opt.weights == "float"):
            src = self.fam.stored_name(f"{module}.weight")
            if grid is None:
                return f"{module}.int8", lambda: int8_grid(self.fam.tensors[src])
            return f"{module}.int8", lambda: int8_grid(grid.get().dequantize())
        if grid is None or opt.weights == "float":
            return None
        return f"{module}.nbits", lambda: grid.get()

    # --- layers ----------------------------------------------------------------------------
    def linear(self, x: str, module: str, bias: str | None = None, head: bool = False) -> str:
        g = self.g
        q = self.grid_of(module, head)
        if q is None:
            n, k = self.fam.linear_shape(module)
            if module in self.fam.grids:  # --weights float / a float head
                w = g.weight(
                    f"{module}.weight", lambda: self.fam.grids[module].get().dequantize().to(g.torch).numpy()
                )
            else:
                w = self.float_weight(
                    self.fam.stored_name(f"{module}.weight") if head else f"{module}.weight"
                )
            flat = g.op("Reshape", x, g.const([-1, k]))
            y = g.op("Gemm", flat, w, self.float_weight(bias) if bias else "", transB=1)
            return g.op("Reshape", y, g.op("Concat", self.lead, g.const([n]), axis=0))
        return self.matmul_nbits(x, *self.nbits(q), self.float_weight(bias) if bias else None)

    def matmul_nbits(self, x: str, prefix: str, lay, bias: str | None = None) -> str:
        g = self.g
        opt = [f"{prefix}.{k}" if f"{prefix}.{k}" in g.data else "" for k in ("zero_points", "g_idx")]
        return g.op(
            "MatMulNBits",
            x,
            f"{prefix}.B",
            f"{prefix}.scales",
            *opt,
            bias or "",
            domain="com.microsoft",
            K=lay.k,
            N=lay.n,
            bits=lay.bits,
            block_size=lay.block,
            accuracy_level=self.opt.accuracy_level,
        )

    def linears(
        self, x: str, prefix: str, modules: tuple[str, ...], fused: str, biases: bool = False
    ) -> list[str]:
        """Linears that read the same x. Grids of one layout (no act-order) run as one MatMulNBits
        over their stacked rows (initializers `PREFIX.FUSED.nbits.*`), then Split; otherwise one
        node each."""
        g, mods = self.g, [f"{prefix}.{m}" for m in modules]
        grids = [self.grid_of(m, False) for m in mods]
        bias = [f"{m}.bias" if biases else None for m in mods]
        name = f"{prefix}.{fused}.nbits"
        if all(q is not None for q in grids) and (
            name in g.data.attrs or fusable([layout_of(self.fam.grids[m]) for m in mods])
        ):
            if name not in g.data.attrs:
                parts = []
                for q in grids:
                    grid = q[1]()
                    lay = layout_of(grid)
                    parts.append((nbits_arrays(grid, lay, g.np), lay))
                arrays, lay = fuse(parts)
                for key, arr in arrays.items():
                    g.weight(f"{name}.{key}", lambda arr=arr: arr)
                g.data.attrs[name] = (lay, [p[1].n for p in parts])
            lay, sizes = g.data.attrs[name]
            b = (
                g.weight(
                    f"{prefix}.{fused}.bias",
                    lambda: np.concatenate([self.fam.tensors[x].to(g.torch).numpy() for x in bias]),
                )
                if biases
                else None
            )
            y = self.matmul_nbits(x, name, lay, b)
            return g.op("Split", y, g.const(sizes), axis=-1, outputs=len(mods))
        return [self.linear(x, m, bb) for m, bb in zip(mods, bias)]

    def nbits(self, q):
        """(prefix, layout) of a grid's MatMulNBits initializers, written on first use."""
        g, (prefix, make) = self.g, q
        if f"{prefix}.B" not in g.data:
            grid = make()
            lay = layout_of(grid)
            for key, arr in nbits_arrays(grid, lay, g.np).items():
                g.weight(f"{prefix}.{key}", lambda arr=arr: arr)
            g.data.attrs[prefix] = lay
        return prefix, g.data.attrs[prefix]

    def norm(self, x: str, name: str, delta: str | None = None) -> tuple[str, str]:
        """(RMSNorm(x + delta) * weight, x + delta); delta None: of x itself. With a delta, one
        com.microsoft.SkipSimplifiedLayerNormalization node (residual add and norm fused)."""
        g, w = self.g, self.float_weight(name)
        if delta is None:
            return g.op("RMSNormalization", x, w, axis=-1, epsilon=self.eps, stash_type=1), x
        out, _, _, total = g.op(
            "SkipSimplifiedLayerNormalization",
            delta,
            x,
            w,
            outputs=4,
            domain="com.microsoft",
            epsilon=self.eps,
        )
        return out, total

    def embed(self, ids: str) -> str:
        g, name = self.g, f"{names.EMBED}.weight"
        if self.opt.embed == "float":
            return g.op("Gather", self.float_weight(name), ids)
        if self.opt.embed == "head":  # rows of the tied head's grid, from its own bytes
            prefix, lay = self.nbits(self.grid_of(self.map.head, head=True))
            if lay.act_order:
                raise UserError(
                    "onnx embed head: the head's grid has act-order groups, which "
                    "GatherBlockQuantized cannot read; use embed float or int8"
                )
            row = lay.blocks * lay.block * lay.bits // 8
            zp = f"{prefix}.zero_points"
            rows = g.op(
                "GatherBlockQuantized",
                g.data.alias(f"{prefix}.B", f"{prefix}.B.rows", (lay.n, row)),
                ids,
                g.data.alias(f"{prefix}.scales", f"{prefix}.scales.rows", (lay.n, lay.blocks)),
                g.data.alias(zp, f"{zp}.rows", (lay.n, -(-lay.blocks * lay.bits // 8)))
                if zp in g.data
                else "",
                domain="com.microsoft",
                bits=lay.bits,
                block_size=lay.block,
                gather_axis=0,
                quantize_axis=1,
            )
            if lay.blocks * lay.block == lay.k:
                return rows
            return g.op("Slice", rows, g.const([0]), g.const([lay.k]), g.const([-1]))
        if f"{name}.int8.codes" not in g.data:
            for key, arr in int8_rows(self.fam.tensors[name], g.np).items():
                g.weight(f"{name}.int8.{key}", lambda arr=arr: arr)
        codes = g.op("Cast", g.op("Gather", f"{name}.int8.codes", ids), to=g.elem)
        return g.op("Mul", codes, g.op("Gather", f"{name}.int8.scales", ids))

    def rope(self, position_ids: str) -> tuple[str, str]:
        """cos, sin [batch, seq, head_dim / 2] as transformers computes them (fp32, then cast)."""
        g, d = self.g, self.cfg.head_dim
        inv = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        pos = g.op("Unsqueeze", g.op("Cast", position_ids, to=TensorProto.FLOAT), g.const([-1]))
        freqs = g.op("Mul", pos, g.const(inv.numpy(), np.float32))
        cos, sin = g.op("Cos", freqs), g.op("Sin", freqs)
        if g.elem != TensorProto.FLOAT:
            cos, sin = g.op("Cast", cos, to=g.elem), g.op("Cast", sin, to=g.elem)
        return cos, sin

    def lengths(self, attention_mask: str) -> tuple[str, str]:
        """GroupQueryAttention's view of the mask: seqlens_k int32 [batch] (kept positions - 1)
        and total_sequence_length int32 (the mask's width). Right padding, as onnxruntime-genai
        pads a batch."""
        g = self.g
        kept = g.op("ReduceSum", attention_mask, g.const([1]), keepdims=0)
        seqlens = g.op("Cast", g.op("Sub", kept, g.const(1)), to=TensorProto.INT32)
        total = g.op(
            "Cast", g.op("Squeeze", g.op("Shape", attention_mask, start=1, end=2)), to=TensorProto.INT32
        )
        return seqlens, total

    def layer(
        self,
        x: str,
        delta: str | None,
        prefix: str,
        cos: str,
        sin: str,
        lengths: tuple[str, str],
        past: list[str],
        present: list[str],
    ):
        """One decoder layer on the residual stream x + delta (delta: the previous layer's last
        output, not yet added); writes the graph outputs `present`. Returns (x, delta)."""
        g, p = self.g, prefix
        attn, out, mlp, down = layout.DECODER_LAYER
        h, x = self.norm(x, f"{p}.{attn.reads}.weight", delta)
        q, k, v = self.linears(h, p, attn.names, attn.fused, biases=True)
        q = g.op("RotaryEmbedding", q, cos, sin, num_heads=self.heads)
        k = g.op("RotaryEmbedding", k, cos, sin, num_heads=self.kv_heads)
        a, _, _ = g.op(
            "GroupQueryAttention",
            q,
            k,
            v,
            *past,
            *lengths,
            domain="com.microsoft",
            names=[f"{p}.attention", *present],
            num_heads=self.heads,
            kv_num_heads=self.kv_heads,
            scale=self.cfg.head_dim**-0.5,
        )
        h, x = self.norm(x, f"{p}.{mlp.reads}.weight", self.linear(a, f"{p}.{out.names[0]}"))
        gate, up = self.linears(h, p, mlp.names, mlp.fused)
        act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)
        return x, self.linear(act, f"{p}.{down.names[0]}")

    def build(self, metadata: dict[str, str]) -> onnx.ModelProto:
        g, cfg, e = self.g, self.cfg, self.map.layer
        kv_dims = ["batch_size", self.kv_heads, "past_sequence_length", cfg.head_dim]
        inputs = [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
            helper.make_tensor_value_info(
                "attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]
            ),
            helper.make_tensor_value_info(
                "position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]
            ),
        ]
        outputs = [
            helper.make_tensor_value_info("logits", g.elem, ["batch_size", "sequence_length", cfg.vocab_size])
        ]
        for i in range(e + 1):
            for kv in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kv}", g.elem, kv_dims))
                outputs.append(
                    helper.make_tensor_value_info(
                        f"present.{i}.{kv}",
                        g.elem,
                        ["batch_size", self.kv_heads, "total_sequence_length", cfg.head_dim],
                    )
                )
        self.lead = g.op("Shape", "input_ids")  # [batch, seq]
        x = self.embed("input_ids")
        cos, sin = self.rope("position_ids")
        lengths = self.lengths("attention_mask")
        delta = None
        for i in range(e + 1):
            prefix = names.TRUNK_LAYER.format(i=i) if i < e else self.map.branch
            x, delta = self.layer(
                x,
                delta,
                prefix,
                cos,
                sin,
                lengths,
                [f"past_key_values.{i}.{kv}" for kv in ("key", "value")],
                [f"present.{i}.{kv}" for kv in ("key", "value")],
            )
        x, _ = self.norm(x, f"{self.map.norm}.weight", delta)
        g.nodes.append(helper.make_node("Identity", [self.linear(x, self.map.head, head=True)], ["logits"]))
        graph = helper.make_graph(
            g.nodes, f"exit_{e}", inputs, outputs, initializer=g.consts + g.data.stubs_for(g.nodes)
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
            producer_name="ruyi-quant",
        )
        model.ir_version = 10
        helper.set_model_props(model, metadata)
        return model
