"""Sub-pixel spatial shifts with replicate borders, per channel.

Convention: shifting a map ``x`` (H×W) by ``b = (b_x, b_y)`` pixels samples it at ``p + b``:
``out[y, x] = x̃(y + b_y, x + b_x)`` where ``x̃`` is ``x`` extended by replicating its border
pixels and read with bilinear interpolation. The shift is exactly ``b`` pixels on every H×W
map (square or not), integer shifts are copies (bit-exact in the export form, to float rounding
in the training form), and the result is differentiable in ``x`` and in ``b``.

Two equivalent forms:

* :func:`bilinear_shift` (training): ``grid_sample(mode="bilinear", padding_mode="border",
  align_corners=True)`` on a grid built in pixel units (border padding clamps the sampling
  coordinate, which for bilinear reads is the same as replicating the border pixels).
* :func:`shift_kernels` (export): the same operation as a depthwise convolution over a
  replicate-padded map (two taps per axis), used by the static lowering.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def bilinear_shift(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Shift each channel of ``x`` (N×S×H×W) by ``shift[s] = (b_x, b_y)`` pixels (S×2), see the
    module docstring for the convention. One ``grid_sample`` call (bilinear, border padding,
    ``align_corners=True``) with the channels as its batch (one grid per channel, shared by the N
    samples); the grid is built in pixel units, so the shift is ``b`` pixels along each axis whatever
    the map's aspect ratio."""
    if x.dim() != 4:
        raise ValueError(f"bilinear_shift expects an N×C×H×W tensor, got shape {tuple(x.shape)}")
    n, s, h, w = x.shape
    if shift.shape != (s, 2):
        raise ValueError(f"shift must have shape ({s}, 2), got {tuple(shift.shape)}")
    if s == 0 or n == 0:
        return x
    b = shift.to(x.dtype)
    gx = (torch.arange(w, device=x.device, dtype=x.dtype).unsqueeze(0) + b[:, 0:1]) * (2.0 / max(w - 1, 1)) - 1.0
    gy = (torch.arange(h, device=x.device, dtype=x.dtype).unsqueeze(0) + b[:, 1:2]) * (2.0 / max(h - 1, 1)) - 1.0
    grid = torch.stack((gx.unsqueeze(1).expand(s, h, w), gy.unsqueeze(2).expand(s, h, w)), dim=-1)
    out = F.grid_sample(x.transpose(0, 1), grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.transpose(0, 1)


def _taps(b: float) -> tuple[int, float]:
    whole = math.floor(b)
    return whole, b - whole


def kernel_radius(shift: torch.Tensor) -> tuple[int, int]:
    """``(r_y, r_x)``: the smallest padding such that every shift's taps fit in a (2r+1) window."""
    def radius(values) -> int:
        r = 0
        for b in values:
            whole, frac = _taps(float(b))
            r = max(r, abs(whole), abs(whole + 1) if frac > 0 else 0)
        return r
    return radius(shift[:, 1].tolist()), radius(shift[:, 0].tolist())


def shift_kernels(shift: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """Depthwise kernels (S×1×(2r_y+1)×(2r_x+1)) and the padding ``(r_y, r_x)`` such that
    ``conv2d(pad(x, replicate), kernels, groups=S)`` equals :func:`bilinear_shift` ``(x, shift)``."""
    shift = shift.detach().double().cpu()
    ry, rx = kernel_radius(shift)
    s = shift.shape[0]
    ky = torch.zeros(s, 2 * ry + 1, dtype=torch.float64)
    kx = torch.zeros(s, 2 * rx + 1, dtype=torch.float64)
    for i, (bx, by) in enumerate(shift.tolist()):
        for k, b, r in ((kx, bx, rx), (ky, by, ry)):
            whole, frac = _taps(b)
            k[i, whole + r] += 1.0 - frac
            if frac > 0:
                k[i, whole + 1 + r] += frac
    kernels = (ky.unsqueeze(2) * kx.unsqueeze(1)).unsqueeze(1)
    return kernels.to(dtype or torch.float32), (ry, rx)
