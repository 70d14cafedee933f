"""CATER-style scenes (Girdhar & Ramanan, ICLR 2020) planned in numpy and rendered with MuJoCo.

The paper evaluates object permanence on CATER's snitch localisation (arXiv 2501.05453, Sec. 4,
"object permanence"); the real release is a 15+ GB download, so this module makes scenes of the
same kind on any machine. What follows CATER's generator (github.com/rohitgirdhar/CATER,
``generate/``):

- objects: 5-10 per scene; object 0 is the golden snitch ("spl", size 0.3, metal), object 1 a
  medium cone, object 2 a large cone, the rest random among cube / sphere / cylinder / cone,
  sizes large 0.75 / medium 0.5 / small 0.25 (a cube's half-size is divided by sqrt 2), the 8
  CLEVR colours, rubber or metal; dropped uniformly on [-3, 3]^2 at least 0.25 apart;
- time: a scene lasts ``scene_frames`` (CATER: 300) frames cut into segments; in each either
  one "contain" is tried (a cone with nothing inside is picked-and-placed over a smaller cone,
  sphere or the snitch, which then moves with it) together with other objects' moves, or a
  set of single-object moves (all objects, or at most ``max_motions``: CATER's "max2action");
  a move lasts 20-30 frames and starts 0-10 frames into the segment;
- actions: slide to a uniform point of [-3, 3]^2; pick-place (lift by 2, carry, put down; 20%
  / 60% / 20% of the move); rotate (90 degrees; not for cones and spheres); a stack (a cone
  with what it covers) slides as a whole, or its top cone is picked-and-placed away, which
  releases what it covered; moves that would bring two objects closer than 0.25 are redrawn
  (100 tries, then the object stays);
- camera: CLEVR's camera (7.36, -6.93, 4.96) jittered by +-0.5 per axis, looking at the
  origin; the moving camera goes every 30 frames to x or y = +-10 at a height of 8, 10 or 12;
- label: the 6x6 grid of unit cells over [-3, 3]^2: ``(floor(y) + 3) * 6 + floor(x) + 3`` at the
  snitch's final position (CATER's ``localize`` list), written as ``CATER_new_000042.avi 17``.

Approximations (MuJoCo primitives instead of CATER's Blender meshes): the snitch is a gold ball
with two flat wings; a cone is a 24-sided mesh of base radius r and height 2r; a cylinder has
radius r and half-height r; rotation is about the vertical axis; only objects that fit inside a
cone geometrically are contained (a sphere at most half the cone's size).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..data.cater import cell_of
from ..errors import ConfigError, TotoError

EXTENT = 3.0  # objects live on [-EXTENT, EXTENT]^2
MIN_DIST = 0.25
MOVE_MIN, MOVE_MAX = 20, 30
PICK_HEIGHT = 2.0
MAX_TRIALS = 100
CAMERA_BASE = (7.36, -6.93, 4.96)
CAMERA_JITTER = 0.5
CAMERA_SHIFT = 30  # scene frames between moving-camera keyframes
FOVY = 37.9  # vertical field of view of CLEVR's 35 mm lens on a 32 mm sensor at 4:3

COLORS = {
    "gray": (87, 87, 87), "red": (173, 35, 35), "blue": (42, 75, 215), "green": (29, 105, 20),
    "brown": (129, 74, 25), "purple": (129, 38, 192), "cyan": (41, 208, 208), "yellow": (255, 238, 51),
}
SNITCH_RGB = (255, 215, 0)
SIZES = {"large": 0.75, "medium": 0.5, "small": 0.25}
SHAPES = ("cube", "sphere", "cylinder", "cone")
MATERIALS = ("rubber", "metal")
SNITCH_SIZE = 0.3
SNITCH_BALL = 0.22  # radius of the snitch's ball; it rests on the floor


@dataclass
class SceneConfig:
    frames: int = 32  # rendered frames per video, evenly spread over the scene
    scene_frames: int = 300  # CATER's timeline; moves last 20-30 of these frames
    camera: str = "static"
    width: int = 320
    height: int = 240
    min_objects: int = 5
    max_objects: int = 10
    max_motions: int | None = None  # None: every object may move in a segment (CATER's all_actions)
    fps: int = 24

    def __post_init__(self):
        if self.camera not in ("static", "moving"):
            raise ConfigError(f"--camera must be static or moving, got {self.camera!r}")
        if self.frames < 2:
            raise ConfigError(f"--frames must be >= 2, got {self.frames}")
        if self.scene_frames < MOVE_MAX + 10:
            raise ConfigError(f"--scene-frames must be >= {MOVE_MAX + 10}, got {self.scene_frames}")
        if self.width < 16 or self.height < 16 or self.width % 2 or self.height % 2:
            raise ConfigError(f"--width/--height must be even and >= 16, got {self.width}x{self.height}")
        if not 3 <= self.min_objects <= self.max_objects:
            raise ConfigError(f"need 3 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if self.max_motions is not None and self.max_motions < 1:
            raise ConfigError(f"--max-motions must be >= 1, got {self.max_motions}")

    def to_dict(self) -> dict:
        return asdict(self)


# -- planning -----------------------------------------------------------------------------------

@dataclass
class Obj:
    shape: str
    size: str
    sized: float  # CATER's collision radius (and, here, the half-extent)
    color: str
    rgb: tuple
    material: str
    yaw: float
    instance: str

    @property
    def z(self) -> float:
        return SNITCH_BALL if self.shape == "spl" else self.sized


class Plan:
    """Positions ``(n_objects, scene_frames + 1, 3)`` and yaws of every object, the movements, and
    which objects cover which (``groups``: lists of object ids, the outermost cone first)."""

    def __init__(self, objects: list[Obj], xy: np.ndarray, cfg: SceneConfig, rng: np.random.Generator):
        self.objects, self.cfg, self.rng = objects, cfg, rng
        T = cfg.scene_frames + 1
        z = np.array([o.z for o in objects])
        self.pos = np.repeat(np.concatenate([xy, z[:, None]], 1)[:, None], T, 1)  # (n, T, 3)
        self.yaw = np.repeat(np.array([o.yaw for o in objects])[:, None], T, 1)  # (n, T) degrees
        self.sizes = np.array([o.sized for o in objects])
        self.groups: list[list[int]] = [[i] for i in range(len(objects))]
        self.movements: dict[str, list] = {o.instance: [] for o in objects}
        self.covered: list[tuple] = []  # (container, covered top object, landing frame, snitch under it)
        self.released: list[tuple[int, int]] = []  # (lifted container, lift start frame)

    # trajectories of one object over frames s..e (inclusive), then held to the end
    def _interp(self, p0, p1, s: int, e: int) -> np.ndarray:
        w = np.linspace(0.0, 1.0, e - s + 1)[:, None] if e > s else np.ones((1, 1))
        return (1 - w) * np.asarray(p0, float) + w * np.asarray(p1, float)

    def _slide(self, p0, x, y, s, e):
        return self._interp(p0, (x, y, p0[2]), s, e)

    def _pick_place(self, p0, x, y, s, e):
        n = e - s + 1
        e1, e2 = s + int(0.2 * n), s + int(0.8 * n)
        up = self._interp(p0, (p0[0], p0[1], p0[2] + PICK_HEIGHT), s, e1)
        carry = self._interp(up[-1], (x, y, up[-1][2]), e1 + 1, e2)
        down = self._interp(carry[-1], (x, y, p0[2]), e2 + 1, e)
        return np.concatenate([up, carry, down])[:n]

    def _clear(self, trajs: dict[int, np.ndarray], s: int, e: int, others: list[int]) -> bool:
        """Do the objects in ``trajs`` (planned over s..e, then held) keep MIN_DIST from ``others``
        from frame s to the end?"""
        if not others:
            return True
        T = self.pos.shape[1]
        other = self.pos[others, s:]  # (k, T - s, 3)
        for i, tr in trajs.items():
            full = np.concatenate([tr, np.repeat(tr[-1:], T - 1 - e, 0)])  # (T - s, 3)
            d = np.linalg.norm(other - full[None], axis=-1) - self.sizes[others, None] - self.sizes[i]
            if (d < MIN_DIST).any():
                return False
        return True

    def _write(self, trajs: dict[int, np.ndarray], s: int, e: int) -> None:
        for i, tr in trajs.items():
            self.pos[i, s:e + 1] = tr
            self.pos[i, e + 1:] = tr[-1]

    def _members_except(self, skip: set[int]) -> list[int]:
        return [m for gi, g in enumerate(self.groups) if gi not in skip for m in g]

    def _window(self, start: int) -> tuple[int, int]:
        s = start + int(self.rng.integers(0, 11))
        return s, min(s + int(self.rng.integers(MOVE_MIN, MOVE_MAX + 1)), self.cfg.scene_frames)

    def run(self) -> None:
        cur, end = 0, self.cfg.scene_frames
        while cur <= end - MOVE_MAX:
            if self.rng.random() < 0.5:
                last = self._try_contain(cur)
            else:
                last = self._single_moves(cur, set(), self.cfg.max_motions)
            cur = last + 1

    def _can_contain(self, gi: int, gj: int) -> bool:
        top, inner = self.objects[self.groups[gi][0]], self.objects[self.groups[gj][0]]
        if len(self.groups[gi]) != 1 or top.shape != "cone" or top.sized <= inner.sized:
            return False
        if inner.shape == "sphere":
            return inner.sized <= 0.5 * top.sized  # a bigger ball would poke through the cone
        return inner.shape in ("cone", "spl")

    def _try_contain(self, start: int) -> int:
        for _ in range(100):
            gi, gj = (int(v) for v in self.rng.choice(len(self.groups), 2, replace=False))
            s, e = self._window(start)
            if not self._can_contain(gi, gj):
                continue
            c, t = self.groups[gi][0], self.groups[gj][0]
            tx, ty = self.pos[t, s, :2]
            # CATER checks the container's landing spot against the others at the move's end
            landing = np.array([tx, ty, self.pos[c, s, 2]])
            others = self._members_except({gi, gj})
            d = np.linalg.norm(self.pos[others, e] - landing, axis=-1) - self.sizes[others] - self.sizes[c]
            if others and (d < MIN_DIST).any():
                continue
            self._write({c: self._pick_place(self.pos[c, s], tx, ty, s, e)}, s, e)
            self.movements[self.objects[c].instance].append(["_contain", self.objects[t].instance, s, e])
            self.covered.append((c, t, e, 0 in self.groups[gj]))
            merged = self.groups[gi] + self.groups[gj]
            self.groups = [g for k, g in enumerate(self.groups) if k not in (gi, gj)] + [merged]
            limit = None if self.cfg.max_motions is None else self.cfg.max_motions - 1
            last = self._single_moves(start, {len(self.groups) - 1}, limit) if limit != 0 else -1
            return max(e, last)
        return start - 1

    def _single_moves(self, start: int, skip: set[int], limit: int | None) -> int:
        order = [int(g) for g in self.rng.permutation(len(self.groups)) if int(g) not in skip]
        if limit is not None:
            order = order[:limit]
        last, splits = -1, []
        for gi in order:
            s, e = self._window(start)
            last = max(last, e)
            group = self.groups[gi]
            top = self.objects[group[0]]
            others = self._members_except({gi})
            if len(group) > 1:
                actions = ["_slide", "_pick_place_release"]
            elif top.shape in ("cone", "sphere"):
                actions = ["_slide", "_pick_place"]
            else:
                actions = ["_slide", "_pick_place", "_rotate"]
            for trial in range(MAX_TRIALS + 1):
                action = actions[int(self.rng.integers(len(actions)))]
                x, y = self.rng.uniform(-EXTENT, EXTENT, 2)
                if action == "_slide":
                    trajs = {m: self._slide(self.pos[m, s], x, y, s, e) for m in group}
                elif action == "_rotate":
                    trajs = {group[0]: self._interp(self.pos[group[0], s], self.pos[group[0], s], s, e)}
                else:  # pick-place: a stack's top is lifted off what it covers, which stays
                    trajs = {group[0]: self._pick_place(self.pos[group[0], s], x, y, s, e)}
                ok = self._clear(trajs, s, e, others)
                if ok and action == "_pick_place_release":
                    rest = group[1:]
                    d = np.linalg.norm(self.pos[rest, s] - trajs[group[0]][-1], axis=-1)
                    ok = bool((d - self.sizes[rest] - top.sized >= MIN_DIST).all())
                if ok:
                    break
            else:
                continue  # CATER's no-op after MAX_TRIALS failed draws
            self._write(trajs, s, e)
            if action == "_rotate":
                i = group[0]
                self.yaw[i, s:e + 1] = self.yaw[i, s] + np.linspace(0, 90, e - s + 1)
                self.yaw[i, e + 1:] = self.yaw[i, e]
            name = "_pick_place" if action == "_pick_place_release" else action
            for m in trajs:
                self.movements[self.objects[m].instance].append([name, None, s, e])
            if action == "_pick_place_release":
                self.released.append((group[0], s))
                splits.append(gi)
        if splits:  # CATER splits after the segment: the lifted cone, and what it covered
            self.groups = [part for gi, g in enumerate(self.groups)
                           for part in (([g[0]], g[1:]) if gi in splits else (g,))]
        return last

    def snitch_cover(self) -> list[int | None]:
        """Per scene frame, the outermost object covering the snitch (None when uncovered): covered
        from a cone's landing on it (or on a cone covering it) to that cone's next lift."""
        T = self.pos.shape[1]
        parent: dict[int, list[tuple[int, int, int]]] = {}  # covered top -> [(container, from, to)]
        for c, t, land, _ in self.covered:
            lift = min((s for cc, s in self.released if cc == c and s > land), default=T)
            parent.setdefault(t, []).append((c, land, lift))
        out: list[int | None] = []
        for f in range(T):
            node, outer = 0, None
            while True:
                up = [c for c, a, b in parent.get(node, []) if a <= f < b]
                if not up:
                    break
                node = outer = up[0]
            out.append(outer)
        return out


def make_objects(rng: np.random.Generator, cfg: SceneConfig) -> tuple[list[Obj], np.ndarray]:
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    colors = list(COLORS)
    objects = []
    for i in range(n):
        yaw = float(rng.uniform(0, 360))
        if i == 0:
            o = Obj("spl", "small", SNITCH_SIZE, "gold", SNITCH_RGB, "metal", yaw, "Spl_0")
        else:
            if i == 1:
                shape, size = "cone", "medium"
            elif i == 2:
                shape, size = "cone", "large"
            else:
                shape, size = SHAPES[int(rng.integers(4))], list(SIZES)[int(rng.integers(3))]
            color = colors[int(rng.integers(len(colors)))]
            sized = SIZES[size] / (math.sqrt(2) if shape == "cube" else 1.0)
            o = Obj(shape, size, sized, color, COLORS[color], MATERIALS[int(rng.integers(2))], yaw,
                    f"{shape.capitalize()}_{i}")
        objects.append(o)
    for _ in range(1000):  # CLEVR's placement: redraw the whole layout when it cannot be finished
        xy = np.zeros((n, 2))
        ok = True
        for i, o in enumerate(objects):
            for _ in range(50):
                p = rng.uniform(-EXTENT, EXTENT, 2)
                if all(np.hypot(*(p - xy[j])) - o.sized - objects[j].sized >= MIN_DIST for j in range(i)):
                    xy[i] = p
                    break
            else:
                ok = False
                break
        if ok:
            return objects, xy
    raise TotoError("could not place the scene's objects")  # pragma: no cover - never with <= 10 objects


def camera_path(rng: np.random.Generator, cfg: SceneConfig) -> np.ndarray:
    """Camera position per scene frame ``(scene_frames + 1, 3)``; it always looks at the origin."""
    base = np.array(CAMERA_BASE) + rng.uniform(-CAMERA_JITTER, CAMERA_JITTER, 3)
    T = cfg.scene_frames + 1
    if cfg.camera == "static":
        return np.repeat(base[None], T, 0)
    keys, locs, last = [0], [base.copy()], base.copy()
    for f in range(CAMERA_SHIFT, cfg.scene_frames, CAMERA_SHIFT):
        last = last.copy()
        axis = 0 if rng.random() > 0.5 else 1  # never both: passing over the origin flips the view
        last[axis] = rng.choice([-10.0, 10.0])
        last[2] = rng.choice([8.0, 10.0, 12.0])
        keys.append(f)
        locs.append(last)
    keys.append(cfg.scene_frames)
    locs.append(last)
    locs = np.array(locs)
    return np.stack([np.interp(np.arange(T), keys, locs[:, k]) for k in range(3)], 1)


def plan_scene(seed_seq, cfg: SceneConfig) -> tuple[Plan, np.ndarray]:
    rng = np.random.default_rng(seed_seq)
    objects, xy = make_objects(rng, cfg)
    plan = Plan(objects, xy, cfg, rng)
    plan.run()
    return plan, camera_path(rng, cfg)


# -- rendering ----------------------------------------------------------------------------------

def import_mujoco():
    """mujoco with an offscreen GL backend (EGL unless MUJOCO_GL says otherwise)."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    try:
        import mujoco
    except ModuleNotFoundError as e:
        if e.name != "mujoco":
            raise
        raise TotoError("toto synth cater needs MuJoCo: pip install 'toto[sim]' (mujoco>=3)") from None
    except Exception as e:  # an unknown MUJOCO_GL, or its GL library missing, fails mujoco's import
        raise TotoError(f"MuJoCo cannot start with MUJOCO_GL={os.environ['MUJOCO_GL']} ({e}); use "
                        "MUJOCO_GL=egl with Mesa's EGL (apt install libegl1 libgl1-mesa-dri) or "
                        "MUJOCO_GL=osmesa with libosmesa6") from None
    return mujoco


def _rgba(rgb, a=1.0) -> str:
    return " ".join(f"{c / 255:.4f}" for c in rgb) + f" {a}"


def scene_xml(objects: list[Obj], cfg: SceneConfig) -> str:
    ring = [(math.cos(a), math.sin(a)) for a in np.linspace(0, 2 * math.pi, 24, endpoint=False)]
    cone = " ".join(f"{x:.5f} {y:.5f} -1" for x, y in ring) + " 0 0 1"
    meshes = "".join(f'<mesh name="cone_{k}" vertex="{cone}" scale="{r} {r} {r}"/>' for k, r in SIZES.items())
    mats = ('<material name="rubber" specular="0.1" shininess="0.1"/>'
            '<material name="metal" specular="0.9" shininess="0.9"/>')
    bodies = []
    for i, o in enumerate(objects):
        common = f'material="{o.material}" rgba="{_rgba(o.rgb)}" contype="0" conaffinity="0"'
        r = o.sized
        if o.shape == "spl":
            geoms = (f'<geom name="snitch" type="sphere" size="{SNITCH_BALL}" {common}/>'
                     f'<geom name="snitch_wings" type="ellipsoid" size="{SNITCH_SIZE} 0.09 0.015" pos="0 0 0.04" {common}/>')
        elif o.shape == "cone":
            geoms = f'<geom type="mesh" mesh="cone_{o.size}" {common}/>'
        elif o.shape == "cube":
            geoms = f'<geom type="box" size="{r} {r} {r}" {common}/>'
        elif o.shape == "sphere":
            geoms = f'<geom type="sphere" size="{r}" {common}/>'
        else:
            geoms = f'<geom type="cylinder" size="{r} {r}" {common}/>'
        bodies.append(f'<body name="obj{i}" mocap="true">{geoms}</body>')
    return (f'<mujoco><visual><global offwidth="{cfg.width}" offheight="{cfg.height}" fovy="{FOVY}"/>'
            '<quality shadowsize="1024"/><headlight ambient="0.35 0.35 0.35" diffuse="0.35 0.35 0.35"/></visual>'
            f'<asset>{meshes}{mats}</asset><worldbody>'
            '<light pos="4 -4 10" dir="-0.35 0.35 -1" diffuse="0.6 0.6 0.6" castshadow="true"/>'
            '<geom name="floor" type="plane" size="40 40 0.1" rgba="0.62 0.62 0.62 1" contype="0" conaffinity="0"/>'
            f'{"".join(bodies)}</worldbody></mujoco>')


def look_at_angles(cam_pos: np.ndarray) -> tuple[float, float, float]:
    """MuJoCo free-camera (distance, azimuth, elevation) in degrees for a camera at ``cam_pos``
    looking at the origin."""
    d = float(np.linalg.norm(cam_pos))
    f = -cam_pos / d
    return d, math.degrees(math.atan2(f[1], f[0])), math.degrees(math.asin(f[2]))


def project(points: np.ndarray, cam_pos: np.ndarray, width: int, height: int, fovy: float = FOVY) -> np.ndarray:
    """Pinhole projection of world ``points (N, 3)`` to pixel ``(N, 2)`` (x right, y down) for a
    camera at ``cam_pos`` looking at the origin with world z up."""
    f = -cam_pos / np.linalg.norm(cam_pos)
    right = np.cross(f, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, f)
    rel = np.asarray(points, float) - cam_pos
    x, y, z = rel @ right, rel @ up, rel @ f
    focal = (height / 2) / math.tan(math.radians(fovy) / 2)
    return np.stack([width / 2 + focal * x / z, height / 2 - focal * y / z], 1)


def yaw_quat(deg: float) -> np.ndarray:
    h = math.radians(deg) / 2
    return np.array([math.cos(h), 0.0, 0.0, math.sin(h)])


class SceneRenderer:
    """One MuJoCo model + offscreen renderer per scene; RGB frames and the snitch's pixel count."""

    def __init__(self, objects: list[Obj], cfg: SceneConfig):
        mujoco = import_mujoco()
        self.mj = mujoco
        self.model = mujoco.MjModel.from_xml_string(scene_xml(objects, cfg))
        self.data = mujoco.MjData(self.model)
        try:
            self.renderer = mujoco.Renderer(self.model, cfg.height, cfg.width)
        except Exception as e:  # the GL backend's own exception types differ per backend
            raise TotoError(
                f"MuJoCo cannot render offscreen with MUJOCO_GL={os.environ.get('MUJOCO_GL')} "
                f"({type(e).__name__}: {e}); install Mesa's EGL (e.g. apt install libegl1 libgl1-mesa-dri) "
                "or set MUJOCO_GL=osmesa with libosmesa6") from None
        self.snitch_geoms = [mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_GEOM, n) for n in ("snitch", "snitch_wings")]
        self.cam = mujoco.MjvCamera()
        self.cam.type = mujoco.mjtCamera.mjCAMERA_FREE
        self.cam.lookat[:] = 0.0

    def set_state(self, pos: np.ndarray, yaw: np.ndarray, cam_pos: np.ndarray) -> None:
        self.data.mocap_pos[:] = pos
        for i, a in enumerate(yaw):
            self.data.mocap_quat[i] = yaw_quat(float(a))
        self.mj.mj_kinematics(self.model, self.data)
        self.cam.distance, self.cam.azimuth, self.cam.elevation = look_at_angles(cam_pos)

    def rgb(self) -> np.ndarray:
        self.renderer.update_scene(self.data, self.cam)
        return self.renderer.render().copy()

    def snitch_pixels(self) -> int:
        self.renderer.enable_segmentation_rendering()
        try:
            self.renderer.update_scene(self.data, self.cam)
            seg = self.renderer.render()
        finally:
            self.renderer.disable_segmentation_rendering()
        ids, types = seg[..., 0], seg[..., 1]
        return int((np.isin(ids, self.snitch_geoms) & (types == int(self.mj.mjtObj.mjOBJ_GEOM))).sum())

    def close(self) -> None:
        self.renderer.close()


def render_scene(plan: Plan, cam: np.ndarray, cfg: SceneConfig) -> tuple[np.ndarray, dict]:
    """``frames (F, H, W, 3) uint8`` and the scene's metadata (CATER-like, per rendered frame)."""
    ids = np.linspace(0, cfg.scene_frames, cfg.frames).round().astype(int)
    r = SceneRenderer(plan.objects, cfg)
    frames, pixels = [], []
    try:
        for f in ids:
            r.set_state(plan.pos[:, f], plan.yaw[:, f], cam[f])
            frames.append(r.rgb())
            pixels.append(r.snitch_pixels())
    finally:
        r.close()
    cover = plan.snitch_cover()
    snitch = plan.pos[0]
    covered = [cover[f] is not None for f in ids]
    uncovered = [k for k, c in enumerate(covered) if not c] or [0]
    visible = [k for k, p in enumerate(pixels) if p > 0] or [0]
    end = cfg.scene_frames
    meta = {
        "objects": [{"shape": o.shape, "size": o.size, "sized": o.sized, "material": o.material, "color": o.color,
                     "instance": o.instance,
                     "locations": {str(int(f)): [round(float(v), 4) for v in plan.pos[i, f]] for f in ids}}
                    for i, o in enumerate(plan.objects)],
        "movements": plan.movements,
        "frame_ids": [int(f) for f in ids],
        "camera": {"mode": cfg.camera, "fovy": FOVY, "lookat": [0.0, 0.0, 0.0],
                   "positions": [[round(float(v), 4) for v in cam[f]] for f in ids]},
        "label": cell_of(*snitch[end, :2]),
        "snitch_final": [float(v) for v in snitch[end]],
        "snitch_pixels": pixels,
        "snitch_visible_last": pixels[-1] > 0,
        "container_last": None if cover[end] is None else plan.objects[cover[end]].instance,
        "snitch_covered": covered,
        "containment_events": sum(1 for *_, snitch_in in plan.covered if snitch_in),
        "contain_events": len(plan.covered),
        # the oracle's guess: where the snitch was last not under a cone (as for the real release)
        "last_seen_cell": cell_of(*snitch[ids[uncovered[-1]], :2]),
        # and where it last had a pixel on screen (other objects can hide it too)
        "last_visible_cell": cell_of(*snitch[ids[visible[-1]], :2]),
    }
    return np.stack(frames), meta



# -- a dataset on disk: CATER's layout ----------------------------------------------------------

NAME = "CATER_new_{:06d}"


def encode_avi(frames: np.ndarray, fps: int) -> bytes:
    """``frames (F, H, W, 3) uint8`` -> an MPEG-4 Part 2 .avi (CATER's container) in memory."""
    import io

    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="avi") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        s.bit_rate = 8_000_000
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def video_seed(seed: int, index: int) -> list[int]:
    """Each video has its own stream: the same video for the same (seed, index), in any order."""
    return [seed, index]


def is_val(seed: int, index: int, val_fraction: float) -> bool:
    return bool(np.random.default_rng([seed, index, 1]).random() < val_fraction)


def generate(out: str | Path, videos: int, cfg: SceneConfig, seed: int = 0, val_fraction: float = 0.3,
             progress: bool = True) -> dict:
    """Render ``videos`` scenes into ``out/videos/*.avi`` + ``out/scenes/*.json`` and write CATER's
    ``out/lists/localize/{train,val}.txt``. A video counts once its scene JSON exists (written
    after the video, both atomically), so a killed run continues where it stopped."""
    import resource
    import time

    from tqdm import tqdm

    from ..ioutil import atomic_write_bytes, atomic_write_json

    if videos < 1:
        raise ConfigError(f"--videos must be >= 1, got {videos}")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    out = Path(out)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    (out / "scenes").mkdir(exist_ok=True)
    settings = {"generator": "cater", "seed": seed, "val_fraction": val_fraction, **cfg.to_dict()}
    cfg_path = out / "synth.json"
    if cfg_path.exists():
        import json

        old = json.loads(cfg_path.read_text())
        if old != settings:
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise ConfigError(f"{out}: holds a generation with other settings ({', '.join(diff)}); "
                              "use another --out or the same options")
    else:
        atomic_write_json(cfg_path, settings)
    todo = [i for i in range(videos) if not (out / "scenes" / f"{NAME.format(i)}.json").exists()]
    t0 = time.perf_counter()
    bar = tqdm(total=videos, initial=videos - len(todo), desc="rendering CATER scenes", unit=" clips",
               disable=not progress)
    for i in todo:
        plan, cam = plan_scene(video_seed(seed, i), cfg)
        frames, meta = render_scene(plan, cam, cfg)
        name = NAME.format(i)
        atomic_write_bytes(out / "videos" / f"{name}.avi", encode_avi(frames, cfg.fps))
        atomic_write_json(out / "scenes" / f"{name}.json", {"video": f"{name}.avi", **meta})
        bar.update(1)
    bar.close()
    wall = time.perf_counter() - t0
    write_lists(out, videos, seed, val_fraction)
    stats = {"videos": videos, "rendered_now": len(todo), "already_done": videos - len(todo),
             "wall_s": round(wall, 2),
             "clips_per_s": round(len(todo) / wall, 3) if todo and wall > 0 else None,
             "frames_per_s": round(len(todo) * cfg.frames / wall, 2) if todo and wall > 0 else None,
             "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    atomic_write_json(out / "generation.json", stats)
    return stats


def write_lists(out: Path, videos: int, seed: int, val_fraction: float) -> None:
    """CATER's ``lists/localize/{train,val}.txt``: ``CATER_new_000042.avi 17`` per line."""
    import json

    from ..ioutil import atomic_write_bytes

    lines = {"train": [], "val": []}
    for i in range(videos):
        name = NAME.format(i)
        label = json.loads((out / "scenes" / f"{name}.json").read_text())["label"]
        lines["val" if is_val(seed, i, val_fraction) else "train"].append(f"{name}.avi {label}\n")
    d = out / "lists" / "localize"
    d.mkdir(parents=True, exist_ok=True)
    for split, rows in lines.items():
        atomic_write_bytes(d / f"{split}.txt", "".join(rows).encode())


def carried_strip(root: str | Path, out: str | Path) -> str | None:
    """A PNG strip of the first clip under ``root`` whose snitch moves while covered (carried by
    a cone), covered frames framed in red; returns the clip's name (None when no clip has one)."""
    import json

    from PIL import Image

    from ..data.video import read_video

    root = Path(root)
    for scene in sorted((root / "scenes").glob("*.json")):
        meta = json.loads(scene.read_text())
        snitch = meta["objects"][0]["locations"]
        covered = meta["snitch_covered"]
        at = [snitch[str(f)][:2] for f in meta["frame_ids"]]
        carried = any(covered[k] and covered[k - 1] and np.hypot(*np.subtract(at[k], at[k - 1])) > 0.05
                      for k in range(1, len(covered)))
        if not carried:
            continue
        frames = read_video(root / "videos" / meta["video"], 1, 96)
        tiles = []
        for k, f in enumerate(frames[:len(covered)]):
            f = f.copy()
            if covered[k]:
                f[:3], f[-3:], f[:, :3], f[:, -3:] = (255, 0, 0), (255, 0, 0), (255, 0, 0), (255, 0, 0)
            tiles.append(f)
        step = max(1, len(tiles) // 12)
        Image.fromarray(np.concatenate(tiles[::step], 1)).save(out)
        return meta["video"]
    return None
