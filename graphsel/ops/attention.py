"""Attention and transformer layers: costed (torchvision's published MACs convention), and
barriers for the channel analysis (an opaque mix of channels)."""
from __future__ import annotations

import torch.nn as nn

from graphsel.ops.costs import (decoder_layer_module, decoder_module, encoder_layer_module, encoder_module,
                                free, mha_module, relative_mha_module, sdpa_function, swin_attention_module,
                                swin_window_attention, transformer_module)
from graphsel.ops.table import OpSpec, register_op
from graphsel.ops.targets import functions_named


def _attention(cost) -> OpSpec:
    return OpSpec("attention", cost=cost, category="attention")


register_op(nn.MultiheadAttention, _attention(mha_module))
register_op(nn.TransformerEncoderLayer, _attention(encoder_layer_module))
register_op(nn.TransformerEncoder, _attention(encoder_module))
register_op(nn.TransformerDecoderLayer, _attention(decoder_layer_module))
register_op(nn.TransformerDecoder, _attention(decoder_module))
register_op(nn.Transformer, _attention(transformer_module))
register_op(functions_named("scaled_dot_product_attention"), _attention(sdpa_function))
# torchvision's window attention (wrapped functions and modules kept as leaves), by name
_TV = "torchvision.models"
register_op(f"{_TV}.swin_transformer.shifted_window_attention", _attention(swin_window_attention))
register_op([f"{_TV}.swin_transformer.ShiftedWindowAttention", f"{_TV}.swin_transformer.ShiftedWindowAttentionV2"],
            _attention(swin_attention_module))
register_op(f"{_TV}.maxvit.RelativePositionalMultiHeadAttention", _attention(relative_mha_module))
register_op([f"{_TV}.swin_transformer._get_relative_position_bias", f"{_TV}.swin_transformer._patch_merging_pad"],
            OpSpec("memory", cost=free, category="memory"))
