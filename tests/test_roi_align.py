"""RoIAlign against a scalar transcription of its definition (torchvision's CPU kernel, one sample at
a time) and a hand computation on a linear ramp."""

from __future__ import annotations

import math

import pytest
import torch

from toto.eval.roi_align import roi_align


def _bilinear(f, y, x):
    H, W = f.shape
    if y < -1.0 or y > H or x < -1.0 or x > W:
        return 0.0
    y, x = max(y, 0.0), max(x, 0.0)
    yl, xl = int(y), int(x)
    if yl >= H - 1:
        yh = yl = H - 1
        y = float(yl)
    else:
        yh = yl + 1
    if xl >= W - 1:
        xh = xl = W - 1
        x = float(xl)
    else:
        xh = xl + 1
    ly, lx = y - yl, x - xl
    hy, hx = 1 - ly, 1 - lx
    return hy * hx * f[yl, xl] + hy * lx * f[yl, xh] + ly * hx * f[yh, xl] + ly * lx * f[yh, xh]


def _reference(feat, rois, out, scale, g, aligned):
    K, C = rois.shape[0], feat.shape[1]
    res = torch.zeros(K, C, out, out, dtype=torch.float64)
    off = 0.5 if aligned else 0.0
    for k in range(K):
        b, x1, y1, x2, y2 = rois[k].tolist()
        sx, sy = x1 * scale - off, y1 * scale - off
        w, h = x2 * scale - off - sx, y2 * scale - off - sy
        if not aligned:
            w, h = max(w, 1.0), max(h, 1.0)
        bw, bh = w / out, h / out
        for c in range(C):
            f = feat[int(b), c].double()
            for py in range(out):
                for px in range(out):
                    acc = 0.0
                    for iy in range(g):
                        y = sy + py * bh + (iy + 0.5) * bh / g
                        for ix in range(g):
                            x = sx + px * bw + (ix + 0.5) * bw / g
                            acc += float(_bilinear(f, y, x))
                    res[k, c, py, px] = acc / (g * g)
    return res


@pytest.mark.parametrize("aligned", [True, False])
def test_matches_scalar_reference_including_borders(aligned):
    torch.manual_seed(0)
    feat = torch.randn(2, 3, 7, 9, dtype=torch.float64)
    rois = torch.tensor([[0, 1.0, 2.0, 20.0, 11.0],  # inside (scale 0.5 -> feature coords)
                         [1, -3.0, -1.5, 6.0, 4.0],  # over the top-left border
                         [1, 14.0, 10.0, 19.5, 16.0],  # over the bottom-right border
                         [0, 30.0, 30.0, 40.0, 40.0],  # far outside: zeros
                         [1, 5.0, 5.0, 5.2, 5.1]], dtype=torch.float64)  # tiny box
    for g in (1, 2, 3):
        got = roi_align(feat, rois, 3, spatial_scale=0.5, sampling_ratio=g, aligned=aligned)
        assert torch.allclose(got, _reference(feat, rois, 3, 0.5, g, aligned), atol=1e-12)
    assert got[3].abs().max() == 0


def test_linear_ramp_by_hand_and_gradient():
    # f(y, x) = x on a 6 x 8 map; a box from x=a to x=b inside the map (aligned): bin centres sit at
    # a - 0.5 + (p + 0.5) (b - a) / P, and bilinear sampling is exact on a linear function.
    feat = torch.arange(8, dtype=torch.float64).expand(1, 1, 6, 8).clone().requires_grad_(True)
    a, b, P = 2.0, 6.0, 4
    out = roi_align(feat, torch.tensor([[0, a, 1.0, b, 4.0]], dtype=torch.float64), P, sampling_ratio=2)
    expect = [a - 0.5 + (p + 0.5) * (b - a) / P for p in range(P)]
    assert torch.allclose(out[0, 0], torch.tensor(expect, dtype=torch.float64).expand(P, P))
    out.sum().backward()
    # every output bin averages weights summing to 1: total gradient = number of bins
    assert math.isclose(feat.grad.sum().item(), P * P)
