"""Cost rules: what one operator costs, in the counting convention of ``graphsel.analysis.cost``.

A module rule is ``rule(module, input_shapes, output_shape)``, a function or method rule
``rule(call: OpCall)``; both return the MACs, or ``{"macs": ..., "other_flops": ..., **extra}``,
or None when the node's arguments cannot be read. The operator table (``OpSpec.cost``) holds
them; the cost driver (``graphsel.analysis.cost``) walks the graph.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

@dataclass(frozen=True)
class TensorArg:
    """A tensor argument or output of a node, as its recorded shape and dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)


class _Unknown:
    """A non-constant, non-tensor argument (e.g. a traced ``x.size(0)``)."""

    def __repr__(self):
        return "<unknown>"


UNKNOWN = _Unknown()


@dataclass
class OpCall:
    """What a function rule sees: the node's arguments with tensors replaced by :class:`TensorArg`
    (other traced values by ``UNKNOWN``) and its outputs."""

    node: fx.Node
    args: tuple
    kwargs: dict
    outputs: list[TensorArg]

    @property
    def out(self) -> TensorArg | None:
        return self.outputs[0] if self.outputs else None

    def arg(self, index: int, name: str | None = None, default: Any = None) -> Any:
        """Positional argument ``index`` or keyword ``name``."""
        if index < len(self.args):
            return self.args[index]
        if name is not None and name in self.kwargs:
            return self.kwargs[name]
        return default

    def tensors(self) -> list[TensorArg]:
        """Tensor arguments in order (positional, then keyword; nested lists flattened)."""
        found: list[TensorArg] = []

        def walk(v):
            if isinstance(v, TensorArg):
                found.append(v)
            elif isinstance(v, (list, tuple)):
                for x in v:
                    walk(x)
            elif isinstance(v, dict):
                for x in v.values():
                    walk(x)
        walk(self.args)
        walk(self.kwargs)
        return found


def itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize if hasattr(dtype, "itemsize") else torch.empty((), dtype=dtype).element_size()



def ntuple(v: Any, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (list, tuple)) else (int(v),) * n


def spatial_dims(m: nn.Module, default: int = 2) -> int:
    name = type(m).__name__
    for d in (1, 2, 3):
        if f"{d}d" in name:
            return d
    return default


# -- convolution / linear ----------------------------------------------------------------------

def conv_macs(in_shape, out_shape, weight_shape, transposed: bool, groups: int) -> int:
    # weight: (C_out, C_in/groups, *k) for conv, (C_in, C_out/groups, *k) for transposed conv
    k = math.prod(weight_shape[2:])
    if transposed:
        return math.prod(in_shape) * weight_shape[1] * k
    return math.prod(out_shape) * weight_shape[1] * k


def conv_module(m, ins, out):
    w = tuple(m.weight.shape)
    d = {"macs": conv_macs(ins[0], out, w, m.transposed, m.groups)}
    if m.bias is not None:
        d["other_flops"] = math.prod(out)
    return d


def linear_module(m, ins, out):
    d = {"macs": math.prod(out) * m.in_features}
    if m.bias is not None:
        d["other_flops"] = math.prod(out)
    return d


def bilinear_module(m, ins, out):
    return {"macs": math.prod(out) * m.in1_features * m.in2_features,
            "other_flops": math.prod(out) if m.bias is not None else 0}


def conv_function(call: OpCall):
    x, w = call.arg(0, "input"), call.arg(1, "weight")
    if not isinstance(x, TensorArg) or not isinstance(w, TensorArg) or call.out is None:
        return None
    name = getattr(call.node.target, "__name__", "")
    transposed = "transpose" in name
    d = {"macs": conv_macs(x.shape, call.out.shape, w.shape, transposed, 1)}
    if isinstance(call.arg(2, "bias"), TensorArg):
        d["other_flops"] = call.out.numel
    return d


def linear_function(call: OpCall):
    w = call.arg(1, "weight")
    if not isinstance(w, TensorArg) or call.out is None:
        return None
    d = {"macs": call.out.numel * w.shape[-1]}
    if isinstance(call.arg(2, "bias"), TensorArg):
        d["other_flops"] = call.out.numel
    return d


def matmul_function(call: OpCall):
    """matmul, mm, bmm, @: numel(out) × contracted size (the last dim of the first operand)."""
    a = call.arg(0, "input")
    if call.out is None or not isinstance(a, TensorArg) or not a.shape:
        return None
    return {"macs": call.out.numel * a.shape[-1]}


def addmm_function(call: OpCall):
    """addmm(bias, a, b), baddbmm(bias, a, b): MACs of a @ b; the add is an other FLOP."""
    a = call.arg(1, "mat1")
    if a is None:
        a = call.kwargs.get("batch1")
    if call.out is None or not isinstance(a, TensorArg):
        return None
    return {"macs": call.out.numel * a.shape[-1], "other_flops": call.out.numel}


def einsum_function(call: OpCall):
    eq = call.arg(0, "equation")
    ops = call.tensors()
    if not isinstance(eq, str) or call.out is None or not ops:
        return None
    eq = eq.replace(" ", "")
    lhs, _, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ops):
        return None
    sizes: dict[str, int] = {}
    for term, t in zip(terms, ops):
        letters = [c for c in term if c.isalpha()]
        if "..." in term:  # letters align from both ends around the ellipsis
            head, tail = term.split("...")
            for c, s in zip(head, t.shape):
                sizes[c] = s
            for c, s in zip(reversed(tail), reversed(t.shape)):
                sizes[c] = s
        else:
            for c, s in zip(letters, t.shape):
                sizes[c] = s
    if not rhs and "->" not in eq:  # implicit output: letters that appear once, sorted
        counts = {c: lhs.count(c) for c in sizes}
        rhs = "".join(sorted(c for c, n in counts.items() if n == 1))
    summed = [c for c in sizes if c not in rhs]
    if len(ops) == 1:
        return {"other_flops": ops[0].numel}
    return {"macs": call.out.numel * math.prod(sizes[c] for c in summed)}


def sdpa_function(call: OpCall):
    q, k, v = call.arg(0, "query"), call.arg(1, "key"), call.arg(2, "value")
    if not all(isinstance(t, TensorArg) for t in (q, k, v)):
        return None
    batch = math.prod(call.out.shape[:-2]) if call.out is not None else math.prod(q.shape[:-2])
    L, E = q.shape[-2], q.shape[-1]
    S, Ev = k.shape[-2], v.shape[-1]
    return {"macs": batch * L * S * (E + Ev), "other_flops": 3 * batch * L * S}


def attention_macs(n: int, lq: int, lk: int, e: int, kdim: int, vdim: int) -> int:
    """MACs of multi-head attention with projections: n sequences, lq queries, lk keys, embedding e
    (the heads split e, so QKᵀ and AV cost n·lq·lk·e each whatever the number of heads)."""
    projections = n * lq * e * e + n * lk * kdim * e + n * lk * vdim * e + n * lq * e * e
    return projections + 2 * n * lq * lk * e


def mha_module(m: nn.MultiheadAttention, ins, out):
    if not ins:
        return None
    q = ins[0]
    k = ins[1] if len(ins) > 1 else q
    if len(q) == 2:  # unbatched (L, E)
        n, lq, lk = 1, q[0], k[0]
    elif m.batch_first:
        n, lq, lk = q[0], q[1], k[1]
    else:
        n, lq, lk = q[1], q[0], k[0]
    macs = attention_macs(n, lq, lk, m.embed_dim, m.kdim, m.vdim)
    other = 3 * n * m.num_heads * lq * lk
    if m.in_proj_bias is not None:
        other += n * (lq + 2 * lk) * m.embed_dim
    if m.out_proj.bias is not None:
        other += n * lq * m.embed_dim
    return {"macs": macs, "other_flops": other}


def tokens(shape: tuple, batch_first: bool) -> tuple[int, int]:
    """(batch, length) of an (L, N, E) / (N, L, E) / (L, E) sequence."""
    if len(shape) == 2:
        return 1, shape[0]
    return (shape[0], shape[1]) if batch_first else (shape[1], shape[0])


def encoder_layer_cost(m: nn.TransformerEncoderLayer, shape: tuple) -> tuple[int, int]:
    n, l = tokens(shape, m.self_attn.batch_first)
    sa = mha_module(m.self_attn, [shape, shape, shape], shape)
    ff_dim = m.linear1.out_features
    e = m.linear1.in_features
    macs = sa["macs"] + 2 * n * l * e * ff_dim
    # biases of the two linears, the activation, two LayerNorms, two residual adds
    other = sa["other_flops"] + n * l * (ff_dim + e) + n * l * ff_dim + 2 * (5 * n * l * e) + 2 * n * l * e
    return macs, other


def decoder_layer_cost(m: nn.TransformerDecoderLayer, tgt: tuple, memory: tuple) -> tuple[int, int]:
    n, lt = tokens(tgt, m.self_attn.batch_first)
    _, lm = tokens(memory, m.self_attn.batch_first)
    sa = mha_module(m.self_attn, [tgt, tgt, tgt], tgt)
    ca = mha_module(m.multihead_attn, [tgt, memory, memory], tgt)
    ff_dim, e = m.linear1.out_features, m.linear1.in_features
    macs = sa["macs"] + ca["macs"] + 2 * n * lt * e * ff_dim
    other = sa["other_flops"] + ca["other_flops"] + n * lt * (2 * ff_dim + e) + 3 * (5 * n * lt * e) + 3 * n * lt * e
    return macs, other


def encoder_layer_module(m, ins, out):
    macs, other = encoder_layer_cost(m, ins[0])
    return {"macs": macs, "other_flops": other}


def encoder_module(m: nn.TransformerEncoder, ins, out):
    macs = other = 0
    for layer in m.layers:
        a, b = encoder_layer_cost(layer, ins[0])
        macs, other = macs + a, other + b
    if m.norm is not None:
        other += 5 * math.prod(ins[0])
    return {"macs": macs, "other_flops": other}


def decoder_layer_module(m, ins, out):
    macs, other = decoder_layer_cost(m, ins[0], ins[1] if len(ins) > 1 else ins[0])
    return {"macs": macs, "other_flops": other}


def decoder_module(m: nn.TransformerDecoder, ins, out):
    macs = other = 0
    for layer in m.layers:
        a, b = decoder_layer_cost(layer, ins[0], ins[1] if len(ins) > 1 else ins[0])
        macs, other = macs + a, other + b
    if m.norm is not None:
        other += 5 * math.prod(ins[0])
    return {"macs": macs, "other_flops": other}


def transformer_module(m: nn.Transformer, ins, out):
    src, tgt = ins[0], ins[1] if len(ins) > 1 else ins[0]
    enc = encoder_module(m.encoder, [src], src)
    dec = decoder_module(m.decoder, [tgt, src], tgt)
    return {"macs": enc["macs"] + dec["macs"], "other_flops": enc["other_flops"] + dec["other_flops"]}


# -- element-wise, norms, pooling ------------------------------------------------------------------

def per_output_element(factor: int):
    """``factor`` other FLOPs per output element; usable as a module rule (module, input_shapes,
    output_shape) and as a function rule (call)."""
    def rule(*a):
        out = a[2] if len(a) == 3 else (a[0].out.shape if a[0].out is not None else None)
        return {"other_flops": factor * math.prod(out)} if out is not None else {}
    return rule


def per_input_element(factor: int = 1):
    def module_rule(m, ins, out):
        return {"other_flops": factor * math.prod(ins[0])} if ins else {}

    def function_rule(call: OpCall):
        ts = call.tensors()
        return {"other_flops": factor * ts[0].numel} if ts else {}
    return module_rule, function_rule


def free(*a):
    return {}


def pool_module(m, ins, out):
    nd = spatial_dims(m)
    k = ntuple(m.kernel_size, nd)
    return {"other_flops": math.prod(out) * math.prod(k)}


def pool_function(call: OpCall):
    if call.out is None:
        return None
    name = getattr(call.node.target, "__name__", "")
    nd = 3 if "3d" in name else 1 if "1d" in name else 2
    k = ntuple(call.arg(1, "kernel_size", 1), nd)
    return {"other_flops": call.out.numel * math.prod(k)}


def lrn_module(m, ins, out):
    return {"other_flops": (m.size + 3) * math.prod(out)}


def interp_cost(out_numel: int, mode: str, nd: int) -> int:
    return out_numel * (2 ** nd if mode in ("linear", "bilinear", "trilinear", "bicubic") else 1)


def upsample_module(m, ins, out):
    return {"other_flops": interp_cost(math.prod(out), m.mode, len(out) - 2)}


def interpolate_function(call: OpCall):
    if call.out is None:
        return None
    return {"other_flops": interp_cost(call.out.numel, call.arg(4, "mode", "nearest") or "nearest",
                                        len(call.out.shape) - 2)}


def swin_window_attention(call: OpCall):
    """torchvision's ``shifted_window_attention`` (kept opaque by ``torch.fx.wrap``)."""
    x, qkv_w, proj_w = call.arg(0, "input"), call.arg(1, "qkv_weight"), call.arg(2, "proj_weight")
    ws = call.arg(4, "window_size")
    heads = call.arg(5, "num_heads")
    if not (isinstance(x, TensorArg) and isinstance(qkv_w, TensorArg) and isinstance(ws, (list, tuple))
            and isinstance(heads, int)):
        return None
    b, h, w, c = x.shape
    ph = -(-h // ws[0]) * ws[0]
    pw = -(-w // ws[1]) * ws[1]
    tokens, n = b * ph * pw, ws[0] * ws[1]
    macs = tokens * c * qkv_w.shape[0] + 2 * tokens * n * c + tokens * c * proj_w.shape[0]
    other = 3 * tokens * heads * n + tokens * heads * n  # softmax + bias add
    return {"macs": macs, "other_flops": other}


def swin_attention_module(m, ins, out):
    """torchvision's ``ShiftedWindowAttention[V2]`` kept as a leaf: the same cost as the function,
    plus V2's continuous position-bias MLP over the (2·w₀−1)(2·w₁−1) relative-coordinate table."""
    b, h, w, c = ins[0]
    ws = m.window_size
    ph, pw = -(-h // ws[0]) * ws[0], -(-w // ws[1]) * ws[1]
    tokens, n = b * ph * pw, ws[0] * ws[1]
    macs = tokens * c * m.qkv.out_features + 2 * tokens * n * c + tokens * c * m.proj.out_features
    mlp = getattr(m, "cpb_mlp", None)
    if mlp is not None:
        table = (2 * ws[0] - 1) * (2 * ws[1] - 1)
        macs += sum(table * layer.in_features * layer.out_features for layer in mlp if isinstance(layer, nn.Linear))
    return {"macs": macs, "other_flops": 4 * tokens * m.num_heads * n}


def relative_mha_module(m, ins, out):
    """torchvision MaxViT's ``RelativePositionalMultiHeadAttention`` on [B, G, P, D]."""
    b, g, p, d = ins[0]
    inner = m.n_heads * m.head_dim
    macs = b * g * p * (d * 3 * inner + inner * d) + 2 * b * g * m.n_heads * p * p * m.head_dim
    return {"macs": macs, "other_flops": 4 * b * g * m.n_heads * p * p}
