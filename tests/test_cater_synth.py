"""CATER-style scenes: the label and the rendered pixels checked independently of the generator."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from toto.data.cater import cell_of
from toto.synth.cater import EXTENT, SNITCH_BALL, SceneConfig, generate, plan_scene, render_scene


def gold_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels of the snitch's gold (hue ~51 deg, saturated) by plain HSV thresholds; the scenes
    used below hold no yellow object, the only other colour near that hue."""
    x = rgb.astype(np.float64)
    mx, mn = x.max(-1), x.min(-1)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1), 0)
    hue = 60 * (g - b) / np.maximum(mx - mn, 1e-9)
    return (r == mx) & (g >= b) & (hue >= 38) & (hue <= 62) & (sat >= 0.5) & (mx >= 60)


def no_yellow(plan) -> bool:
    return all(o.color != "yellow" for o in plan.objects)


def ray_to_plane(px: float, py: float, cam: np.ndarray, w: int, h: int, fovy: float, z: float) -> np.ndarray:
    """Back-project pixel (px, py) of a pinhole camera at ``cam`` looking at the origin (world z
    up) onto the plane of height ``z``."""
    f = -cam / np.linalg.norm(cam)
    right = np.cross(f, [0, 0, 1.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, f)
    focal = (h / 2) / math.tan(math.radians(fovy) / 2)
    d = f + ((px + 0.5 - w / 2) / focal) * right - ((py + 0.5 - h / 2) / focal) * up
    t = (z - cam[2]) / d[2]
    return cam + t * d


def test_snitch_pixels_back_projected_give_the_label():
    cfg = SceneConfig(frames=2, width=192, height=144)
    for i in range(40):
        plan, cam = plan_scene([7, i], cfg)
        x, y = plan.pos[0, -1, :2]
        margin = min(abs(v - round(v)) for v in (x, y))
        if not no_yellow(plan) or margin < 0.15 or plan.snitch_cover()[-1] is not None:
            continue
        frames, meta = render_scene(plan, cam, cfg)
        mask = gold_mask(frames[-1])
        if mask.sum() < 25:  # hidden behind another object at the end: try the next scene
            continue
        ys, xs = np.nonzero(mask)
        p = ray_to_plane(xs.mean(), ys.mean(), np.array(meta["camera"]["positions"][-1]), cfg.width,
                         cfg.height, meta["camera"]["fovy"], SNITCH_BALL)
        assert math.hypot(p[0] - x, p[1] - y) < 0.12  # the gold blob sits where the scene says
        label = (math.floor(p[1]) + 3) * 6 + (math.floor(p[0]) + 3)  # CATER's localize class, by hand
        assert meta["label"] == label
        assert meta["snitch_visible_last"] and meta["container_last"] is None
        return
    pytest.fail("no scene with a clearly visible snitch among 40")


def test_a_covered_snitch_is_invisible_and_reappears_after_release():
    cfg = SceneConfig(frames=24, width=128, height=96)
    for i in range(60):
        plan, cam = plan_scene([3, i], cfg)
        cover = plan.snitch_cover()
        ids = np.linspace(0, cfg.scene_frames, cfg.frames).round().astype(int)
        covered = [cover[f] is not None for f in ids]
        released = [k for k in range(1, len(ids)) if covered[k - 1] and not covered[k]]
        if not no_yellow(plan) or not released:
            continue
        frames, meta = render_scene(plan, cam, cfg)
        after = [k for k in range(released[0], len(ids)) if not covered[k] and meta["snitch_pixels"][k] > 15]
        if not after:
            continue
        assert meta["snitch_covered"] == covered and meta["containment_events"] >= 1
        for k in np.nonzero(covered)[0]:
            assert gold_mask(frames[k]).sum() == 0, f"gold pixels while covered, frame {k}"
            c = cover[ids[k]]  # the covering cone stands right over the snitch
            assert np.allclose(plan.pos[c, ids[k], :2], plan.pos[0, ids[k], :2], atol=1e-6)
        assert gold_mask(frames[after[0]]).sum() > 3  # visible again once the cone is lifted away
        return
    pytest.fail("no scene with a release among 60")


def test_plans_follow_cater_rules():
    cfg = SceneConfig(max_motions=2)
    for i in range(20):
        plan, cam = plan_scene([11, i], cfg)
        assert plan.objects[0].shape == "spl" and plan.objects[1].shape == plan.objects[2].shape == "cone"
        assert 5 <= len(plan.objects) <= 10
        assert (np.abs(plan.pos[..., :2]) <= EXTENT + 1e-9).all()
        on_floor = np.isclose(plan.pos[..., 2], [[o.z] for o in plan.objects])
        assert ((plan.pos[..., 2] >= np.array([[o.z] for o in plan.objects]) - 1e-9) | on_floor).all()
        for c, t, land, _ in plan.covered:  # only cones cover, and only smaller things
            assert plan.objects[c].shape == "cone" and plan.objects[c].sized > plan.objects[t].sized
        for moves in plan.movements.values():
            for name, _, s, e in moves:
                assert name in ("_slide", "_pick_place", "_rotate", "_contain") and 20 <= e - s <= 30
        assert np.allclose(cam, cam[0])  # static camera
        x, y = plan.pos[0, -1, :2]
        assert 0 <= cell_of(x, y) < 36
    moving = plan_scene([11, 0], SceneConfig(camera="moving", max_motions=2))[1]
    assert np.allclose(moving[0], plan_scene([11, 0], cfg)[1][0])  # starts where the static one stands
    k = moving[30]  # first keyframe: x or y at +-10, height 8, 10 or 12
    assert (np.isclose(np.abs(k[:2]), 10).sum() == 1) and k[2] in (8, 10, 12)


def test_generation_is_deterministic_and_resumes(tmp_path):
    import av

    cfg = SceneConfig(frames=4, width=48, height=48)
    a, b = tmp_path / "a", tmp_path / "b"
    s1 = generate(a, 3, cfg, seed=5, progress=False)
    assert s1["rendered_now"] == 3 and s1["frames_per_s"] > 0
    # a run killed while writing clip 1: its scene JSON was never written, a temp file is left
    (b / "scenes").mkdir(parents=True)
    generate(b, 1, cfg, seed=5, progress=False)
    generate(b, 3, cfg, seed=5, progress=False)
    (b / "scenes" / "CATER_new_000002.json").unlink()
    (b / "videos" / "CATER_new_000002.avi").write_bytes(b"half")
    (b / "videos" / "CATER_new_000002.avi.tmp").write_bytes(b"junk")
    s2 = generate(b, 3, cfg, seed=5, progress=False)
    assert s2["rendered_now"] == 1 and s2["already_done"] == 2
    for i in range(3):
        name = f"CATER_new_{i:06d}"
        ja, jb = (json.loads((d / "scenes" / f"{name}.json").read_text()) for d in (a, b))
        assert ja == jb
        with av.open(str(a / "videos" / f"{name}.avi")) as ca, av.open(str(b / "videos" / f"{name}.avi")) as cb:
            fa = [f.to_ndarray(format="rgb24") for f in ca.decode(video=0)]
            fb = [f.to_ndarray(format="rgb24") for f in cb.decode(video=0)]
        assert len(fa) == 4 and all(np.array_equal(x, y) for x, y in zip(fa, fb))
    lists = {s: (a / "lists" / "localize" / f"{s}.txt").read_text().splitlines() for s in ("train", "val")}
    rows = sorted(lists["train"] + lists["val"])
    assert [r.split()[0] for r in rows] == [f"CATER_new_{i:06d}.avi" for i in range(3)]
    for r in rows:
        meta = json.loads((a / "scenes" / (r.split()[0][:-4] + ".json")).read_text())
        assert int(r.split()[1]) == meta["label"]
    assert (b / "lists" / "localize" / "train.txt").read_text() == (a / "lists" / "localize" / "train.txt").read_text()


def test_cli_bad_input(tmp_path, capsys):
    from toto.cli import main

    assert main(["synth", "cater", "--out", str(tmp_path / "x"), "--videos", "0"]) == 2
    assert "--videos" in capsys.readouterr().err
    generate(tmp_path / "y", 1, SceneConfig(frames=2, width=32, height=32), progress=False)
    args = ["synth", "cater", "--out", str(tmp_path / "y"), "--videos", "1", "--width", "32", "--height", "32",
            "--no-progress"]
    assert main([*args, "--frames", "3"]) == 2  # other settings than the folder's generation
    assert "(frames)" in capsys.readouterr().err
    assert main([*args, "--frames", "2"]) == 0  # the same settings: nothing left to render
    assert "1 already there" in capsys.readouterr().out
    # no usable GL backend: one line naming MUJOCO_GL (mujoco reads it at import: a fresh process)
    code = "import sys; from toto.cli import main; sys.exit(main(sys.argv[1:]))"
    r = subprocess.run([sys.executable, "-c", code, *args, "--frames", "2", "--out", str(tmp_path / "z")],
                       capture_output=True, text=True, env={**os.environ, "MUJOCO_GL": "no-such-backend"}, timeout=120)
    assert r.returncode == 2 and "MUJOCO_GL" in r.stderr and "Traceback" not in r.stderr
