"""RoIAlign (He et al., Mask R-CNN) written once: torchvision's semantics without torchvision
(installing it would replace the pinned torch).

Same definition as ``torchvision.ops.roi_align(input, boxes, output_size, spatial_scale,
sampling_ratio, aligned)`` for a fixed ``sampling_ratio > 0``: each output bin averages
``sampling_ratio x sampling_ratio`` bilinear samples at the sub-bin centres; with ``aligned`` the
box is shifted by -0.5 pixel so that pixel centres sit at half-integers; samples more than one
pixel outside the map are 0, samples in [-1, 0] clamp to the border. Differentiable in the
features (gather + weights), vectorised over boxes and bins.
"""

from __future__ import annotations

import torch


def roi_align(features: torch.Tensor, rois: torch.Tensor, output_size: int | tuple[int, int],
              spatial_scale: float = 1.0, sampling_ratio: int = 2, aligned: bool = True) -> torch.Tensor:
    """``features: (B, C, H, W)``, ``rois: (K, 5)`` rows ``[batch index, x1, y1, x2, y2]`` in input
    coordinates -> ``(K, C, ph, pw)``."""
    if sampling_ratio < 1:
        raise ValueError("sampling_ratio must be >= 1 (the adaptive mode is not supported)")
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else output_size
    B, C, H, W = features.shape
    K = rois.shape[0]
    if K == 0:
        return features.new_zeros((0, C, ph, pw))
    rois = rois.to(features.dtype)
    offset = 0.5 if aligned else 0.0
    x1, y1 = rois[:, 1] * spatial_scale - offset, rois[:, 2] * spatial_scale - offset
    x2, y2 = rois[:, 3] * spatial_scale - offset, rois[:, 4] * spatial_scale - offset
    rw, rh = x2 - x1, y2 - y1
    if not aligned:
        rw, rh = rw.clamp(min=1.0), rh.clamp(min=1.0)
    g = sampling_ratio
    # sample coordinates: (K, ph * g) rows and (K, pw * g) columns
    fy = (torch.arange(ph, device=features.device, dtype=features.dtype)[:, None]
          + (torch.arange(g, device=features.device, dtype=features.dtype)[None, :] + 0.5) / g).reshape(-1)
    fx = (torch.arange(pw, device=features.device, dtype=features.dtype)[:, None]
          + (torch.arange(g, device=features.device, dtype=features.dtype)[None, :] + 0.5) / g).reshape(-1)
    ys = y1[:, None] + fy[None, :] * (rh / ph)[:, None]  # (K, ph*g)
    xs = x1[:, None] + fx[None, :] * (rw / pw)[:, None]  # (K, pw*g)

    def axis(v: torch.Tensor, size: int):
        valid = (v >= -1.0) & (v <= size)
        v = v.clamp(min=0)
        low = v.floor().long()
        edge = low >= size - 1
        low = torch.where(edge, torch.full_like(low, size - 1), low)
        high = torch.where(edge, low, low + 1)
        v = torch.where(edge, low.to(v.dtype), v)
        frac = v - low.to(v.dtype)
        return low, high, frac, valid

    yl, yh, ly, vy = axis(ys, H)
    xl, xh, lx, vx = axis(xs, W)
    fmap = features[rois[:, 0].long()]  # (K, C, H, W)
    flat = fmap.reshape(K, C, H * W)

    def gather(yi, xi):  # (K, ph*g), (K, pw*g) -> (K, C, ph*g, pw*g)
        idx = (yi[:, :, None] * W + xi[:, None, :]).reshape(K, 1, -1).expand(K, C, -1)
        return flat.gather(2, idx).reshape(K, C, yi.shape[1], xi.shape[1])

    wy_l, wy_h = (1 - ly)[:, None, :, None], ly[:, None, :, None]
    wx_l, wx_h = (1 - lx)[:, None, None, :], lx[:, None, None, :]
    val = (wy_l * wx_l * gather(yl, xl) + wy_l * wx_h * gather(yl, xh)
           + wy_h * wx_l * gather(yh, xl) + wy_h * wx_h * gather(yh, xh))
    val = val * (vy[:, None, :, None] & vx[:, None, None, :]).to(val.dtype)
    return val.reshape(K, C, ph, g, pw, g).mean(dim=(3, 5))
