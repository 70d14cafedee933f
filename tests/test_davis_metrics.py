"""DAVIS J/F metrics against hand-computed cases and an independent distance-transform check."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import distance_transform_edt

from toto.errors import DataError
from toto.eval import davis


def rect(shape, r0, r1, c0, c1):
    m = np.zeros(shape, bool)
    m[r0:r1 + 1, c0:c1 + 1] = True
    return m


# ------------------------------------------------------------------ J

def test_iou_hand_computed():
    gt = rect((6, 6), 0, 1, 0, 3)        # 8 pixels
    pred = rect((6, 6), 0, 1, 2, 5)      # 8 pixels, 4 shared
    assert davis.iou(gt, pred) == pytest.approx(4 / 12)


def test_iou_empty_cases():
    z = np.zeros((4, 4), bool)
    assert davis.iou(z, z) == 1.0                          # both empty
    assert davis.iou(rect((4, 4), 0, 1, 0, 1), z) == 0.0   # missed object
    assert davis.iou(z, rect((4, 4), 0, 1, 0, 1)) == 0.0   # false alarm


def test_iou_void_pixels_are_ignored():
    gt = rect((6, 6), 0, 1, 0, 3)
    pred = rect((6, 6), 0, 1, 2, 5)
    void = rect((6, 6), 0, 5, 4, 5)  # hides the 4 false-positive pixels in columns 4-5
    assert davis.iou(gt, pred, void) == pytest.approx(4 / 8)
    # everything void: empty union -> 1
    assert davis.iou(gt, pred, np.ones((6, 6), bool)) == 1.0


# ------------------------------------------------------------------ boundaries

def test_seg2bmap_of_a_rectangle_is_the_ring_offset_towards_the_origin():
    # rows 2..4, cols 3..6 filled -> boundary is the perimeter of rows 1..4 x cols 2..6
    seg = rect((8, 10), 2, 4, 3, 6)
    b = davis.seg2bmap(seg)
    ring = rect((8, 10), 1, 4, 2, 6) & ~rect((8, 10), 2, 3, 3, 5)
    np.testing.assert_array_equal(b, ring)
    assert b.sum() == 2 * 3 + 2 * 4  # 2h + 2w


def test_boundary_tolerance():
    assert davis.boundary_tolerance((480, 854)) == 8    # ceil(0.008 * 979.6)
    assert davis.boundary_tolerance((10, 10)) == 1      # ceil(0.113)
    assert davis.boundary_tolerance((480, 854), bound_th=3) == 3  # >= 1 means pixels


def test_f_one_pixel_shift_within_tolerance_is_perfect():
    gt = rect((10, 10), 3, 6, 2, 5)
    pred = rect((10, 10), 3, 6, 3, 6)  # shifted right by one; tolerance 1 on a 10x10 image
    assert davis.f_measure(gt, pred) == pytest.approx(1.0)
    assert davis.iou(gt, pred) == pytest.approx(12 / 20)


def test_f_two_pixel_shift_hand_computed():
    # 5x5 boundary rings shifted by 2 columns; with a radius-1 disk 10 of 16 boundary pixels
    # match in each direction (top/bottom rows 4 of 5 each, near side 2 of 3, far side 0 of 3)
    gt = rect((20, 20), 5, 8, 5, 8)
    pred = rect((20, 20), 5, 8, 7, 10)
    assert davis.f_measure(gt, pred, bound_th=1) == pytest.approx(10 / 16)
    assert davis.f_measure(gt, pred, bound_th=2) == pytest.approx(1.0)


def test_f_empty_cases():
    z = np.zeros((12, 12), bool)
    obj = rect((12, 12), 2, 5, 2, 5)
    assert davis.f_measure(z, z) == 1.0
    assert davis.f_measure(obj, z) == 0.0
    assert davis.f_measure(z, obj) == 0.0


def _f_reference(gt, pred, radius):
    """Precision/recall by Euclidean distance to the other boundary (no dilation)."""
    gb, pb = davis.seg2bmap(gt), davis.seg2bmap(pred)
    d_to_g = distance_transform_edt(~gb)
    d_to_p = distance_transform_edt(~pb)
    p = (d_to_g[pb] <= radius).mean()
    r = (d_to_p[gb] <= radius).mean()
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


@pytest.mark.parametrize("seed", range(5))
def test_f_matches_distance_transform_reference_on_random_blobs(seed):
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    shape = (60, 90)  # tolerance ceil(0.008 * 108.2) = 1
    gt = gaussian_filter(rng.random(shape), 4) > 0.5
    pred = gaussian_filter(rng.random(shape), 4) > 0.5
    pred |= np.roll(gt, 2, axis=1)
    for th, radius in ((davis.BOUND_TH, 1), (3, 3), (5, 5)):
        assert davis.f_measure(gt, pred, bound_th=th) == pytest.approx(_f_reference(gt, pred, radius))


def test_f_void_pixels_are_zeroed_before_boundaries():
    gt = rect((20, 20), 4, 10, 4, 10)
    pred = gt | rect((20, 20), 4, 10, 11, 15)  # extra block to the right
    void = rect((20, 20), 0, 19, 11, 19)       # ... lying in void
    assert davis.f_measure(gt, pred, void) == pytest.approx(davis.f_measure(gt, gt))
    assert davis.f_measure(gt, pred) < 1.0


# ------------------------------------------------------------------ statistics

def test_statistics_hand_computed():
    m, r, d = davis.db_statistics([1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5])
    # edges round(linspace(1, 8, 5)) - 1 = [0, 2, 4, 5, 7]: first bin v[0:3], last v[5:8]
    assert (m, r, d) == pytest.approx((0.75, 0.5, 0.5))   # 0.5 is not > 0.5
    # ten frames 0..9: edges [0, 2, 5, 7, 9] -> mean(0,1,2) - mean(7,8,9) = -7
    assert davis.db_statistics(np.arange(10.0))[2] == pytest.approx(-7.0)


def test_evaluate_sequence_excludes_first_and_last_frames():
    T, H, W = 5, 12, 12
    gt = np.zeros((T, H, W), np.uint8)
    gt[:, 2:6, 2:6] = 1
    gt[:, 7:10, 7:10] = 2
    pred = gt.copy()
    pred[0] = 0          # first and last frames are wrong but not scored
    pred[-1] = 0
    pred[2, 7:10, 7:10] = 0  # object 2 missed in frame 2: J = 0, F = 0
    s = davis.evaluate_sequence("seq", gt, pred)
    assert s.j.shape == (2, 3)
    np.testing.assert_allclose(s.j, [[1, 1, 1], [1, 0, 1]])
    np.testing.assert_allclose(s.f, [[1, 1, 1], [1, 0, 1]])
    summ = s.summary()
    assert summ["J-Mean"] == pytest.approx((1 + 2 / 3) / 2)
    assert summ["J&F-Mean"] == pytest.approx((1 + 2 / 3) / 2)
    tot = davis.overall([s])
    assert tot["J-Recall"] == pytest.approx((1 + 2 / 3) / 2)
    assert tot["n_objects"] == 2


def test_evaluate_sequence_void_modes():
    gt = np.zeros((3, 10, 10), np.uint8)
    gt[:, 2:6, 2:6] = 1
    gt[:, 6:8, 2:6] = davis.VOID
    pred = np.zeros_like(gt)
    pred[:, 2:8, 2:6] = 1  # covers the object and the void band below it
    ign = davis.evaluate_sequence("s", gt, pred, void="ignore")
    bg = davis.evaluate_sequence("s", gt, pred, void="background")
    assert ign.j[0, 0] == pytest.approx(1.0)
    assert bg.j[0, 0] == pytest.approx(16 / 24)


def test_object_count_from_first_frame_and_shape_mismatch():
    gt = np.zeros((3, 8, 8), np.uint8)
    gt[0, 1:3, 1:3] = 3  # ids 1 and 2 absent: counted as empty objects (both-empty = 1)
    s = davis.evaluate_sequence("s", gt, gt.copy())
    assert s.j.shape == (3, 1)
    with pytest.raises(DataError, match="do not match"):
        davis.evaluate_sequence("s", gt, gt[:, :4])


def test_palette_png_round_trip(tmp_path):
    from PIL import Image

    pal = davis.davis_palette()
    assert tuple(pal[1]) == (128, 0, 0) and tuple(pal[2]) == (0, 128, 0) and tuple(pal[3]) == (128, 128, 0)
    labels = np.random.default_rng(0).integers(0, 4, (7, 9)).astype(np.uint8)
    davis.write_mask(tmp_path / "m.png", labels)
    with Image.open(tmp_path / "m.png") as im:
        assert im.mode == "P"
    np.testing.assert_array_equal(davis.read_mask(tmp_path / "m.png"), labels)
    Image.new("RGB", (4, 4)).save(tmp_path / "rgb.png")
    with pytest.raises(DataError, match="indexed"):
        davis.read_mask(tmp_path / "rgb.png")
