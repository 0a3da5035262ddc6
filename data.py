"""
Data for Mod-Squad: the embedded synthetic scenes, and the real Taskonomy and PASCAL-Context loaders.
Every dataset returns (image, targets): image float32 (3, H, W) in [-1, 1]; targets a dict
task name -> tensor, plus "<task>_mask" validity masks, in the value conventions of the real loaders.

The default is an embedded synthetic multi-task scene set that needs no download. Each sample is a small 3D scene
(a floor, walls or sky, 1-5 objects: ball, crate, can, pillar, slab, articulated figure) drawn by a numpy ray caster.
All targets come from the same per-pixel scene buffers (hit surface, depth, normal, albedo, shading), so the tasks
are genuinely different functions of one scene: geometry (depth, normals, curvature, occlusion edges, 3D keypoints),
appearance (texture edges, 2D keypoints, appearance segments) and semantics (object and scene class, semseg, parts).
The 13 Taskonomy tasks and the 5 PASCAL-Context tasks come from the same scenes. Sample i of a split is a pure
function of (seed, split, i).

Frames: world x right, y up, z forward (the camera stands at x = z = 0 and looks roughly along +z); the camera frame
is x right, y down, z forward. Normals point towards the camera, so as on real Taskonomy normals the floor is
encoded with green ~0 and a wall facing the camera with blue ~0.

    python data.py --show                                # writes docs/synthetic_samples.png (64 px samples)
    python data.py --show --task-set pascal              # writes docs/synthetic_pascal.png
    python data.py --write-pascal DIR --images 100       # a PASCAL_MT tree of synthetic scenes (data_trees.py)
"""
import argparse
import colorsys
import math
import os
import re
import signal
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.io
import scipy.ndimage
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from scipy.ndimage import gaussian_filter
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from modsquad import SYNTHETIC_TASKS, TASKONOMY_TASKS  # (name, channels, kind) in the official order

SYNTHETIC_OBJECT_CATEGORIES = ("ball", "crate", "can", "pillar", "slab", "figure")
SYNTHETIC_SCENE_CATEGORIES = ("room", "corridor", "outdoor", "corner")
HUMAN_PARTS = ("background", "head", "torso", "upper_arm", "lower_arm", "upper_leg", "lower_leg")
SYNTHETIC_TASKONOMY_TASKS = SYNTHETIC_TASKS  # the 13 Taskonomy tasks with 6 object and 4 scene classes
SYNTHETIC_PASCAL_TASKS = (
    ("semseg", 7, "dense"), ("human_parts", 7, "dense"), ("saliency", 1, "dense"), ("normals", 3, "dense"),
    ("edge", 1, "dense"))
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}  # different ids -> different random streams -> disjoint scenes
PLANE_NAMES = ("floor", "back", "left", "right")
PLAIN, STRIPES, CHECKER = 0, 1, 2  # textures
NUM_FACES = {"sphere": 1, "box": 6, "cylinder": 3}  # surface ids per primitive
FIGURE = SYNTHETIC_OBJECT_CATEGORIES.index("figure")
EPS = 1e-6

# -----------------------------------------------------------------------------
# Small helpers: the official encodings and image filters


def rescale(v, lo, hi, clip=True):
    """The official 16-bit rescaling (modsquad_spec.md 6.2), numpy or torch: clip to [lo, hi], map onto [-1, 1]."""
    # v' = (clip(v, lo, hi) - lo) / (hi - lo) * 2 - 1
    return ((v.clip(lo, hi) if clip else v) - lo) / (hi - lo) * 2 - 1


def encode_depth(metres):
    """Depth in metres (inf = sky) -> (log-encoded depth in [0, 1], validity mask), as the Taskonomy loader does."""
    # raw 16-bit depth in 1/512 m units; 65535 marks missing depth (sky), like the real PNGs
    v = np.minimum(np.round(512 * metres), 65535)
    # log(1 + v) / log(2^16), so missing depth decodes to exactly 1.0; valid = raw < 64500 (taskbank's threshold)
    return np.log1p(v) / np.log(2 ** 16), v < 64500


def to_8bit(x):
    """Values in [-1, 1] -> the 8-bit integer u an RGB PNG would store -> u / 255 * 2 - 1, as the loader reads it."""
    return np.round((np.clip(x, -1, 1) + 1) / 2 * 255) / 255 * 2 - 1


def sobel(img):
    """Sobel derivatives (d/dx, d/dy) of an (H, W, ...) array, borders replicated."""
    p = np.pad(img, [(1, 1), (1, 1)] + [(0, 0)] * (img.ndim - 2), mode="edge")
    gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    return gx, gy


def yaw_matrix(yaw):
    """Rotation by yaw about the vertical axis, (3, 3): world = R @ local, so rows transform as local = world @ R."""
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def neighbour_views(a):
    """The 4-neighbours of every pixel of an (H, W) array (borders replicated): list of 4 (H, W) arrays."""
    p = np.pad(a, 1, mode="edge")
    return [p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]]


# -----------------------------------------------------------------------------
# Scene description and sampling


@dataclass
class Material:
    colour_a: np.ndarray  # (3,) RGB in [0, 1]
    colour_b: np.ndarray  # (3,) the second colour of stripes / checker cells
    texture: int          # PLAIN, STRIPES or CHECKER
    period: float         # metres per stripe / checker cell


@dataclass
class Plane:
    name: str             # one of PLANE_NAMES
    normal: np.ndarray    # (3,) unit, pointing into the scene
    offset: float         # points p of the plane satisfy normal . p = offset
    material: Material


@dataclass
class Primitive:
    kind: str             # "sphere" | "box" | "cylinder" (vertical, capped)
    center: np.ndarray    # (3,) world position of the middle of the shape
    size: np.ndarray      # (3,) half extents; sphere (r, r, r); cylinder (r, half height, r)
    yaw: float = 0.0      # rotation of a box about the vertical axis
    part: int = 0         # human part (index into HUMAN_PARTS) for figure pieces, 0 elsewhere


@dataclass
class SceneObject:
    category: int         # index into SYNTHETIC_OBJECT_CATEGORIES
    material: Material
    primitives: list      # list of Primitive


@dataclass
class Scene:
    layout: int           # index into SYNTHETIC_SCENE_CATEGORIES
    camera: np.ndarray    # (3,) camera position
    yaw: float            # radians, rotation about the vertical axis (0 = looking along +z)
    pitch: float          # radians, > 0 looks up
    fov: float            # radians, horizontal = vertical field of view (square images)
    light: np.ndarray     # (3,) unit direction towards the (directional) light
    ambient: float        # shading = ambient + (1 - ambient) * max(0, n . light)
    planes: list          # list of Plane: floor first
    objects: list         # list of SceneObject, sorted nearest first


def random_material(rng, saturation=(0.35, 0.9), value=(0.45, 1.0), period=(0.25, 0.5)):
    """A random texture: two colours drawn in HSV (any hue), a pattern and its period in metres."""
    def colour():
        return np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(*saturation), rng.uniform(*value)))

    colour_a = colour()
    # the second colour is either a darker shade of the first or an unrelated colour
    colour_b = colour_a * rng.uniform(0.35, 0.65) if rng.random() < 0.5 else colour()
    return Material(colour_a, colour_b, int(rng.integers(3)), rng.uniform(*period))


def figure_primitives(s, yaw, rng):
    """An articulated mannequin of scale s (about 1.8 s m tall), facing along yaw, standing at the origin."""
    side = yaw_matrix(yaw)[:, 0]  # unit vector to the figure's right, in the floor plane
    limb = lambda x, y0, y1, r, part: Primitive(  # noqa: E731  (a vertical cylinder from y0 to y1 at lateral x)
        "cylinder", x * s * side + [0, (y0 + y1) / 2 * s, 0], np.array([r, (y1 - y0) / 2, r]) * s, part=part)
    prims = [Primitive("sphere", np.array([0, 1.64 * s, 0]), np.full(3, 0.13 * s), part=1),
             Primitive("box", np.array([0, 1.2 * s, 0]), np.array([0.2, 0.3, 0.11]) * s, yaw, part=2)]
    for x in (-1, 1):
        prims += [limb(0.11 * x, 0.45, 0.9, 0.085, 5), limb(0.11 * x, 0.0, 0.45, 0.075, 6)]
        # each arm hangs down, or is raised straight up (30 %), so the part layout varies
        if rng.random() < 0.3:
            prims += [limb(0.28 * x, 1.48, 1.8, 0.065, 3), limb(0.28 * x, 1.8, 2.1, 0.06, 4)]
        else:
            prims += [limb(0.28 * x, 1.15, 1.48, 0.065, 3), limb(0.28 * x, 0.82, 1.15, 0.06, 4)]
    return prims


def make_object(category, rng):
    """An object of the given category standing on the floor at the origin, and its footprint radius (m)."""
    name, yaw = SYNTHETIC_OBJECT_CATEGORIES[category], rng.uniform(0, np.pi)
    if name == "ball":
        r = rng.uniform(0.3, 0.6)
        prims, radius = [Primitive("sphere", np.array([0, r, 0]), np.full(3, r))], r
    elif name in ("crate", "slab"):
        lo, hi = ((0.3, 0.3, 0.3), (0.6, 0.6, 0.6)) if name == "crate" else ((0.6, 0.06, 0.4), (1.0, 0.18, 0.8))
        half = rng.uniform(lo, hi)
        prims, radius = [Primitive("box", np.array([0, half[1], 0]), half, yaw)], np.hypot(half[0], half[2])
    elif name in ("can", "pillar"):
        r, hh = (rng.uniform(0.25, 0.45), rng.uniform(0.3, 0.6)) if name == "can" else \
            (rng.uniform(0.12, 0.22), rng.uniform(1.0, 1.5))
        prims, radius = [Primitive("cylinder", np.array([0, hh, 0]), np.array([r, hh, r]))], r
    else:
        s = rng.uniform(1.0, 1.25)
        prims, radius = figure_primitives(s, yaw, rng), 0.4 * s
    return SceneObject(category, random_material(rng), prims), radius


def sample_scene(rng):
    """Draw a random Scene from a numpy Generator (the only source of randomness)."""
    layout = int(rng.integers(len(SYNTHETIC_SCENE_CATEGORIES)))
    name = SYNTHETIC_SCENE_CATEGORIES[layout]
    # camera at 1.2-2 m, looking down 12-32 degrees; in a corridor it looks along the corridor
    yaw = rng.uniform(-0.14, 0.14) if name == "corridor" else rng.uniform(-0.45, 0.45)
    pitch, fov = -rng.uniform(0.2, 0.55), rng.uniform(0.85, 1.15)
    camera = np.array([0.0, rng.uniform(1.2, 2.0), 0.0])
    elevation, azimuth = rng.uniform(0.6, 1.3), rng.uniform(0, 2 * np.pi)
    light = np.array([np.cos(elevation) * np.sin(azimuth), np.sin(elevation), np.cos(elevation) * np.cos(azimuth)])

    # the layout decides which walls exist: (left x, right x, back z), None = no wall there
    left, right = (-rng.uniform(1.4, 2.2), rng.uniform(1.4, 2.2)) if name == "corridor" else \
        (-rng.uniform(3.0, 5.0), rng.uniform(3.0, 5.0))
    back = rng.uniform(6.5, 9.0)
    walls = {"room": (left, right, back), "corridor": (left, right, None), "outdoor": (None, None, None),
             "corner": (left, None, back) if rng.random() < 0.5 else (None, right, back)}[name]
    # floor: muted colours, a large pattern; walls: pale colours. Normals point into the scene.
    floor_material = random_material(rng, (0.1, 0.5), (0.35, 0.8), (0.5, 1.0))
    planes = [Plane("floor", np.array([0.0, 1.0, 0.0]), 0.0, floor_material)]
    for plane_name, axis, sign, position in zip(("left", "right", "back"), (0, 0, 2), (1, -1, -1), walls):
        if position is not None:
            normal = sign * np.eye(3)[axis]
            planes.append(Plane(plane_name, normal, sign * position, random_material(rng, (0.05, 0.4), (0.6, 1.0),
                                                                                      (0.4, 0.8))))

    # 1-5 objects on the floor inside the horizontal field of view, 2-6 m away, not overlapping, inside the walls
    objects, placed = [], []
    for _ in range(rng.integers(1, 6)):
        obj, radius = make_object(int(rng.integers(len(SYNTHETIC_OBJECT_CATEGORIES))), rng)
        for _attempt in range(10):
            dist, angle = rng.uniform(2.0, 6.0), yaw + rng.uniform(-0.4, 0.4) * fov
            x, z = dist * np.sin(angle), dist * np.cos(angle)
            inside = (walls[0] is None or x - radius > walls[0]) and (walls[1] is None or x + radius < walls[1]) \
                and (walls[2] is None or z + radius < walls[2])
            if inside and all(np.hypot(x - px, z - pz) > radius + pr + 0.1 for px, pz, pr in placed):
                for prim in obj.primitives:
                    prim.center = prim.center + [x, 0.0, z]
                objects.append(obj)
                placed.append((x, z, radius))
                break
    objects.sort(key=lambda o: np.linalg.norm(o.primitives[0].center - camera))
    return Scene(layout, camera, yaw, pitch, fov, light, rng.uniform(0.35, 0.55), planes, objects)


# -----------------------------------------------------------------------------
# Camera and ray-primitive intersections. Each intersect_* takes the ray origin o (3,) and unit directions d (R, 3)
# and returns t (R,) (inf = miss), the world normal (R, 3), texture coordinates uv (R, 2) in metres and face (R,).


def camera_axes(scene):
    """(3, 3) matrix whose columns are the camera's right, down and forward axes in world coordinates."""
    cp, sp = np.cos(scene.pitch), np.sin(scene.pitch)
    # a camera looking along +z with image rows going down, pitched up about x, then turned by yaw
    return yaw_matrix(scene.yaw) @ np.array([[1.0, 0.0, 0.0], [0.0, -cp, sp], [0.0, sp, cp]])


def focal(scene, img_size):
    """Focal length in pixels."""
    return img_size / 2 / np.tan(scene.fov / 2)


def project(scene, points, img_size):
    """World points (P, 3) -> pixel coordinates (P, 2) as (column, row) and camera-frame depth z (P,)."""
    cam = (points - scene.camera) @ camera_axes(scene)  # (P, 3): right, down, forward
    f = focal(scene, img_size)
    return f * cam[:, :2] / cam[:, 2:] + img_size / 2 - 0.5, cam[:, 2]


def pixel_rays(scene, img_size, offsets=((0.0, 0.0),)):
    """Unit world ray directions (S*H*W, 3) through the pixel centres shifted by each of the S (dx, dy) offsets
    (in pixels), one image after the other."""
    c = np.arange(img_size) + 0.5 - img_size / 2
    dx, dy = np.array(offsets, float).T[:, :, None, None]  # (S, 1, 1) each
    # x grows to the right (columns), y downwards (rows), both in units of the focal length
    x, y = (c[None, None, :] + dx) / focal(scene, img_size), (c[None, :, None] + dy) / focal(scene, img_size)
    x, y = np.broadcast_arrays(x, y)  # (S, H, W)
    right, down, forward = camera_axes(scene).T
    d = x.reshape(-1, 1) * right + y.reshape(-1, 1) * down + forward
    return d / np.linalg.norm(d, axis=1, keepdims=True)


def intersect_sphere(o, d, prim):
    oc, r = o - prim.center, prim.size[0]
    # |o + t d - c|^2 = r^2 with |d| = 1:  t^2 + 2 b t + c = 0,  b = d . (o - c),  c = |o - c|^2 - r^2
    b, c = d @ oc, oc @ oc - r * r
    disc = b * b - c
    t = -b - np.sqrt(np.maximum(disc, 0))
    t = np.where((disc > 0) & (t > EPS), t, np.inf)
    q = oc + np.where(np.isfinite(t), t, 0)[:, None] * d  # hit point relative to the centre
    # uv: arc length around the vertical axis, height
    uv = np.stack([np.arctan2(q[:, 0], q[:, 2]) * r, q[:, 1]], 1)
    return t, q / r, uv, np.zeros(len(d), int)


def intersect_box(o, d, prim):
    # in the box's own frame it is axis-aligned
    rot = yaw_matrix(prim.yaw)
    ol, dl = (o - prim.center) @ rot, d @ rot
    dl = np.where(np.abs(dl) < 1e-12, 1e-12, dl)
    # slab method: the ray is inside the box between the largest entry and the smallest exit
    t0, t1 = (-prim.size - ol) / dl, (prim.size - ol) / dl
    near, far = np.minimum(t0, t1), np.maximum(t0, t1)
    t_in, axis = near.max(1), near.argmax(1)
    t = np.where((t_in <= far.min(1)) & (t_in > EPS), t_in, np.inf)
    rows = np.arange(len(d))
    normal = np.zeros_like(dl)
    normal[rows, axis] = -np.sign(dl[rows, axis])
    q = ol + np.where(np.isfinite(t), t, 0)[:, None] * dl
    uv = np.take_along_axis(q, np.array([[1, 2], [0, 2], [0, 1]])[axis], 1)
    # faces 0..5: -x, +x, -y, +y, -z, +z
    return t, normal @ yaw_matrix(-prim.yaw), uv, 2 * axis + (normal[rows, axis] > 0)  # (rot^T = rotation by -yaw)


def intersect_cylinder(o, d, prim):
    r, hh = prim.size[0], prim.size[1]
    oc = o - prim.center
    dx, dy, dz = d.T
    # side: |(oc + t d)_xz|^2 = r^2  ->  a t^2 + 2 b t + c = 0
    a = np.maximum(dx * dx + dz * dz, 1e-12)
    b, c = dx * oc[0] + dz * oc[2], oc[0] ** 2 + oc[2] ** 2 - r * r
    disc = b * b - a * c
    t_side = (-b - np.sqrt(np.maximum(disc, 0))) / a
    side = (disc > 0) & (t_side > EPS) & (np.abs(oc[1] + t_side * dy) <= hh)
    # cap: only the disc facing the camera (y = +hh seen from above, -hh from below) can be hit, and a ray that
    # crosses it enters the solid there, before any side hit
    cap_y = hh if oc[1] > 0 else -hh
    with np.errstate(divide="ignore", invalid="ignore"):
        t_cap = (cap_y - oc[1]) / dy
        qx, qz = oc[0] + t_cap * dx, oc[2] + t_cap * dz
    cap = (abs(oc[1]) > hh) & (t_cap > EPS) & (qx * qx + qz * qz <= r * r)
    t = np.where(cap, t_cap, np.where(side, t_side, np.inf))
    q = oc + np.where(np.isfinite(t), t, 0)[:, None] * d  # hit point relative to the centre
    normal = np.where(cap[:, None], [0, np.sign(cap_y), 0], q * [1 / r, 0, 1 / r])
    # uv: (arc length, height) on the side, (x, z) on the cap
    uv = np.where(cap[:, None], q[:, [0, 2]], np.stack([np.arctan2(q[:, 0], q[:, 2]) * r, q[:, 1]], 1))
    # faces: 0 side, 1 top, 2 bottom
    return t, normal, uv, np.where(cap, 1 if cap_y > 0 else 2, 0)


INTERSECT = {"sphere": intersect_sphere, "box": intersect_box, "cylinder": intersect_cylinder}


# -----------------------------------------------------------------------------
# The renderer


def surface_table(scene):
    """Per-surface properties, one row per plane or primitive face, in the order cast_rays numbers them.

    A primitive's faces get consecutive ids: NUM_FACES per kind, box faces -x, +x, -y, +y, -z, +z, cylinder faces
    side, top, bottom. One extra last row describes the sky, so indexing with surface id -1 picks it.
    """
    def appearance(m):
        # the appearance segment of a material: texture x colour quantised to 3 levels per channel (81 codes)
        return m.texture * 27 + int(np.minimum(m.colour_a * 3, 2).astype(int) @ [9, 3, 1])

    rows = []  # (object, category, part, material, k1, k2, segment_25d, appearance)
    for plane in scene.planes:
        rows.append((-1, -1, 0, plane.material, 0.0, 0.0, PLANE_NAMES.index(plane.name), appearance(plane.material)))
    for rank, obj in enumerate(scene.objects):
        for prim in obj.primitives:
            r = prim.size[0]
            for face in range(NUM_FACES[prim.kind]):
                # principal curvatures: sphere 1/r both, cylinder side 1/r and 0, planar faces 0
                k1 = 1 / r if prim.kind == "sphere" or (prim.kind == "cylinder" and face == 0) else 0.0
                k2 = 1 / r if prim.kind == "sphere" else 0.0
                # 2.5D segments: one id per geometric surface (a figure: one per part), objects nearest first
                seg = 4 + 8 * rank + (prim.part if obj.category == FIGURE else face)
                rows.append((rank, obj.category, prim.part, obj.material, k1, k2, seg, appearance(obj.material)))
    rows.append((-1, -1, 0, Material(np.zeros(3), np.zeros(3), PLAIN, 1.0), 0.0, 0.0, 51, 81))
    obj, cat, part, mat, k1, k2, seg, app = zip(*rows)
    return dict(object=np.array(obj), category=np.array(cat), part=np.array(part), segment_25d=np.array(seg),
                appearance=np.array(app), curvature=np.stack([k1, k2], 1),
                colour_a=np.array([m.colour_a for m in mat]), colour_b=np.array([m.colour_b for m in mat]),
                texture=np.array([m.texture for m in mat]), period=np.array([m.period for m in mat]))


def rays_through_sphere(o, d, center, radius):
    """Indices of the rays o + t d (t > 0) that pass within radius of center."""
    oc = o - center
    b = d @ oc
    # the line meets the sphere where b^2 - (|oc|^2 - r^2) > 0; the far intersection -b + sqrt(.) must be ahead
    disc = b * b - (oc @ oc - radius * radius)
    return np.flatnonzero((disc > 0) & (-b + np.sqrt(np.maximum(disc, 0)) > 0))


def cast_rays(scene, d):
    """Nearest hit along unit rays d (R, 3) from the camera: t (R,) (inf = sky), surface id (R,) (-1 = sky),
    world normal (R, 3), texture coordinates uv (R, 2) in metres."""
    R, o = len(d), scene.camera
    # floor and walls, all at once: n . (o + t d) = offset
    normals, offsets = np.array([p.normal for p in scene.planes]), np.array([p.offset for p in scene.planes])
    with np.errstate(divide="ignore", invalid="ignore"):
        t_planes = (offsets - normals @ o) / (d @ np.ascontiguousarray(normals.T))  # (R, P); contiguous: fast
    t_planes = np.where(t_planes > EPS, t_planes, np.inf)
    surface = t_planes.argmin(1)
    t = t_planes[np.arange(R), surface]
    normal = normals[surface]
    # plane texture coordinates: the hit point without its coordinate along the normal
    keep = np.array([[1, 2], [0, 2], [0, 1]])[np.abs(normals).argmax(1)][surface]
    uv = np.take_along_axis(o + np.where(np.isfinite(t), t, 0)[:, None] * d, keep, 1)
    sky = ~np.isfinite(t)
    surface[sky], normal[sky] = -1, 0

    first_id = len(scene.planes)
    for obj in scene.objects:
        # cull: a primitive is tested only on the rays through its bounding sphere, found among the rays through
        # the object's bounding sphere
        centers = np.array([p.center for p in obj.primitives])
        middle = centers.mean(0)
        radius = max(np.linalg.norm(c - middle) + np.linalg.norm(p.size) for c, p in zip(centers, obj.primitives))
        obj_rows = rays_through_sphere(o, d, middle, radius)
        d_obj = d[obj_rows]
        for prim in obj.primitives:
            rows = obj_rows[rays_through_sphere(o, d_obj, prim.center, np.linalg.norm(prim.size))]
            t_new, n_new, uv_new, face = INTERSECT[prim.kind](o, d[rows], prim)
            # z-buffering: keep the new hit where it is nearer
            nearer = t_new < t[rows]
            rows = rows[nearer]
            t[rows], normal[rows], uv[rows], surface[rows] = \
                t_new[nearer], n_new[nearer], uv_new[nearer], first_id + face[nearer]
            first_id += NUM_FACES[prim.kind]
    return t, surface, normal, uv


def render_scene(scene, img_size=32, supersample=True):
    """Ray-cast a Scene into per-pixel buffers, all (H, W, ...) numpy arrays:

    surface (surface id, -1 = sky), object (index into scene.objects, -1 = floor/walls/sky), category (-1 = none),
    part (human part, 0 = none), t (euclidean depth, m, inf = sky), z (z-buffer depth, m), normal (H, W, 3) camera
    frame unit normals (0 on sky), albedo (H, W, 3), shading (Lambert + ambient, 0 on sky), curvature (H, W, 2),
    segment_25d, appearance (integer codes), rgb (H, W, 3) in [0, 1] (2x2 supersampled if supersample).
    The other buffers are sampled at the pixel centres, so they are the exact scene quantities of each pixel.
    """
    H = W = img_size
    table = surface_table(scene)
    # one cast for the pixel centres and, for an antialiased image, 4 sub-pixel samples per pixel (a 2x2 grid)
    offsets = [(0, 0)] + ([(-0.25, -0.25), (0.25, -0.25), (-0.25, 0.25), (0.25, 0.25)] if supersample else [])
    d = pixel_rays(scene, img_size, offsets)
    t, surface, normal, uv = cast_rays(scene, d)

    # albedo: texture pattern on the surface coordinates, then pick one of the two colours
    cells = np.floor(uv / table["period"][surface][:, None]).astype(int)
    texture = table["texture"][surface]
    pattern = np.where(texture == STRIPES, cells[:, 0] % 2, np.where(texture == CHECKER, cells.sum(1) % 2, 0))
    albedo = np.where(pattern[:, None] == 1, table["colour_b"][surface], table["colour_a"][surface])
    sky = surface < 0
    shading = np.where(sky, 0.0, scene.ambient + (1 - scene.ambient) * np.maximum(normal @ scene.light, 0))
    # sky colour: pale at the horizon, blue upwards
    up = np.clip(d[:, 1], 0, 1)[:, None] ** 0.5
    sky_colour = (1 - up) * [0.85, 0.9, 0.95] + up * [0.35, 0.55, 0.9]
    rgb = np.where(sky[:, None], sky_colour, albedo * shading[:, None])
    albedo = np.where(sky[:, None], sky_colour, albedo)

    n = H * W  # the first n rays are the pixel centres
    rgb = rgb.reshape(-1, H, W, 3)[1:].mean(0) if supersample else rgb.reshape(H, W, 3)
    s, axes = surface[:n], camera_axes(scene)
    return dict(surface=s.reshape(H, W), object=table["object"][s].reshape(H, W),
                category=table["category"][s].reshape(H, W), part=table["part"][s].reshape(H, W),
                t=t[:n].reshape(H, W), z=(t[:n] * (d[:n] @ axes[:, 2])).reshape(H, W),
                normal=(normal[:n] @ axes).reshape(H, W, 3), albedo=albedo[:n].reshape(H, W, 3),
                shading=shading[:n].reshape(H, W), curvature=table["curvature"][s].reshape(H, W, 2),
                segment_25d=table["segment_25d"][s].reshape(H, W), appearance=table["appearance"][s].reshape(H, W),
                rgb=rgb)


# -----------------------------------------------------------------------------
# Targets: each function maps the render buffers (and the scene) to (target, validity mask or None), in the value
# conventions of the real loaders (see the contract / modsquad_spec.md 6.2). 8-bit tasks are quantised like a PNG.


def corner_points(scene):
    """3D corners (P, 3) for keypoints3d: box vertices, the rim ends of cans and pillars (where the silhouette lines
    seen from the camera meet the top and bottom rims) and the floor corners where two walls meet."""
    points = [np.zeros((0, 3))]
    for obj in scene.objects:
        for prim in obj.primitives:
            if prim.kind == "box":
                signs = np.array(np.meshgrid([-1, 1], [-1, 1], [-1, 1])).reshape(3, 8).T
                points.append(prim.center + (signs * prim.size) @ yaw_matrix(prim.yaw).T)
            elif prim.kind == "cylinder" and SYNTHETIC_OBJECT_CATEGORIES[obj.category] in ("can", "pillar"):
                view = (prim.center - scene.camera)[[0, 2]]
                across = np.array([-view[1], 0, view[0]]) / np.linalg.norm(view) * prim.size[0]
                for y in (-prim.size[1], prim.size[1]):
                    points.append(prim.center + [0, y, 0] + np.array([across, -across]))
    walls = {p.name: p.normal * p.offset for p in scene.planes}  # a point of each wall
    for side in ("left", "right"):
        if side in walls and "back" in walls:
            points.append([[walls[side][0], 0.0, walls["back"][2]]])
    return np.concatenate(points)


def keypoints3d(buf, scene):
    """Gaussian blobs at the visible 3D corners (NARF-like), raw 16-bit scale up to 50000."""
    H, W = buf["z"].shape
    pix, z = project(scene, corner_points(scene), H)
    col, row = np.round(pix).astype(int).T
    inside = (z > 0) & (col >= 0) & (col < W) & (row >= 0) & (row < H)
    pix, z, col, row = pix[inside], z[inside], col[inside], row[inside]
    # visible = nothing in front of the corner: the farthest z-buffer value around its pixel is not nearer
    zmax = np.max(np.stack(neighbour_views(buf["z"]) + [buf["z"]]), 0)
    visible = zmax[row, col] >= z - (0.05 + 0.02 * z)
    pix = pix[visible]
    # at least 1.5 px: thinner blobs are sub-pixel at 32 px, where an L1-trained model predicts none of them (the
    # per-pixel median of a sparse map is its background); at 64 px and up the blob scales with the image
    sigma = max(1.5, H / 40)
    gx = np.exp(-(np.arange(W) - pix[:, :1]) ** 2 / (2 * sigma ** 2))  # (P, W)
    gy = np.exp(-(np.arange(H) - pix[:, 1:]) ** 2 / (2 * sigma ** 2))  # (P, H)
    v = 50000 * np.max(gy[:, :, None] * gx[:, None, :], 0, initial=0.0)
    return rescale(v, 0, 65536)[None], None


def edge_occlusion(buf, scene):
    """Occlusion boundaries, blurred as the official loader does (the raw map: occlusion_jumps)."""
    v = occlusion_jumps(buf)
    # v / 409.6 * 2 - 1 (no clip), then a gaussian blur of sigma 4 px at the 224-px scale, as the official loader, but
    # at least 1 px: at 32 px the official scale (0.57 px) leaves 1-px lines that an L1-trained model never predicts
    return gaussian_filter(v / 409.6 * 2 - 1, max(1.0, 4 * v.shape[0] / 224), mode="nearest")[None], None


def occlusion_jumps(buf):
    """The raw edge_occlusion map, in the 16-bit files' units: 512 * the depth jump (m) at the nearer pixel of a jump
    between two surfaces, 0 elsewhere (at most 4096)."""
    t, surface, is_object = np.minimum(buf["t"], 128.0), buf["surface"], buf["object"] >= 0
    v = np.zeros_like(t)
    for t_nb, s_nb in zip(neighbour_views(t), neighbour_views(surface)):
        jump = t_nb - t
        # a jump counts if the neighbour is another surface and clearly farther (not a grazing floor); the horizon
        # (floor or wall against the sky) is not an occlusion, an object against the sky is
        edge = (s_nb != surface) & (jump > 0.05 * t + 0.02) & ((s_nb >= 0) | is_object)
        v = np.maximum(v, np.where(edge, 512 * np.minimum(jump, 8.0), 0))
    return v


def edge_texture(buf, scene):
    """Texture and colour edges: Sobel gradient magnitude of the albedo (no shading), raw scale 1500 per unit."""
    gx, gy = sobel(buf["albedo"])
    v = 1500 * np.sqrt((gx ** 2 + gy ** 2).sum(-1))
    return rescale(v, 0, 0.08 * 2 ** 16)[None], None


def keypoints2d(buf, scene):
    """2D corners: Harris response of the grey image, raw 16-bit scale."""
    gx, gy = sobel(buf["rgb"].mean(-1))
    sigma = buf["rgb"].shape[0] / 32
    sxx, syy, sxy = (gaussian_filter(a, sigma, mode="nearest") for a in (gx * gx, gy * gy, gx * gy))
    # R = det(M) - 0.05 tr(M)^2 with M the structure tensor
    v = 10000 * np.maximum(sxx * syy - sxy ** 2 - 0.05 * (sxx + syy) ** 2, 0)
    return rescale(v, 0, 0.005 * 2 ** 16)[None], None


def class_object(buf, scene):
    """Soft distribution over object categories by visible area (uniform if no object is visible)."""
    area = np.bincount(buf["category"][buf["category"] >= 0], minlength=len(SYNTHETIC_OBJECT_CATEGORIES))
    total = area.sum()
    return (area / total if total else np.full(len(area), 1 / len(area))).astype(np.float32), None


def principal_curvature(buf, scene):
    # 8-bit encoding with zero curvature at 127 (16 levels per 1/m), standardised with the official constants
    u = np.clip(np.round(127 + 16 * buf["curvature"]), 0, 255)
    return ((u - [123.572, 120.1]) / [31.922, 21.658]).transpose(2, 0, 1), None


TASKONOMY_TARGETS = {
    "class_object": class_object,
    "class_scene": lambda buf, scene: (np.eye(len(SYNTHETIC_SCENE_CATEGORIES))[scene.layout], None),
    "depth_euclidean": lambda buf, scene: tuple(a[None] for a in encode_depth(buf["t"])),
    "depth_zbuffer": lambda buf, scene: tuple(a[None] for a in encode_depth(buf["z"])),
    "edge_occlusion": edge_occlusion,
    "edge_texture": edge_texture,
    "keypoints2d": keypoints2d,
    "keypoints3d": keypoints3d,
    # camera-frame normal as an 8-bit RGB; the sky gets the "no normal" grey 128 and is masked
    "normal": lambda buf, scene: (to_8bit(buf["normal"]).transpose(2, 0, 1), (buf["surface"] >= 0)[None]),
    "principal_curvature": principal_curvature,
    # shading without albedo, 3 identical 8-bit channels
    "reshading": lambda buf, scene: (np.repeat(to_8bit(buf["shading"] * 2 - 1)[None], 3, 0), None),
    # appearance segments (texture x quantised colour) and surface segments, stored as 8-bit ids
    "segment_unsup2d": lambda buf, scene: ((3 * buf["appearance"] / 255 * 2 - 1)[None], None),
    "segment_unsup25d": lambda buf, scene: ((5 * buf["segment_25d"] / 255 * 2 - 1)[None], None),
}


def human_parts(buf, scene):
    parts = np.where(buf["category"] == FIGURE, buf["part"], 0)
    # images without a visible figure are ignored entirely (255), as PASCAL images without a person
    return (parts if parts.any() else np.full_like(parts, 255)).astype(np.int64), None


def saliency(buf, scene):
    """The most prominent object: the largest visible one (ties: the nearest, since objects are sorted)."""
    obj = buf["object"]
    if (obj < 0).all():
        return np.zeros((1,) + obj.shape, np.float32), None
    return (obj == np.bincount(obj[obj >= 0]).argmax())[None].astype(np.float32), None


def semantic_edge(buf, scene):
    """1-px boundaries between different objects / the background: object id differs from the right or lower pixel."""
    obj = np.pad(buf["object"], ((0, 1), (0, 1)), mode="edge")
    return ((obj[:-1, :-1] != obj[:-1, 1:]) | (obj[:-1, :-1] != obj[1:, :-1]))[None].astype(np.float32), None


PASCAL_TARGETS = {
    "semseg": lambda buf, scene: ((buf["category"] + 1).astype(np.int64), None),
    "human_parts": human_parts,
    "saliency": saliency,
    "normals": lambda buf, scene: (buf["normal"].transpose(2, 0, 1), (buf["surface"] >= 0)[None]),
    "edge": semantic_edge,
}


# -----------------------------------------------------------------------------
# Task selection and the synthetic Dataset


def select_tasks(available, names, dataset="this dataset"):
    """The (name, channels, kind) tuples of `available` named in `names` (None = all), in the dataset's order, so
    task indices always follow the official order."""
    if names is None:
        return tuple(available)
    valid = [task[0] for task in available]
    for name in names:
        if name not in valid:
            raise ValueError(f"unknown task '{name}' for {dataset}; valid tasks: {', '.join(valid)}")
    return tuple(task for task in available if task[0] in names)


class SyntheticScenes(torch.utils.data.Dataset):
    """Procedurally rendered multi-task scenes; sample i of a split is a pure function of (seed, split, i).

    task_set "taskonomy" gives the 13 Taskonomy tasks, "pascal" the 5 PASCAL-Context tasks; tasks= selects by name.
    cache=True keeps every sample in memory once rendered, so later epochs read it instead of rendering it again
    (identical tensors; about 90 KB a sample at 32 px with the 13 tasks). The cache belongs to the process: with
    DataLoader workers each worker fills its own, and loses it when the loader ends.
    cache_dir=FOLDER also shares the rendering between processes: the whole split, every task of the task set, is
    read from one file there (written, atomically, by the first process that needs it), and this dataset's tasks are
    taken from it. reproduce.py's runs of one seed share their scenes this way: the same tensors, rendered once.
    """

    def __init__(self, split="train", length=2048, task_set="taskonomy", img_size=32, seed=0, tasks=None,
                 cache=False, cache_dir=None):
        assert split in SPLIT_IDS, f"split must be one of {tuple(SPLIT_IDS)}"
        assert task_set in ("taskonomy", "pascal"), "task_set must be 'taskonomy' or 'pascal'"
        available = SYNTHETIC_TASKONOMY_TASKS if task_set == "taskonomy" else SYNTHETIC_PASCAL_TASKS
        self.tasks = select_tasks(available, tasks, f"synthetic ({task_set})")
        self.split, self.length, self.task_set, self.img_size, self.seed = split, length, task_set, img_size, seed
        self.cache = {} if cache or cache_dir else None  # index -> (image, targets)
        if cache_dir:
            self.load_rendered(cache_dir)

    def __len__(self):
        return self.length

    def scene(self, i):
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for {self.length} samples")
        return sample_scene(np.random.default_rng([self.seed, SPLIT_IDS[self.split], i]))

    def __getitem__(self, i):
        i = i[0] if isinstance(i, tuple) else i  # (index, seed) as the real datasets take: a scene has no augmentation
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        scene = self.scene(i)
        buf = render_scene(scene, self.img_size)
        image = torch.from_numpy(buf["rgb"].transpose(2, 0, 1) * 2 - 1).float()  # (3, H, W) in [-1, 1]
        targets, compute = {}, TASKONOMY_TARGETS if self.task_set == "taskonomy" else PASCAL_TARGETS
        for name, _, _ in self.tasks:
            value, mask = compute[name](buf, scene)
            targets[name] = torch.from_numpy(value if value.dtype == np.int64 else value.astype(np.float32))
            if mask is not None:
                targets[name + "_mask"] = torch.from_numpy(mask)
        if self.cache is not None:
            self.cache[i] = image, targets
        return image, targets

    def load_rendered(self, cache_dir):
        """Fill the cache from cache_dir's file of this split (rendering and writing it first if there is none)."""
        name = f"{self.task_set}_{self.split}_seed{self.seed}_{self.length}x{self.img_size}px.pt"
        path = os.path.join(cache_dir, name)
        if os.path.exists(path):
            stored = torch.load(path, weights_only=True)
        else:
            every_task = SyntheticScenes(self.split, self.length, self.task_set, self.img_size, self.seed)
            samples = [every_task[i] for i in range(self.length)]
            stored = {"images": torch.stack([image for image, _ in samples]),  # (N, 3, H, W)
                      "targets": {k: torch.stack([t[k] for _, t in samples]) for k in samples[0][1]}}
            os.makedirs(cache_dir, exist_ok=True)
            torch.save(stored, f"{path}.{os.getpid()}.tmp")
            os.replace(f"{path}.{os.getpid()}.tmp", path)  # atomic: two runs rendering at once both write it whole
        keys = [k for k in stored["targets"] if k.removesuffix("_mask") in {name for name, _, _ in self.tasks}]
        for i in range(self.length):
            self.cache[i] = stored["images"][i], {k: stored["targets"][k][i] for k in keys}


# =============================================================================
# Real datasets, read exactly as distributed: Taskonomy (omnitools layout) and PASCAL-Context (PASCAL_MT layout).
#
# Taskonomy follows the official Mod-Squad loader (util/dataset_taskonomy.py): every modality is resized to 256
# (bilinear), cropped to 224 (random in train, centre at test), flipped with p=0.5 in train, and only then decoded
# with the official per-task normalisation (log depth, 127-centred curvature, rescaled 16-bit maps, edge_occlusion
# blurred with sigma 4 and never clipped). Where I depart from it, on purpose:
#   - domains are joined by (building, point, view), not by the index in sorted(os.listdir) (one missing file there
#     silently misaligns every later target); a missing file is an error that names it;
#   - a horizontal flip negates the x channel of `normal` (the official code mirrors the image but not the vectors);
#   - label-like maps (segment_unsup*, the validity masks) are resized with NEAREST (official: bilinear);
#   - depth and normal carry validity masks (official: none); the random crop cannot pass the border (official
#     randint(0, 33) is inclusive, off by one); no first-10 %-of-test subset.
# PASCAL-Context follows MTL-PyTorch/M3ViT data/pascal_context.py and custom_transforms.py: 21-class semseg, 7-class
# human parts from the PASCAL-Part 'anno' structs, distilled normals kept on the 170 NYU-compatible classes, saliency
# > 0.5, edges from the LabelMap (Laplacian != 0, thinned); train = flip, scale 0.75-1.25, resize to 512 (test:
# resize only), each step with cv2's interpolation as MTL-PyTorch calls it (image and normals cubic on float, labels
# nearest; see cv2_resize), the image truncated to 8 bits at the end as its ToTensor does. Departures: no +-20
# degree rotation, image in [-1, 1] instead of ImageNet mean/std, image values past [0, 255] clipped before the
# truncation (numpy's astype(uint8) there wraps them: -1 -> 255), the normals mask resized with NEAREST
# (MTL-PyTorch: "non-zero after a cubic resize", which dilates it by the kernel support). The final evaluation at
# each image's own size (native_labels=True) is in evaluate.py (evaluate_pascal_native).

# -----------------------------------------------------------------------------
# Constants of the real datasets

# the official loader always skips these: woodbine is missing from the dataset, wiconisco lacks 80 edge_texture
# images (util/dataset_taskonomy.py loadSplit)
TASKONOMY_SKIP_BUILDINGS = ("woodbine", "wiconisco")
# ... and, by split file, its `new_list` (fullplus, the paper's runs) and `no_list` (medium), with the exact names of
# util/dataset_taskonomy.py; a CSV under any other name gets only the two above
TASKONOMY_SPLIT_SKIPS = {
    "train_val_test_fullplus.csv": ("ballou", "tansboro", "cutlerville", "macarthur", "rough", "darnestown",
                                    "maryhill", "bowlus", "tomkins", "herricks", "mosquito", "brinnon", "gough"),
    "train_val_test_medium.csv": ("brinnon", "cauthron", "cochranton", "donaldson", "german", "castor", "tokeland",
                                  "andover", "rogue", "athens", "broseley", "tilghmanton", "winooski", "rosser",
                                  "arkansaw", "bonnie", "willow", "timberon", "bohemia", "micanopy", "thrall",
                                  "annona", "byers", "anaheim", "duarte", "wyldwood"),
}
TASKONOMY_DOWNLOAD = ("pip install omnidata-tools && omnitools.download rgb {domains} --components taskonomy "
                      "--subset tiny --dest {root} --agree --name NAME --email EMAIL")
TASKONOMY_LAYOUT = "<root>/<domain>/taskonomy/<building>/point_<P>_view_<V>_domain_<domain>.png (.npy for class_*)"
_16BIT = ("depth_euclidean", "depth_zbuffer", "edge_occlusion", "edge_texture", "keypoints2d", "keypoints3d")
# 16-bit maps rescaled from [lo, hi] raw units to [-1, 1]: (lo, hi, clip), official current_scale / no_clip
_RESCALE = {"keypoints2d": (0.0, 0.005 * 2**16, True), "keypoints3d": (0.0, 1.0 * 2**16, True),
            "edge_texture": (0.0, 0.08 * 2**16, True), "edge_occlusion": (0.0, 0.00625 * 2**16, False)}
_CURVATURE_MEAN, _CURVATURE_STD = (123.572, 120.1), (31.922, 21.658)  # official curvature_preprocess
# missing depth (sky, holes). The taskbank masks raw >= 64500 ("max - 1000"); I mask exactly the marker, since
# on the real sample view no value lies between 4617 (9 m) and 65535, and 64500 would cut valid depth past 126 m
_DEPTH_INVALID = 65535
_WARNED = set()  # the skipped-buildings warnings printed so far by this process

PASCAL_TASKS = (("semseg", 21, "dense"), ("human_parts", 7, "dense"), ("saliency", 1, "dense"),
                ("normals", 3, "dense"), ("edge", 1, "dense"))
PASCAL_MT_URL = "https://data.vision.ee.ethz.ch/kmaninis/share/MTL/PASCAL_MT.tgz"
PASCAL_PERSON = 15  # PASCAL-Part class_ind of "person"
# MTL-PyTorch HUMAN_PART[6]: part name -> 1 head, 2 torso, 3 upper arm, 4 lower arm + hand, 5 upper leg, 6 lower leg
HUMAN_PART = {**dict.fromkeys(("hair", "head", "lear", "rear", "leye", "reye", "lebrow", "rebrow", "mouth", "nose"), 1),
              **dict.fromkeys(("neck", "torso"), 2), **dict.fromkeys(("luarm", "ruarm"), 3),
              **dict.fromkeys(("llarm", "rlarm", "lhand", "rhand"), 4), **dict.fromkeys(("luleg", "ruleg"), 5),
              **dict.fromkeys(("llleg", "rlleg", "lfoot", "rfoot"), 6)}
# PASCAL-Context LabelMap ids (1..459) on which distilled normals are kept: every NYU class name that is also a
# context class except 'unknown', plus 'tvmonitor'. I computed the set from MTL-PyTorch's data/db_info/
# nyu_classes.json and context_classes.json (commit d16e10b) with exactly its rule; it has the expected 170 ids.
NYU_NORMAL_CLASSES = frozenset((
    3, 4, 6, 9, 10, 11, 13, 15, 17, 18, 22, 23, 29, 30, 33, 34, 36, 37, 38, 39, 41, 43, 46, 49, 50, 51, 53, 55, 56,
    59, 61, 62, 65, 66, 68, 69, 72, 73, 78, 83, 84, 85, 87, 88, 95, 96, 101, 104, 105, 107, 111, 113, 115, 122, 124,
    135, 141, 142, 143, 146, 150, 154, 157, 158, 159, 165, 172, 174, 181, 183, 184, 191, 193, 195, 197, 199, 202,
    213, 215, 216, 219, 220, 223, 225, 228, 230, 232, 233, 238, 239, 242, 243, 246, 250, 251, 252, 255, 260, 261,
    263, 269, 272, 273, 275, 281, 283, 284, 285, 286, 287, 288, 290, 291, 292, 293, 295, 304, 307, 309, 310, 314,
    315, 319, 323, 329, 330, 331, 336, 342, 345, 349, 350, 351, 352, 355, 357, 368, 370, 371, 374, 379, 380, 383,
    384, 397, 401, 403, 405, 407, 408, 411, 412, 413, 414, 417, 419, 421, 423, 427, 429, 430, 432, 440, 441, 442,
    443, 444, 446, 454, 457))

# -----------------------------------------------------------------------------
# Decode helpers


def read_image(path, sixteen_bit=False):
    """Decode a PNG/JPEG into a numpy array (H, W) or (H, W, C), naming the file if it is missing or corrupt."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing file {path}")
    try:
        with Image.open(path) as img:
            img.load()  # PIL decodes lazily: force it here so truncated files fail with their path
            mode, arr = img.mode, np.asarray(img)
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot decode {path} ({e}): the file is truncated or corrupt; re-download it") from e
    # current Pillow opens 16-bit PNGs as 'I;16' (uint16), Pillow 9 as 'I' (int32); an 8-bit file here would be
    # silently decoded 256x too small, so I refuse it
    if sixteen_bit and not mode.startswith("I"):
        raise ValueError(f"{path} is a {mode} image, expected a 16-bit single-channel PNG")
    return arr


def read_png(path, sixteen_bit=False):
    """Decode a PNG with libpng (torchvision.io, ~10 % faster than PIL) into a (C, H, W) tensor: for a 16-bit
    single-channel file (sixteen_bit=True, anything else refused) uint16, or int32 where torch cannot flip uint16
    (torch < 2.7) or torchvision cannot decode 16 bits (< 0.20: PIL decodes it); uint8 otherwise; palette files give
    their indices, as PIL does. Names the file if it is missing, truncated or corrupt."""
    try:
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders (for torchcodec); they still work
            warnings.simplefilter("ignore", DeprecationWarning)
            t = torchvision.io.decode_png(torchvision.io.read_file(path), torchvision.io.ImageReadMode.UNCHANGED)
    except RuntimeError as e:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"missing file {path}; re-download it") from None
        if "8-bit" in str(e):  # torchvision < 0.20 decodes at most 8 bits: PIL (read_image) does the 16-bit files
            t = torch.from_numpy(np.asarray(read_image(path), dtype=np.int32))[None]
        else:
            reason = str(e).split(", ")[-1]  # drop libpng's source location
            raise ValueError(f"cannot decode {path} ({reason}): the file is truncated or corrupt; re-download it") from e
    sixteen = t.dtype != torch.uint8  # uint16 (torchvision < 0.21, or PIL: int32)
    if sixteen_bit != sixteen or (sixteen_bit and t.shape[0] != 1):
        # an 8-bit file read as 16-bit would decode 256x too small, and the converse 256x too large
        raise ValueError(f"{path} is a {t.shape[0]}-channel {16 if sixteen else 8}-bit PNG, expected "
                         f"{'a 16-bit single-channel' if sixteen_bit else 'an 8-bit'} PNG; re-download it")
    return t.to(torch.int32) if t.dtype == torch.uint16 and not _UINT16_FLIP else t


def _uint16_flips():
    try:
        torch.zeros(1, dtype=torch.uint16).flip(0)
        return True
    except RuntimeError:  # "flip_cpu" not implemented for 'UInt16' (torch < 2.7)
        return False


_UINT16_FLIP = _uint16_flips()


def resize_crop(t, size, top, left, crop, dtype=None):
    """v2.functional.resize(t, [size, size], BILINEAR, antialias=True)[:, top:top + crop, left:left + crop] of a
    (C, H, W) tensor, computed in `dtype` (None: t's own; uint8 resizes with torch's integer kernel, as v2 does).
    Where H and W are integer multiples of size (the real 512 -> 256), only the input window the crop needs is
    resized: with one more output row and column on each side (dropped), every kept output has the same taps and
    weights as in the full resize, so the values are identical, for ~78 % of the work."""
    H, W = t.shape[1:]
    cast = (lambda x: x) if dtype is None else (lambda x: x.to(dtype))  # noqa: E731
    if (H, W) == (size, size):  # v2 returns an image of the requested size as it is
        return cast(t[:, top:top + crop, left:left + crop])
    if t.dtype == torch.uint16 and dtype == torch.float32 and (H, W) == (2 * size, 2 * size) and \
            min(top, left) >= 1 and max(top, left) + crop <= size - 1:
        # the real case, 512 -> 256, away from the border: each output is (a + 3b + 3c + d) / 8 of its 4 input rows,
        # then of its 4 columns (torch's weights there are exactly 1/8, 3/8, 3/8, 1/8). On integers below 2^16 every
        # partial sum is an integer below 2^24, exact in float32 in any order: the same values, at a third the cost
        x = t[:, 2 * top - 1:2 * (top + crop) + 1, 2 * left - 1:2 * (left + crop) + 1].to(dtype)  # (C, 2S+2, 2S+2)
        # rows first (adding whole rows is the fast direction), then columns
        x = (x[:, 0:2 * crop:2] + x[:, 3:2 * crop + 3:2]).add_(x[:, 1:2 * crop + 1:2] + x[:, 2:2 * crop + 2:2],
                                                               alpha=3)  # (C, S, 2S+2): 8x the column means
        x = (x[:, :, 0:2 * crop:2] + x[:, :, 3:2 * crop + 3:2]).add_(
            x[:, :, 1:2 * crop + 1:2] + x[:, :, 2:2 * crop + 2:2], alpha=3)  # (C, S, S): 64x the means
        return x.div_(64)
    r0, r1, c0, c1 = 0, size, 0, size  # the output rows and columns to compute, and the input they need
    window = t
    if H % size == 0 and W % size == 0:
        r0, r1, c0, c1 = max(top - 1, 0), min(top + crop + 1, size), max(left - 1, 0), min(left + crop + 1, size)
        kh, kw = H // size, W // size
        window = t[:, kh * r0:kh * r1, kw * c0:kw * c1]
    # v2's own resize (not F.interpolate): on every torchvision its uint8 path is the one the old loader took
    out = v2.functional.resize(cast(window), [r1 - r0, c1 - c0], v2.InterpolationMode.BILINEAR, antialias=True)
    return out[:, top - r0:top - r0 + crop, left - c0:left - c0 + crop]


def _thin_luts():
    """Deletion look-up tables of Guo & Hall (1989) thinning, indexed by the 8-neighbour code (as skimage.thin)."""
    b = (np.arange(256)[:, None] >> np.arange(8)) & 1 == 1  # (256, 8): bit k = neighbour k, counter-clockwise from E
    g1 = sum(~b[:, i] & (b[:, i + 1] | b[:, (i + 2) % 8]) for i in (0, 2, 4, 6)) == 1
    n1 = sum(b[:, k] | b[:, k - 1] for k in (1, 3, 5, 7))
    n2 = sum(b[:, k] | b[:, (k + 1) % 8] for k in (1, 3, 5, 7))
    g2 = np.isin(np.minimum(n1, n2), (2, 3))
    g3 = ~((b[:, 1] | b[:, 2] | ~b[:, 7]) & b[:, 0])
    g3p = ~((b[:, 5] | b[:, 6] | ~b[:, 3]) & b[:, 4])
    return g1 & g2 & g3, g1 & g2 & g3p


_THIN_LUTS = _thin_luts()
_MAT_ERRORS = (OSError, ValueError, KeyError, IndexError, TypeError, scipy.io.matlab.MatReadError)
_NEIGHBOUR_CODE = np.array([[8, 4, 2], [16, 0, 1], [32, 64, 128]], dtype=np.uint8)


def thin(mask):
    """skimage.morphology.thin: peel 8-connected regions to 1-px lines, two sub-iterations until nothing changes."""
    skel = mask.astype(np.uint8)
    n_old = -1
    while n_old != skel.sum():
        n_old = skel.sum()
        for lut in _THIN_LUTS:
            code = scipy.ndimage.correlate(skel, _NEIGHBOUR_CODE, mode="constant")
            skel[lut[code]] = 0
    return skel.astype(bool)


def label_edges(label_map):
    """MTL-PyTorch edge GT: thin(cv2.Laplacian(LabelMap) != 0), with cv2's 3x3 kernel and reflect-101 border."""
    lap_kernel = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=np.float64)
    # mode="mirror" is scipy's name for cv2's BORDER_REFLECT_101 (d c b | a b c d | c b a)
    lap = scipy.ndimage.correlate(label_map.astype(np.float64), lap_kernel, mode="mirror")
    return thin(lap != 0)


def human_parts_from_mat(path):
    """7-class part map (0 background) from a PASCAL-Part 'anno' .mat, or None when no person has part labels."""
    try:
        # anno.objects: (n,) structs (class, class_ind, mask, parts), read by position as MTL-PyTorch does
        objects = scipy.io.loadmat(path)["anno"][0][0][1][0]
    except _MAT_ERRORS as e:
        raise ValueError(f"cannot read the PASCAL-Part 'anno' struct in {path} ({e}); re-extract PASCAL_MT") from e
    target = None
    for obj in objects:
        # as MTL-PyTorch: only persons that carry part annotations; later parts overwrite earlier ones
        if obj[1][0][0] != PASCAL_PERSON or len(obj[3]) == 0:
            continue
        if target is None:
            target = np.zeros(obj[2].shape, dtype=np.int64)
        for part in obj[3][0]:  # parts: (k,) structs (part_name, mask)
            name = str(part[0][0])
            if name not in HUMAN_PART:
                raise ValueError(f"{path}: unknown person part {name!r}; known parts are {sorted(HUMAN_PART)}")
            target[part[1].astype(bool)] = HUMAN_PART[name]
    return target


def _check_size(arr, hw, path):
    """Every modality of a sample must have the image's height and width."""
    if arr.shape[:2] != hw:
        raise ValueError(f"{path} is {arr.shape[1]}x{arr.shape[0]} but its image is {hw[1]}x{hw[0]}")
    return arr


def _listdir(path):
    return set(os.listdir(path)) if os.path.isdir(path) else set()

# -----------------------------------------------------------------------------
# Taskonomy


def read_split_csv(path, split):
    """Buildings whose `split` column is 1 in an official train_val_test_*.csv ('trainval' = train or val)."""
    columns = {"train": (1,), "val": (2,), "test": (3,), "trainval": (1, 2)}[split]
    with open(path, newline="") as f:
        lines = [ln.strip() for ln in f.read().splitlines() if ln.strip()]  # splitlines: \r (old Mac), \n, \r\n
    buildings = []
    for i, line in enumerate(lines[1:], start=2):
        row = line.split(",")
        if len(row) != 4 or any(c not in ("0", "1") for c in row[1:]):
            raise ValueError(f"{path} line {i}: expected 'building,train,val,test' with 0/1 flags, got {line!r}")
        if any(row[c] == "1" for c in columns):
            buildings.append(row[0])
    return buildings


class TaskonomyDataset(Dataset):
    """Taskonomy views as (image, targets), from the omnitools layout; see the section docstring for decisions.

    split: "train" | "val" | "test" | "trainval" (the official Mod-Squad training set), used with `split_csv`;
    buildings: an explicit list instead of a CSV; augment: random crop + flip (default: on for train/trainval);
    class_softmax: softmax the class_* vectors (the taskbank treats them as logits; Mod-Squad uses them raw).
    Buildings absent from root, or present in only some of the needed domains (as in any partial download), are
    skipped with one warning line; require_all_buildings=True makes that an error instead.

    dataset[i] draws its crop and flip from torch's global RNG; dataset[(i, seed)] from a generator seeded with
    `seed`, so that sample's augmentation is the same whichever worker or process loads it.
    """

    def __init__(self, root, split="train", tasks=None, buildings=None, split_csv=None, img_size=224, augment=None,
                 normalisation="official", require_all_buildings=False, class_softmax=False):
        if split not in ("train", "val", "test", "trainval"):
            raise ValueError(f"split must be 'train', 'val', 'test' or 'trainval', got {split!r}")
        if normalisation != "official":
            raise ValueError(f"only normalisation='official' (modsquad_spec.md 6.2) exists, got {normalisation!r}")
        self.tasks = select_tasks(TASKONOMY_TASKS, tasks, "Taskonomy")
        self.root, self.img_size, self.class_softmax = root, img_size, class_softmax
        self.augment = split in ("train", "trainval") if augment is None else augment
        domains = ["rgb"] + [name for name, _, _ in self.tasks]
        download = TASKONOMY_DOWNLOAD.format(domains=" ".join(domains[1:]), root=root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"Taskonomy root {root} does not exist; download it with: {download}")
        for d in domains:
            if not os.path.isdir(os.path.join(root, d, "taskonomy")):
                raise FileNotFoundError(f"no {os.path.join(root, d, 'taskonomy')}: the {d!r} domain is missing; "
                                        f"expected layout {TASKONOMY_LAYOUT}; download with: {download}")

        if (buildings is None) == (split_csv is None):
            raise ValueError("pass exactly one of buildings=[...] or split_csv=<train_val_test_*.csv> "
                             "(from StanfordVL/taskonomy data/assets/splits_taskonomy.zip)")
        skip = TASKONOMY_SKIP_BUILDINGS
        if buildings is None:
            buildings = read_split_csv(split_csv, split)
            skip += TASKONOMY_SPLIT_SKIPS.get(os.path.basename(split_csv), ())
        buildings = [b for b in buildings if b not in skip]
        # a partial download: buildings absent from every domain, or present in some only (one tar per domain)
        present = {d: _listdir(os.path.join(root, d, "taskonomy")) for d in domains}
        lacking = {b: [d for d in domains if b not in present[d]] for b in buildings}
        absent = [b for b in buildings if len(lacking[b]) == len(domains)]
        partial = [b for b in buildings if 0 < len(lacking[b]) < len(domains)]
        if absent or partial:
            where = f"the {split} split of {split_csv}" if split_csv is not None else "the buildings asked for"
            kinds = [f"{len(absent)} absent (e.g. {', '.join(absent[:3])})"] if absent else []
            kinds += [f"{len(partial)} in only some of the {len(domains)} domains (e.g. {partial[0]} lacks "
                      f"{', '.join(lacking[partial[0]][:3])})"] if partial else []
            found = (f"{len(absent) + len(partial)} of the {len(buildings)} buildings of {where} are incomplete under "
                     f"{root}: {' and '.join(kinds)}")
            if require_all_buildings:
                raise FileNotFoundError(f"{found}; download them with: {download}, or leave out "
                                        f"--require-all-buildings (require_all_buildings=True) to skip them")
            warning = (f"warning: {found}; skipping them, reading the other "
                       f"{len(buildings) - len(absent) - len(partial)} (--require-all-buildings, "
                       f"require_all_buildings=True, stops instead)")
            if os.environ.get("RANK", "0") == "0" and warning not in _WARNED:  # once per run, not per rank or reload
                _WARNED.add(warning)
                print(warning, file=sys.stderr)
        buildings = [b for b in buildings if not lacking[b]]
        if not buildings:
            raise FileNotFoundError(f"no building has all of {', '.join(domains)} under {root}; expected layout "
                                    f"{TASKONOMY_LAYOUT}; download with: {download}")

        # index the views from rgb, then require the same (point, view) in every domain: a join, not sorted order
        rgb_re = re.compile(r"point_(\d+)_view_(\d+)_domain_rgb\.png$")
        self.views = []  # (building, point, view)
        for b in sorted(buildings):
            keys = sorted((int(m[1]), int(m[2])) for f in os.listdir(os.path.join(root, "rgb", "taskonomy", b))
                          if (m := rgb_re.match(f)))
            for d in domains[1:]:
                present = _listdir(os.path.join(root, d, "taskonomy", b))
                missing = [f for p, v in keys if os.path.basename(f := self._path(b, p, v, d)) not in present]
                if missing:
                    raise FileNotFoundError(f"{len(missing)} {d} file(s) missing for views that exist in rgb, "
                                            f"e.g. {missing[0]}; re-download {d} for {b} or drop the building")
            self.views += [(b, p, v) for p, v in keys]
        if not self.views:
            raise FileNotFoundError(f"no rgb views under {root} for buildings {buildings}; expected {TASKONOMY_LAYOUT}")

        # official geometry: resize to 256 (bilinear, antialiased), crop 224; label maps and masks resize NEAREST
        self.resize = round(img_size * 256 / 224)
        self._nearest = {}  # (H, W) -> the NEAREST resize's source rows and columns (_nearest_source)
        self._curvature_mean = torch.tensor(_CURVATURE_MEAN)[:, None, None]
        self._curvature_std = torch.tensor(_CURVATURE_STD)[:, None, None]

    def _path(self, building, point, view, domain):
        ext = ".npy" if domain.startswith("class_") else ".png"
        return os.path.join(self.root, domain, "taskonomy", building,
                            f"point_{point}_view_{view}_domain_{domain}{ext}")

    def __len__(self):
        return len(self.views)

    def _load_class(self, path, channels):
        try:
            vec = np.load(path).astype(np.float32).reshape(-1)  # stored (C,) or (1, C): squeeze to (C,)
        except (OSError, ValueError, EOFError) as e:
            raise ValueError(f"cannot read {path} ({e}): the file is truncated or corrupt; re-download it") from e
        if vec.shape != (channels,):
            raise ValueError(f"{path} holds {vec.size} values, expected {channels}")
        vec = torch.from_numpy(vec)
        return vec.softmax(0) if self.class_softmax else vec

    def _crop_flip(self, generator=None):
        """(top, left, flip) of one sample: the centred crop, or in augment mode v2.RandomCrop's two draws (top, then
        left) and a flip with p = 0.5, from `generator` (None: torch's global RNG)."""
        R, S = self.resize, self.img_size
        if not self.augment:
            return round((R - S) / 2), round((R - S) / 2), False  # as v2.CenterCrop
        top, left = (int(torch.randint(0, R - S + 1, (), generator=generator)) if R > S else 0 for _ in "tl")
        return top, left, bool(torch.rand((), generator=generator) < 0.5)

    def __getitem__(self, index):
        index, generator = (index[0], torch.Generator().manual_seed(index[1])) if isinstance(index, tuple) else \
            (index, None)
        b, p, v = self.views[index]
        paths = {d: self._path(b, p, v, d) for d in ["rgb"] + [n for n, _, _ in self.tasks]}
        targets = {n: self._load_class(paths[n], c) for n, c, kind in self.tasks if kind == "image"}
        top, left, flip = self._crop_flip(generator)
        R, S = self.resize, self.img_size

        def resize(t, dtype=None):
            """(C, H, W) at native resolution -> (C, S, S): bilinear antialiased resize, crop, flip. 8-bit maps are
            resized as uint8 (torch's integer kernel, as v2 does), 16-bit ones as float32."""
            t = resize_crop(t, R, top, left, S, dtype)
            return t.flip(-1) if flip else t

        rgb = read_png(paths["rgb"])[:3]  # (3, H, W) uint8
        image = resize(rgb).float().div_(255).mul_(2).sub_(1)  # u / 255 * 2 - 1
        # NEAREST resize, crop and flip are one selection of source rows and columns (a strided view where the
        # resize takes every k-th pixel, as 512 -> 256 does), so masks computed on the selected pixels are the
        # selected masks
        (rows, row_step), (cols, col_step) = self._nearest_source(*rgb.shape[1:])

        def nearest(t):
            r, c = int(rows[top]), int(cols[left])
            t = t[:, r:r + row_step * S:row_step] if row_step else t.index_select(1, rows[top:top + S])
            t = t[:, :, c:c + col_step * S:col_step] if col_step else t.index_select(2, cols[left:left + S])
            return t.flip(-1) if flip else t

        masks = {}
        for n in [n for n, _, kind in self.tasks if kind == "dense"]:
            raw = read_png(paths[n], sixteen_bit=n in _16BIT)
            if raw.shape[1:] != rgb.shape[1:]:
                raise ValueError(f"{paths[n]} is {raw.shape[2]}x{raw.shape[1]} but its image is "
                                 f"{rgb.shape[2]}x{rgb.shape[1]}; re-download it")
            if n.startswith("depth"):
                masks[n + "_mask"] = nearest(raw) != _DEPTH_INVALID
            if n == "normal":
                # "no normal" colour (sky, holes): every channel 127 or 128 (uint8 u - 127 wraps below 127, so
                # 127 <= u <= 128 is u - 127 <= 1); on the real sample it is exactly (128, 128, 128)
                w = nearest(raw[:3]) - 127
                masks[n + "_mask"] = ~((w[0] <= 1) & (w[1] <= 1) & (w[2] <= 1))[None]
            if n in _16BIT:
                t = resize(raw, torch.float32)  # float32 before any arithmetic: log(1 + v) on uint16 wraps at 65535
            elif n.startswith("segment_unsup"):
                t = nearest(raw[:1])  # superpixel ids: one 8-bit channel
            elif n == "principal_curvature":
                t = resize(raw[:3])[:2]  # curvatures in channels 0-1 (a 3-channel uint8 resize is the fast path)
            else:  # normal, reshading (a 1-channel file is repeated to 3)
                t = resize(raw.expand(3, -1, -1) if raw.shape[0] == 1 else raw[:3])
            targets[n] = self._decode(n, t.float())
        if flip and "normal" in targets:
            # deliberate deviation: mirroring the image mirrors the scene, so the normals' x component changes sign
            targets["normal"][0] = -targets["normal"][0]
        targets.update(masks)
        for n in ("depth_euclidean", "depth_zbuffer"):
            if n in targets:
                # 1.0 is the encoding of 65535, whatever bilinear mixed in
                targets[n].masked_fill_(~targets[n + "_mask"], 1.0)
        return image, targets

    def _nearest_source(self, H, W):
        """Per axis (rows, then columns): the source index that v2's NEAREST resize to R x R takes for each output,
        read off that kernel itself on an index ramp, and its step k if those are 0, k, 2k, ... (else None);
        cached per native size."""
        if (H, W) not in self._nearest:
            out = []
            for n in (H, W):
                ramp = torch.arange(n, dtype=torch.float32).view(1, n, 1)  # exact below 2^24
                index = v2.functional.resize(ramp, [self.resize, 1], v2.InterpolationMode.NEAREST)[0, :, 0].long()
                step = int(index[1] - index[0]) if len(index) > 1 else 1
                uniform = step >= 1 and torch.equal(index, index[0] + step * torch.arange(len(index)))
                out.append((index, step if uniform else None))
            self._nearest[H, W] = tuple(out)
        return self._nearest[H, W]

    def _decode(self, name, v):
        """Official normalisation of a raw (C, H, W) float map that the caller owns (changed in place: the same
        operations as rescale() and the official code, without a new tensor per step), after the resize/crop/flip."""
        if name.startswith("depth"):
            # depth in 1/512 m: log(1 + v) / log(2^16), in [0, 1]
            return v.log1p_().div_(math.log(2**16))
        if name == "principal_curvature":
            return v.sub_(self._curvature_mean).div_(self._curvature_std)
        lo, hi, clip = _RESCALE.get(name, (0.0, 255.0, True))  # normal, reshading, segment_unsup*: u / 255 * 2 - 1
        # rescale(): (clip(v, lo, hi) - lo) / (hi - lo) * 2 - 1
        v = (v.clamp_(lo, hi) if clip else v).sub_(lo).div_(hi - lo).mul_(2).sub_(1)
        if name == "edge_occlusion":
            # official gaussian_filter(sigma=4) on the 224 crop, unclipped; sigma scales with the crop size
            v = torch.from_numpy(scipy.ndimage.gaussian_filter(v[0].numpy(), sigma=4 * self.img_size / 224))[None]
        return v

# -----------------------------------------------------------------------------
# PASCAL-Context


def _cv2_axis(n_out, n_in, interpolation):
    """cv2.resize's taps along one axis, as resize.cpp computes them: source position fx = (float)((dx + 0.5) *
    n_in / n_out - 0.5) (scale in double), sx = floor(fx), t = fx - sx in float32; linear: taps sx, sx + 1 with
    (1 - t, t); cubic: sx - 1 .. sx + 2 with Keys' weights, a = -0.75 (interpolateCubic, the last as 1 - the others).
    Returns (K, n_out) int64 taps clamped to [0, n_in) (border replicated) and (K, n_out) float32 weights."""
    fx = ((np.arange(n_out) + 0.5) * (1 / (n_out / n_in)) - 0.5).astype(np.float32)
    sx = np.floor(fx)
    t = fx - sx
    if interpolation == "linear":
        taps, weights = sx + np.arange(2)[:, None], np.stack([1 - t, t])
    else:
        A = np.float32(-0.75)
        c0 = ((A * (t + 1) - 5 * A) * (t + 1) + 8 * A) * (t + 1) - 4 * A
        c1 = ((A + 2) * t - (A + 3)) * t * t + 1
        c2 = ((A + 2) * (1 - t) - (A + 3)) * (1 - t) * (1 - t) + 1
        taps, weights = sx + np.arange(-1, 3)[:, None], np.stack([c0, c1, c2, 1 - c0 - c1 - c2])
    return torch.from_numpy(np.clip(taps, 0, n_in - 1).astype(np.int64)), torch.from_numpy(weights)


def cv2_resize(x, size, interpolation):
    """cv2.resize of a (C, H, W) tensor to size (h, w), as MTL-PyTorch calls it: no antialiasing, pixel centres at
    half-integers, border replicated. "cubic" and "linear" compute in float32, rows first (resize.cpp's HResize, then
    VResize); "nearest" keeps the dtype and takes source pixel floor(dx / (w / W)), in cv2's float64 arithmetic.
    (torch's bicubic has the same kernel and convention, but it computes the source positions in float32, which
    moves a 512 -> 375 bilinear resize by up to 0.013 levels of 255.)"""
    H, W = x.shape[-2:]
    h, w = size
    if (h, w) == (H, W):
        return x  # cv2.resize copies when the size does not change
    if interpolation == "nearest":
        rows = np.minimum(np.floor(np.arange(h) * (1 / (h / H))), H - 1).astype(np.int64)
        cols = np.minimum(np.floor(np.arange(w) * (1 / (w / W))), W - 1).astype(np.int64)
        return x[..., torch.from_numpy(rows)[:, None], torch.from_numpy(cols)]
    if interpolation == "linear" and (H, W) == (2 * h, 2 * w):
        return F.avg_pool2d(x[None].float(), 2)[0]  # cv2 switches INTER_LINEAR to INTER_AREA for an exact 2x shrink
    (rows, row_w), (cols, col_w) = _cv2_axis(h, H, interpolation), _cv2_axis(w, W, interpolation)
    # Σ_k w_k x[tap_k], tap by tap in cv2's order: along the rows, then down the columns; each pass picks whole rows
    # of the transposed map (index_select copies rows; a gather along the last dim was ~10x slower)
    x = x.float().transpose(-1, -2).contiguous()  # (C, W, H)
    x = sum(x.index_select(-2, tap) * weight[:, None] for tap, weight in zip(cols, col_w))  # (C, w, H)
    x = x.transpose(-1, -2).contiguous()  # (C, H, w)
    return sum(x.index_select(-2, tap) * weight[:, None] for tap, weight in zip(rows, row_w))  # (C, h, w)


def cv2_zoom(x, scale, interpolation):
    """cv2.warpAffine(x, cv2.getRotationMatrix2D((W/2, H/2), 0, scale), (W, H)) of a (C, H, W) tensor, zeros outside
    (cv2's default border): MTL-PyTorch's ScaleNRotate without its rotation. "cubic" or "nearest" (keeps the dtype).
    cv2 quantises the sub-pixel source position to 1/32 px, this does not."""
    C, H, W = x.shape
    # source = (dst - c) / s + c with c = (W/2, H/2) in pixel units; in grid_sample's [-1, 1] (align_corners=False)
    # coordinates that is u / s + (1 - 1/s) / W
    theta = torch.tensor([[[1 / scale, 0, (1 - 1 / scale) / W], [0, 1 / scale, (1 - 1 / scale) / H]]])
    grid = F.affine_grid(theta, [1, C, H, W], align_corners=False)
    mode = {"cubic": "bicubic", "nearest": "nearest"}[interpolation]
    out = F.grid_sample(x[None].float(), grid, mode=mode, padding_mode="zeros", align_corners=False)[0]
    return out if interpolation == "cubic" else out.to(x.dtype)


def collate_native(batch):
    """DataLoader collate_fn for PascalContextDataset(native_labels=True): images and targets stacked as usual, the
    native-size labels (a different size per image) kept as a list of dicts."""
    images, targets = torch.utils.data.default_collate([b[:2] for b in batch])
    return images, targets, [b[2] for b in batch]


class PascalContextDataset(Dataset):
    """PASCAL-Context multi-task (PASCAL_MT) as (image, targets); see the section docstring for decisions.

    dataset[index] draws the training augmentation (flip, scale) from torch's global RNG; dataset[(index, seed)]
    draws it from a generator seeded with seed, so a sample is the same in any worker or process.
    normals_valid_classes: LabelMap ids whose distilled normals count as valid (default: MTL-PyTorch's 170).
    native_labels: also return, third, the untouched labels at the image's own size (see native_targets), for the
    final evaluation at native size; batch such samples with collate_fn=collate_native.
    """

    def __init__(self, root, split="train", tasks=None, img_size=512, augment=None,
                 normals_valid_classes=NYU_NORMAL_CLASSES, native_labels=False):
        self.tasks = select_tasks(PASCAL_TASKS, tasks, "PASCAL-Context")
        self.root, self.img_size, self.native_labels = root, img_size, native_labels
        self.augment = split == "train" if augment is None else augment
        self.normals_valid_classes = np.array(sorted(normals_valid_classes))
        fix = (f"download {PASCAL_MT_URL} and extract it (tar xzf PASCAL_MT.tgz) so that root is the PASCAL_MT "
               "folder holding JPEGImages/, ImageSets/Context/, semseg/, human_parts/, normals_distill/, "
               "sal_distill/, pascal-context/trainval/")
        if not os.path.isdir(root):
            raise FileNotFoundError(f"PASCAL_MT root {root} does not exist; {fix}")
        split_file = os.path.join(root, "ImageSets", "Context", f"{split}.txt")
        if not os.path.isfile(split_file):
            raise FileNotFoundError(f"missing split file {split_file} (split must be 'train' or 'val'); {fix}")
        with open(split_file) as f:
            self.ids = [ln.strip() for ln in f.read().splitlines() if ln.strip()]

        names = [n for n, _, _ in self.tasks]
        folders = [("JPEGImages", ".jpg")]
        folders += [("human_parts", ".mat")] if "human_parts" in names else []
        folders += [("sal_distill", ".png")] if "saliency" in names else []
        folders += [("normals_distill", ".png")] if "normals" in names else []
        folders += [(os.path.join("pascal-context", "trainval"), ".mat")] if {"normals", "edge"} & set(names) else []
        for folder, ext in folders:
            present = _listdir(os.path.join(root, folder))
            missing = [i for i in self.ids if i + ext not in present]
            if missing:
                raise FileNotFoundError(f"{len(missing)} file(s) of split {split!r} missing, e.g. "
                                        f"{os.path.join(root, folder, missing[0] + ext)}; {fix}")
        if "semseg" in names:
            voc, context = (_listdir(os.path.join(root, "semseg", d)) for d in ("VOC12", "pascal-context"))
            missing = [i for i in self.ids if i + ".png" not in voc | context]
            if missing:
                raise FileNotFoundError(f"no semseg/VOC12/{missing[0]}.png nor semseg/pascal-context/"
                                        f"{missing[0]}.png under {root}; {fix}")
            # semseg/VOC12 is preferred when present, as in MTL-PyTorch _get_semseg_fname
            self.semseg_dir = {i: "VOC12" if i + ".png" in voc else "pascal-context" for i in self.ids}

    def __len__(self):
        return len(self.ids)

    def native_targets(self, index):
        """The labels of sample `index` at the image's own size, decoded but neither resized nor augmented, as
        MTL-PyTorch's final evaluation reads them: a dict with "id", "size" (H, W), "image" (3, H, W) uint8, and per
        task semseg (H, W) int64, human_parts (H, W) int64 (all 255 without an annotated person), saliency (1, H, W)
        float {0, 1}, normals (3, H, W) float (zero off the NYU-compatible classes) with normals_mask (1, H, W) bool,
        edge (1, H, W) float {0, 1}."""
        i, names = self.ids[index], [n for n, _, _ in self.tasks]
        path = os.path.join(self.root, "JPEGImages", i + ".jpg")
        image = read_image(path)
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, -1)  # a few VOC JPEGs are greyscale
        hw = image.shape[:2]
        out = {"id": i, "size": hw, "image": torch.from_numpy(image[..., :3].copy()).permute(2, 0, 1)}
        if "semseg" in names:
            path = os.path.join(self.root, "semseg", self.semseg_dir[i], i + ".png")
            # palette indices 0..20, 255: read without convert()
            out["semseg"] = torch.from_numpy(_check_size(read_image(path), hw, path).astype(np.int64))
        if "human_parts" in names:
            path = os.path.join(self.root, "human_parts", i + ".mat")
            parts = human_parts_from_mat(path)
            parts = np.full(hw, 255) if parts is None else _check_size(parts, hw, path)
            out["human_parts"] = torch.from_numpy(parts)
        if "saliency" in names:
            path = os.path.join(self.root, "sal_distill", i + ".png")
            sal = _check_size(read_image(path), hw, path)
            out["saliency"] = torch.from_numpy((sal if sal.ndim == 2 else sal[..., 0]) / 255 > 0.5)[None].float()
        if {"normals", "edge"} & set(names):
            path = os.path.join(self.root, "pascal-context", "trainval", i + ".mat")
            try:
                label_map = _check_size(scipy.io.loadmat(path)["LabelMap"], hw, path)
            except _MAT_ERRORS as e:
                raise ValueError(f"cannot read 'LabelMap' from {path} ({e}); re-extract PASCAL_MT") from e
        if "normals" in names:
            path = os.path.join(self.root, "normals_distill", i + ".png")
            normals = _check_size(read_image(path), hw, path)[..., :3].astype(np.float32) * 2 / 255 - 1
            valid = np.isin(label_map, self.normals_valid_classes)
            out["normals"] = torch.from_numpy(normals * valid[..., None]).permute(2, 0, 1)
            out["normals_mask"] = torch.from_numpy(valid)[None]
        if "edge" in names:
            out["edge"] = torch.from_numpy(label_edges(label_map))[None].float()
        return out

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        names = [n for n, _, _ in self.tasks]
        native = self.native_targets(index)
        # MTL-PyTorch resizes the image as float: (3, H, W) in [0, 255]; label-like maps stay uint8 (nearest)
        x = {"image": native["image"].float()}
        x.update({k: native[k].to(torch.uint8).view(1, *native["size"]) for k in
                  ("semseg", "human_parts", "saliency", "edge", "normals_mask") if k in native})
        if "normals" in names:
            x["normals"] = native["normals"]
        cubic = ("image", "normals")  # cv2.INTER_CUBIC in MTL-PyTorch's FLAGVALS; every other map INTER_NEAREST

        # MTL-PyTorch order: RandomHorizontalFlip, ScaleNRotate (scale 0.75-1.25 about the centre; zero padding from
        # a zoom-out is background for semseg, as cv2.warpAffine gives), FixedResize to a square
        if self.augment:
            g = None if seed is None else torch.Generator().manual_seed(seed)
            flip = bool(torch.rand((), generator=g) < 0.5)
            scale = 0.75 + 0.5 * float(torch.rand((), generator=g))
            if flip:
                x = {k: t.flip(-1) for k, t in x.items()}
                if "normals" in x:
                    x["normals"][0] = -x["normals"][0]  # as MTL-PyTorch RandomHorizontalFlip
            x = {k: cv2_zoom(t, scale, "cubic" if k in cubic else "nearest") for k, t in x.items()}
        size = (self.img_size, self.img_size)
        x = {k: cv2_resize(t, size, "cubic" if k in cubic else "nearest") for k, t in x.items()}

        targets = {}
        if "semseg" in names:
            targets["semseg"] = x["semseg"][0].long()
        if "human_parts" in names:
            parts = x["human_parts"][0].long()
            # AddIgnoreRegions: a map without any part pixel (no annotated person) is ignored as a whole
            targets["human_parts"] = parts.fill_(255) if (parts == 0).all() else parts
        if "saliency" in names:
            targets["saliency"] = x["saliency"].float()
        if "normals" in names:
            mask, n = x["normals_mask"].bool(), x["normals"]
            # n / ||n|| on valid pixels (resizing shortens the vectors, as MTL-PyTorch FixedResize), zero elsewhere
            targets["normals"] = torch.where(mask, n / (n.norm(dim=0, keepdim=True) + 1e-12), torch.zeros(()))
            targets["normals_mask"] = mask
        if "edge" in names:
            targets["edge"] = x["edge"].float()
        # ToTensor's astype(np.uint8) truncates; values past [0, 255] (cubic overshoot) are clipped first
        image = x["image"].clamp(0, 255).floor() / 255 * 2 - 1
        return (image, targets, native) if self.native_labels else (image, targets)

# -----------------------------------------------------------------------------
# Datasets by name


DATASET_TASKS = {"synthetic": SYNTHETIC_TASKONOMY_TASKS, "synthetic-pascal": SYNTHETIC_PASCAL_TASKS,
                 "taskonomy": TASKONOMY_TASKS, "pascal": PASCAL_TASKS}


def build_dataset(name, split, root=None, tasks=None, img_size=None, length=None, seed=0, augment=False,
                  split_csv=None, require_all_buildings=False, cache=False, cache_dir=None):
    """A dataset by name: "synthetic" (13 Taskonomy tasks) or "synthetic-pascal" (5 PASCAL-Context tasks), embedded;
    or the real "taskonomy" (omnitools layout under root; buildings from split_csv, default
    <root>/splits_taskonomy/train_val_test_fullplus.csv as the paper's runs; incomplete buildings are skipped with a
    warning unless require_all_buildings) or "pascal" (PASCAL_MT under root).
    augment (random crop/scale and flip) applies to the real training splits: every synthetic sample is a new scene.
    cache keeps the synthetic samples in memory once rendered, cache_dir on disk too, for other processes
    (SyntheticScenes)."""
    if name in ("synthetic", "synthetic-pascal"):
        return SyntheticScenes(split, length or (2048 if split == "train" else 256),
                               "taskonomy" if name == "synthetic" else "pascal", img_size or 32, seed, tasks, cache,
                               cache_dir)
    if name not in DATASET_TASKS:
        raise ValueError(f"unknown dataset '{name}'; valid: {', '.join(DATASET_TASKS)}")
    if cache_dir:
        raise ValueError(f"--scene-cache keeps rendered synthetic scenes; the {name} dataset is read from disk: drop it")
    if root is None:
        raise ValueError(f"the {name} dataset needs --data-root (the folder you downloaded it to)")
    if name == "taskonomy":
        split_csv = split_csv or os.path.join(root, "splits_taskonomy", "train_val_test_fullplus.csv")
        if not os.path.isdir(root):  # let the loader explain the download before complaining about the CSV
            return TaskonomyDataset(root, split, tasks, split_csv=split_csv)
        if not os.path.isfile(split_csv):
            raise FileNotFoundError(f"no split file {split_csv}: unzip data/assets/splits_taskonomy.zip of "
                                    "StanfordVL/taskonomy into <root>/splits_taskonomy, or pass --split-csv FILE")
        return TaskonomyDataset(root, split, tasks, split_csv=split_csv, img_size=img_size or 224,
                                augment=augment and split in ("train", "trainval"),
                                require_all_buildings=require_all_buildings)
    return PascalContextDataset(root, split, tasks, img_size=img_size or 512, augment=augment and split == "train")


# -----------------------------------------------------------------------------
# Feeding a training run: the order of its samples, its loader workers


class EpochBatches(torch.utils.data.Sampler):
    """A DataLoader batch_sampler: this rank's micro-batches of one epoch, as lists of (index, seed).

    An optimizer step takes global_batch = batch_size x world x accum_steps samples (the last incomplete step of an
    epoch is dropped, steps_per_epoch counts the others). The epoch's order is a permutation seeded by (seed, epoch);
    step s takes the next global_batch samples of it, and micro-step a of rank r its slice [a, r] of them. So every
    step sees the same samples whatever the number of processes and micro-steps, and set_epoch(epoch, start_step)
    starts anywhere (resume). A sample's augmentation seed is a hash of (seed, epoch, its position in the epoch):
    every rank and worker draws its own crops and flips, the same ones in any worker and after a resume
    (dataset[(index, seed)])."""

    def __init__(self, num_samples, batch_size, accum_steps=1, world=1, rank=0, seed=0):
        self.num_samples, self.batch_size, self.accum_steps = num_samples, batch_size, accum_steps
        self.world, self.rank, self.seed = world, rank, seed
        self.global_batch = batch_size * world * accum_steps
        self.steps_per_epoch = num_samples // self.global_batch
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start = epoch, start_step

    def __len__(self):
        return (self.steps_per_epoch - self.start) * self.accum_steps

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        perm = torch.randperm(self.num_samples, generator=g)
        positions = torch.arange(self.steps_per_epoch * self.global_batch).view(
            self.steps_per_epoch, self.accum_steps, self.world, self.batch_size)  # (steps, micro-steps, ranks, B)
        for micro in positions[self.start:, :, self.rank].flatten(0, 1).tolist():  # B positions of one micro-batch
            yield [(int(perm[i]), int(np.random.SeedSequence((self.seed, self.epoch, i)).generate_state(1)[0]))
                   for i in micro]


def default_workers(name):
    """DataLoader workers for dataset `name` in this process: 0 for the embedded synthetic scenes (cheap to render,
    and the tests stay single-process); for a real dataset, this process's share of the CPU cores it may run on
    (torchrun's LOCAL_WORLD_SIZE processes share them) less one for the training loop, at most 16. One 13-task
    Taskonomy sample costs 50-75 ms of PNG decoding on one core, so a GPU that trains 60 images/s needs 3-5."""
    if name in ("synthetic", "synthetic-pascal"):
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(16, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1))


def ignore_stop_signals(worker_id):
    """DataLoader worker_init_fn of a training run, which saves a checkpoint on SIGTERM or SIGUSR1: a worker killed by
    one of them would take the training process down with it before it saves. So each worker leaves the training
    process's process group (torchrun delivers SIGTERM to that group, as a terminal does) and ignores SIGUSR1, which
    a scheduler may send to every process of a job. A SIGTERM sent to the worker itself still ends it (PyTorch and
    multiprocessing stop workers that way), and a worker also ends when the training process does."""
    if hasattr(os, "setpgrp"):
        os.setpgrp()
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


class RandomTargets(Dataset):
    """Random images and targets with the shapes, dtypes and keys of a dataset's tasks (for train.py --dry-run)."""

    def __init__(self, tasks, img_size, length=2, names=None):
        self.tasks, self.img_size, self.length = select_tasks(tasks, names), img_size, length

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        i = i[0] if isinstance(i, tuple) else i  # (index, seed) as the real datasets take
        g = torch.Generator().manual_seed(i)
        H = W = self.img_size
        targets = {}
        for name, channels, kind in self.tasks:
            if kind == "image":
                targets[name] = torch.rand(channels, generator=g).softmax(0)
            elif name in ("semseg", "human_parts"):
                targets[name] = torch.randint(0, channels, (H, W), generator=g)
            else:
                targets[name] = torch.rand(channels, H, W, generator=g)
            if name in ("depth_euclidean", "depth_zbuffer", "normal", "normals"):
                targets[f"{name}_mask"] = torch.ones(1, H, W, dtype=torch.bool)
        return torch.rand(3, H, W, generator=g) * 2 - 1, targets


# -----------------------------------------------------------------------------
# python data.py --show: a grid of samples, one row per sample, the image then one column per task


def show(task_set="taskonomy", out="docs/synthetic_samples.png", num_samples=6, img_size=64, seed=0):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ds = SyntheticScenes("val", num_samples, task_set, img_size, seed)
    fig, axes = plt.subplots(num_samples, len(ds.tasks) + 1, figsize=(1.1 * (len(ds.tasks) + 1), 1.15 * num_samples))
    for row in range(num_samples):
        image, targets = ds[row]
        axes[row, 0].imshow((image.permute(1, 2, 0) + 1) / 2)
        for ax, (name, channels, kind) in zip(axes[row, 1:], ds.tasks):
            y = targets[name]
            if kind == "image":  # a distribution: bars, the argmax named
                labels = SYNTHETIC_OBJECT_CATEGORIES if name == "class_object" else SYNTHETIC_SCENE_CATEGORIES
                ax.bar(range(channels), y.numpy())
                ax.set_ylim(0, 1.2)
                ax.text(0.5, 0.85, labels[int(y.argmax())], transform=ax.transAxes, ha="center", fontsize=6)
            elif y.dtype == torch.int64:  # labels; 255 (ignore) shown as -1
                ax.imshow(y.masked_fill(y == 255, -1), cmap="tab10", vmin=-1, vmax=8.5, interpolation="nearest")
            elif channels == 3:
                ax.imshow(((y + 1) / 2).clamp(0, 1).permute(1, 2, 0), interpolation="nearest")
            else:
                # depth is stretched (the log encoding keeps 1-10 m within [0.6, 0.8]); curvature shows k1
                vmin, vmax = {"depth_euclidean": (0.55, 0.85), "depth_zbuffer": (0.55, 0.85),
                              "principal_curvature": (-4, 4), "edge_occlusion": (-1, 1.5), "saliency": (0, 1),
                              "edge": (0, 1)}.get(name, (-1, 1))
                ax.imshow(y[0], cmap="coolwarm" if channels == 2 else "gray", vmin=vmin, vmax=vmax,
                          interpolation="nearest")
        for ax, name in zip(axes[row], ["image"] + [task[0] for task in ds.tasks]):
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name.replace("_", "\n", 1), fontsize=6)
    fig.tight_layout(pad=0.2)
    fig.savefig(out, dpi=80)
    print(f"wrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the synthetic multi-task scene set")
    parser.add_argument("--show", action="store_true", help="write a PNG grid of samples and all their targets")
    parser.add_argument("--task-set", default="taskonomy", choices=("taskonomy", "pascal"), help="which tasks")
    parser.add_argument("--out", default=None, help="PNG path (default docs/synthetic_samples.png or _pascal.png)")
    parser.add_argument("--img-size", type=int, default=64, help="resolution of the shown samples")
    parser.add_argument("--seed", type=int, default=0, help="which scenes a written tree holds (--write-*)")
    parser.add_argument("--write-pascal", metavar="DIR", help="write a PASCAL_MT tree of synthetic scenes to DIR")
    parser.add_argument("--images", type=int, default=100, help="--write-pascal: images, half train and half val")
    parser.add_argument("--long-side", type=int, default=500, help="--write-pascal: longer image side (VOC: 500)")
    parser.add_argument("--write-taskonomy", metavar="DIR", help="write a Taskonomy tree (omnitools layout, 512 px) "
                        "of synthetic scenes to DIR")
    parser.add_argument("--buildings", type=int, default=3, help="--write-taskonomy: buildings (train, val, test)")
    parser.add_argument("--views", type=int, default=2, help="--write-taskonomy: views per building")
    args = parser.parse_args()
    if args.show:
        default_out = "docs/synthetic_samples.png" if args.task_set == "taskonomy" else "docs/synthetic_pascal.png"
        show(args.task_set, args.out or default_out, img_size=args.img_size)
    if args.write_pascal:
        import data_trees  # the tree writers live beside data.py: train.py and evaluate.py never import them
        try:
            data_trees.write_pascal(args.write_pascal, args.images, args.seed, args.long_side)
        except (ValueError, FileExistsError) as e:
            parser.error(str(e))
    if args.write_taskonomy:
        import data_trees
        try:
            data_trees.write_taskonomy(args.write_taskonomy, args.buildings, args.views, args.seed)
        except (ValueError, FileExistsError) as e:
            parser.error(str(e))
