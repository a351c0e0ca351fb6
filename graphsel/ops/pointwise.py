"""Element-wise operators: activations, unary and binary arithmetic, dropout, copies and dtype
conversions, softmax. Unary ones carry the channel ids (materialize may gather in front of them);
binary ones union the ids of the operands they align."""
from __future__ import annotations

import operator

import torch.nn as nn

from graphsel.ops import channel as ch
from graphsel.ops.costs import free, per_output_element
from graphsel.ops.slicing import slice_prelu
from graphsel.ops.table import OpSpec, register_op
from graphsel.ops.targets import functions_named, named


def _unary(name: str, cost=None, category: str = "unknown", families: tuple[str, ...] = ()) -> OpSpec:
    return OpSpec(name, ch.carry_rule, cost=cost, category=category, chain=True, families=families)


_ACTIVATION = dict(cost=per_output_element(1), category="activation")
_ELEMENTWISE = dict(cost=per_output_element(1), category="elementwise")

# -- activations: modules, and the functions and methods of the same name ------------------------
_ACTIVATIONS = {  # family -> module classes, function / method names
    "relu": ((nn.ReLU,), ("relu", "relu_")),
    "relu6": ((nn.ReLU6,), ("relu6",)),
    "hardswish": ((nn.Hardswish,), ("hardswish", "hardswish_")),
    "silu": ((nn.SiLU,), ("silu", "silu_")),
    "gelu": ((nn.GELU,), ("gelu",)),
    "sigmoid": ((nn.Sigmoid,), ("sigmoid", "sigmoid_")),
    "": ((nn.Tanh, nn.Hardsigmoid, nn.Hardtanh, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus,
          nn.Softsign, nn.Tanhshrink, nn.Threshold, nn.LogSigmoid),
         ("tanh", "tanh_", "hardsigmoid", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "elu", "elu_",
          "selu", "selu_", "celu", "celu_", "mish", "softplus", "softsign", "logsigmoid", "tanhshrink",
          "threshold", "threshold_")),
}
for _family, (_modules, _names) in _ACTIVATIONS.items():
    _spec = _unary(_family or "activation", families=(_family,) if _family else (), **_ACTIVATION)
    register_op(list(_modules), _spec)
    register_op(named(*_names), _spec)
# activations that change the shape or hold parameters the analysis does not follow: costed only
register_op([nn.RReLU, nn.GLU, nn.Hardshrink, nn.Softshrink] + named("glu", "prelu", "rrelu"),
            OpSpec("activation", **_ACTIVATION))


def _prelu(cx, node, m: nn.PReLU, args, kwargs):
    rule = ch.per_channel(1 if m.num_parameters > 1 else None, slot=m.num_parameters > 1)
    return rule(cx, node, m, args, kwargs)


register_op(nn.PReLU, OpSpec("prelu", _prelu, params=("weight",), slice=slice_prelu, **_ACTIVATION))

# -- unary arithmetic -------------------------------------------------------------------------------
register_op(named("neg", "sqrt", "rsqrt", "exp", "exp_", "log", "log_", "abs", "abs_", "clamp", "clamp_", "clip",
                  "clip_", "clamp_min", "clamp_min_", "clamp_max", "sign", "erf", "sin", "cos", "reciprocal",
                  "square", "square_", "logical_not", "invert", "not_") + [operator.pos],
            _unary("elementwise", **_ELEMENTWISE))
register_op(named("floor", "ceil", "round", "nan_to_num"), _unary("rounding", **_ELEMENTWISE))

# -- dropout (eval: the identity), copies, dtype and device conversions, fills ------------------------
_dropout = _unary("dropout", cost=free, category="view", families=("dropout",))
register_op([nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout], _dropout)
register_op(named("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "dropout_"), _dropout)
register_op([nn.FeatureAlphaDropout] + functions_named("feature_alpha_dropout"),
            _unary("dropout", cost=free, category="view"))
register_op(nn.Identity, _unary("identity", cost=free, category="view"))
register_op(nn.modules.dropout._DropoutNd, OpSpec("dropout", cost=free, category="view"))   # other subclasses
register_op(named("detach", "type"), _unary("view", cost=free, category="view"))
register_op(named("clone", "contiguous", "zeros_like", "ones_like", "empty_like", "full_like", "rand_like",
                  "randn_like", "to", "float", "half", "double", "bfloat16", "type_as", "zero_", "fill_"),
            _unary("copy", cost=free, category="memory"))
register_op(["requires_grad_", "cpu", "cuda", "mul_scalar", "softmax_"], _unary("identity_method"))

# -- binary (n-ary) element-wise: operands aligned position by position -------------------------------
_binary = OpSpec("elementwise", ch.elementwise_rule, **_ELEMENTWISE)
register_op(named("sub", "sub_", "isub", "rsub", "subtract", "div", "div_", "truediv", "itruediv", "true_divide",
                  "divide", "floordiv", "floor_divide", "pow", "pow_", "where", "masked_fill", "masked_fill_",
                  "maximum", "minimum", "lerp", "lerp_", "addcmul", "addcmul_", "addcdiv", "fmod", "remainder", "mod",
                  "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "bitwise_and", "bitwise_or",
                  "and_", "or_", "xor", "__and__", "__or__", "multiply"), _binary)
register_op(named("add", "add_", "iadd"), OpSpec("add", ch.elementwise_rule, families=("add",), **_ELEMENTWISE))
register_op(named("mul", "mul_", "imul"), OpSpec("mul", ch.elementwise_rule, families=("mul",), **_ELEMENTWISE))
register_op("copy_", OpSpec("copy_", ch.elementwise_rule, cost=free, category="memory"))
register_op(["torchvision.ops.stochastic_depth.stochastic_depth"], _unary("stochastic_depth", **_ELEMENTWISE))

# -- softmax --------------------------------------------------------------------------------------------
_SOFTMAX = dict(cost=per_output_element(3), category="activation")
register_op([nn.Softmax, nn.LogSoftmax, nn.Softmin] + named("softmax", "log_softmax"),
            OpSpec("softmax", ch.softmax_rule, **_SOFTMAX))
register_op([nn.Softmax2d] + functions_named("softmin"), OpSpec("softmax", **_SOFTMAX))
