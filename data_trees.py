"""
Rehearsal trees: the synthetic scenes of data.py written to disk in the real datasets' exact on-disk formats, so the
real loaders, recipes and benchmarks can be exercised end to end without a download.

    python data.py --write-taskonomy DIR --buildings N --views M    # omnitools layout, 13 domains at 512x512
    python data.py --write-pascal DIR --images N                    # PASCAL_MT layout, JPEGs of varied sizes
"""
import os
import time

import numpy as np
import scipy.io
from PIL import Image
from tqdm import tqdm

import data

# -----------------------------------------------------------------------------
# Taskonomy (omnitools layout)
#
# View k of the tree (in writing order: buildings, then their views) is scene k of the synthetic "train" split
# (data.SyntheticScenes("train", seed=seed).scene(k)), rendered at 512 x 512. Every file holds the synthetic target of
# that scene (data.TASKONOMY_TARGETS) put back through the exact inverse of TaskonomyDataset's decoding, in the real
# encodings (PNGs at zlib level 1, which is what the real files' sizes match):
#   rgb                               8-bit RGB, round(255 * rgb)
#   depth_euclidean, depth_zbuffer    16-bit, 1/512 m, 65535 where missing (sky, and past 128 m)
#   edge_occlusion                    16-bit, 512 * depth jump (m), unblurred (the loader blurs); data.occlusion_jumps
#   edge_texture, keypoints2d/3d      16-bit, the raw scale the loader rescales from
#   normal, reshading                 8-bit RGB (reshading: 3 equal channels, as the real files); no normal = 128
#   principal_curvature               8-bit RGB, curvatures in channels 0-1 (zero curvature 127), channel 2 is 0
#   segment_unsup2d, segment_unsup25d 8-bit grey segment ids
#   class_object, class_scene         .npy float32 of 1000 / 365 values, the 6 / 4 synthetic classes at fixed indices
#   splits_taskonomy/train_val_test_fullplus.csv   id,train,val,test with CR line endings (the official files')

# The 6 object categories at the ImageNet-1k index of the nearest class (torchvision's _IMAGENET_CATEGORIES order,
# checked by a test). ImageNet has no person: the articulated figure is a ballplayer (a standing, posing person).
TASKONOMY_OBJECT_INDEX = {"ball": 805, "crate": 519, "can": 412, "pillar": 733, "slab": 532, "figure": 981}
# soccer ball, crate, ashcan (a trash can: the can's size), pole, dining table ("dining table, board"), ballplayer
# The 4 layouts at a Places365 index (CSAILVision/places365 categories_places365.txt, "<name> <index>" per line): a
# room is open to the sky (no ceiling) with 3 walls, so a courtyard; an outdoor layout is open paved ground, a plaza;
# a corner is two walls meeting with the sky above, an alley.
TASKONOMY_SCENE_INDEX = {"room": 109, "corridor": 106, "outdoor": 270, "corner": 4}
# /c/courtyard 109, /c/corridor 106, /p/plaza 270, /a/alley 4

# Real building names, with their split in the official tiny split (StanfordVL/taskonomy, omnidata); the tree takes
# its buildings from these (woodbine and wiconisco, which the loader always skips, are only in the CSV)
TASKONOMY_TINY_SPLIT = {
    "train": ("allensville", "beechwood", "benevolence", "coffeen", "cosmos", "forkland", "hanson", "hiteman",
              "klickitat", "lakeville", "leonardo", "lindenwood", "marstons", "merom", "mifflinburg", "newfields",
              "onaga", "pinesdale", "pomaria", "ranchester", "shelbyville", "stockman", "tolstoy", "wainscott",
              "woodbine"),
    "val": ("collierville", "corozal", "darden", "markleeville", "wiconisco"),
    "test": ("ihlen", "mcdade", "muleshoe", "noxapater", "uvalda"),
}
TASKONOMY_DOMAINS = ("rgb",) + tuple(name for name, _, _ in data.TASKONOMY_TASKS)


def taskonomy_buildings(n):
    """The names and splits of an n-building tree: about 5/7 train, 1/7 val, 1/7 test as the tiny split (at least
    one train building; one val from 2 buildings, one test from 3). Returns [(building, split)]."""
    pool = {split: [b for b in names if b not in data.TASKONOMY_SKIP_BUILDINGS]
            for split, names in TASKONOMY_TINY_SPLIT.items()}

    def counts(n):
        n_val, n_test = (0, 0) if n < 2 else (1, 0) if n == 2 else (max(1, round(n / 7)),) * 2
        return {"train": n - n_val - n_test, "val": n_val, "test": n_test}

    fits = lambda n: n >= 1 and all(c <= len(pool[s]) for s, c in counts(n).items())  # noqa: E731
    if not fits(n):
        raise ValueError(f"--buildings {n}: use 1 to {max(m for m in range(1, 100) if fits(m))} (the real names this "
                         f"writer has); for a bigger tree write more --views per building")
    return [(b, s) for s, c in counts(n).items() for b in pool[s][:c]]


def taskonomy_views(buildings, views, seed=0):
    """The (building, point, view) of each view of the tree, in writing order (view k is synthetic scene k).
    A building's points are distinct numbers below 1000 with 1-3 views each, as camera points in the real data."""
    out = []
    for b_index, (building, _) in enumerate(buildings):
        rng = np.random.default_rng([seed, b_index, 7])  # not the scenes' stream
        points = iter(rng.permutation(1000))
        keys = []
        while len(keys) < views:
            point = int(next(points))
            keys += [(point, v) for v in range(int(rng.integers(1, 4)))]
        out += [(building, p, v) for p, v in keys[:views]]
    return out


def taskonomy_encode(buf, scene):
    """The 14 files of one rendered view as the real tree stores them: domain -> uint8 / uint16 array (PNG) or
    float32 vector (.npy), each the inverse of TaskonomyDataset's decoding applied to the synthetic target."""
    target = {name: compute(buf, scene)[0] for name, compute in data.TASKONOMY_TARGETS.items()}  # float64 (C, H, W)
    u8 = lambda x: np.round((x + 1) / 2 * 255).astype(np.uint8)  # noqa: E731  (inverse of u / 255 * 2 - 1)
    hwc = lambda x: np.ascontiguousarray(x.transpose(1, 2, 0))  # noqa: E731
    files = {"rgb": np.round(np.clip(buf["rgb"], 0, 1) * 255).astype(np.uint8)}
    for name in ("depth_euclidean", "depth_zbuffer"):
        # inverse of log(1 + v) / log(2^16): v is an integer, so this recovers it exactly; sky is 65535
        files[name] = np.round(np.expm1(target[name][0] * np.log(2 ** 16))).astype(np.uint16)
    files["edge_occlusion"] = np.round(data.occlusion_jumps(buf)).astype(np.uint16)
    for name in ("edge_texture", "keypoints2d", "keypoints3d"):
        lo, hi, _ = data._RESCALE[name]  # inverse of (clip(v, lo, hi) - lo) / (hi - lo) * 2 - 1
        files[name] = np.round(np.clip((target[name][0] + 1) / 2 * (hi - lo) + lo, 0, 65535)).astype(np.uint16)
    files["normal"] = hwc(u8(target["normal"]))
    files["reshading"] = hwc(u8(target["reshading"]))
    # inverse of (u - mean) / std; channel 2 is 0 as on the real files
    u = np.round(target["principal_curvature"] * np.array(data._CURVATURE_STD)[:, None, None]
                 + np.array(data._CURVATURE_MEAN)[:, None, None])
    files["principal_curvature"] = hwc(np.concatenate([u, np.zeros_like(u[:1])]).astype(np.uint8))
    files["segment_unsup2d"] = u8(target["segment_unsup2d"][0])
    files["segment_unsup25d"] = u8(target["segment_unsup25d"][0])
    for name, count, index in (("class_object", 1000, TASKONOMY_OBJECT_INDEX),
                               ("class_scene", 365, TASKONOMY_SCENE_INDEX)):
        vec = np.zeros(count, np.float32)
        labels = data.SYNTHETIC_OBJECT_CATEGORIES if name == "class_object" else data.SYNTHETIC_SCENE_CATEGORIES
        vec[[index[c] for c in labels]] = target[name]
        files[name] = vec
    return files


def taskonomy_split_csv(buildings):
    """train_val_test_fullplus.csv text for the tree: its buildings, the other tiny-split buildings (absent, as in a
    partial download) and the official new_list (train, as fullplus has them; the loader drops them), CR endings.
    Not the official 537-building file: unzip that from StanfordVL/taskonomy data/assets/splits_taskonomy.zip."""
    rows = dict(buildings)
    for split, names in TASKONOMY_TINY_SPLIT.items():
        rows.update({b: split for b in names if b not in rows})
    rows.update({b: "train" for b in data.TASKONOMY_SPLIT_SKIPS["train_val_test_fullplus.csv"]})
    lines = ["id,train,val,test"] + [f"{b}," + ",".join("1" if s == split else "0" for s in ("train", "val", "test"))
                                     for b, split in sorted(rows.items())]
    return "\r".join(lines) + "\r"


def write_taskonomy(root, buildings=3, views=2, seed=0, img_size=512):
    """Write a Taskonomy tree of `buildings` x `views` synthetic views under root (omnitools layout, all 13 domains
    plus rgb, and splits_taskonomy/train_val_test_fullplus.csv). Deterministic by seed. Returns the views,
    [(building, point, view)] in writing order: view k is data.SyntheticScenes("train", seed=seed).scene(k)."""
    if os.path.exists(os.path.join(root, "rgb")):
        raise FileExistsError(f"{root} already holds a tree (rgb/); write to a new directory or remove it first")
    if views < 1:
        raise ValueError(f"--views {views}: write at least one view per building")
    tree = taskonomy_buildings(buildings)
    keys = taskonomy_views(tree, views, seed)
    synthetic = data.SyntheticScenes("train", len(keys), "taskonomy", img_size, seed)
    for domain in TASKONOMY_DOMAINS:
        for building, _ in tree:
            os.makedirs(os.path.join(root, domain, "taskonomy", building), exist_ok=True)
    os.makedirs(os.path.join(root, "splits_taskonomy"), exist_ok=True)
    with open(os.path.join(root, "splits_taskonomy", "train_val_test_fullplus.csv"), "w", newline="") as f:
        f.write(taskonomy_split_csv(tree))
    t0, size = time.time(), 0
    for k, (building, point, view) in enumerate(tqdm(keys, desc="write Taskonomy", unit="view")):
        scene = synthetic.scene(k)
        for domain, arr in taskonomy_encode(data.render_scene(scene, img_size), scene).items():
            stem = os.path.join(root, domain, "taskonomy", building, f"point_{point}_view_{view}_domain_{domain}")
            if arr.dtype == np.float32:
                np.save(stem + ".npy", arr)
                size += os.path.getsize(stem + ".npy")
            else:
                Image.fromarray(arr).save(stem + ".png", compress_level=1)  # uint16 -> 16-bit greyscale PNG
                size += os.path.getsize(stem + ".png")
    dt = time.time() - t0
    splits = {s: sum(split == s for _, split in tree) for s in ("train", "val", "test")}
    print(f"wrote {len(keys)} Taskonomy views ({len(tree)} building{'s' * (len(tree) > 1)}: {splits['train']} train, "
          f"{splits['val']} val, {splits['test']} test; {views} views each; {len(TASKONOMY_DOMAINS)} domains at "
          f"{img_size}x{img_size}, {size / 2**20:.0f} MiB) to {root} in {dt:.1f} s ({1000 * dt / len(keys):.0f} ms "
          f"per view)")
    return keys


# -----------------------------------------------------------------------------
# PASCAL-Context (PASCAL_MT layout)
#
# Each image is scene i of the synthetic "train" or "val" split (data.SyntheticScenes draws the same scene), rendered
# at a VOC-like size: a square of the longer side, of which the centre H x W is kept. The files hold exactly what
# the synthetic PASCAL tasks give for that crop (data.PASCAL_TARGETS), in PASCAL_MT's encodings:
#   JPEGImages/<id>.jpg                8-bit RGB JPEG, quality 90 (the only lossy file)
#   semseg/VOC12|pascal-context/<id>.png  21-class VOC ids in a palette PNG (every third image in pascal-context/)
#   human_parts/<id>.mat               PASCAL-Part 'anno': every visible VOC-class object, persons with named parts
#   normals_distill/<id>.png           camera-frame normals, round((n + 1) / 2 * 255); sky (n = 0) is 128
#   sal_distill/<id>.png               8-bit saliency, 255 on the most prominent object, 0 elsewhere
#   pascal-context/trainval/<id>.mat   'LabelMap', 459-class context ids; the loader derives edges and the normals mask
#   ImageSets/Context/{train,val}.txt  one id per line

# synthetic category: (VOC id, VOC name, PASCAL-Context id). PASCAL has no ball, crate or pillar: a ball is a potted
# plant and a crate a tv monitor (similar shapes), a pillar is the context class 'pillar', which is background in the
# 21-class semseg as every non-VOC context class is. Ids from MTL-PyTorch's VOC_CATEGORY_NAMES and
# data/db_info/context_classes.json ('table' is the context name of VOC's diningtable).
PASCAL_CLASSES = {"ball": (16, "pottedplant", 308), "crate": (20, "tvmonitor", 427), "can": (5, "bottle", 34),
                  "pillar": (0, None, 289), "slab": (11, "diningtable", 397), "figure": (15, "person", 284)}
# context ids of the planes; the floor of an outdoor layout is 'ground'. Of all these, floor, wall, bottle, table,
# person and tvmonitor (MTL-PyTorch's addition) are NYU-compatible, so their normals are kept; sky, ground,
# pottedplant and pillar are not, so the normals mask has holes on objects as well as on the background
PASCAL_CONTEXT_PLANES = {"floor": 158, "ground": 189, "wall": 440, "sky": 360}
# PASCAL-Part names of the figure's parts (data.HUMAN_PARTS order); limbs get l/r from their side of the torso
PASCAL_PART_NAMES = (None, "head", "torso", "uarm", "larm", "uleg", "lleg")
# (H, W) at a longer side of 500 and how often it is drawn: most VOC images are 500x375 or 500x333 landscapes
PASCAL_SHAPES = (((375, 500), 0.45), ((333, 500), 0.2), ((500, 375), 0.15), ((500, 333), 0.1), ((500, 500), 0.05),
                 ((281, 500), 0.05))
PASCAL_JPEG_QUALITY = 90


def pascal_id(split, i):
    """The image id of scene i of a split: 2008_<i> for train, 2009_<i> for val (VOC's <year>_<number> form)."""
    return f"{2008 + data.SPLIT_IDS[split]}_{i:06d}"


def pascal_sample(split, i, seed=0, long_side=500):
    """Scene i of the synthetic split as a PASCAL image: (scene, buf), buf being data.render_scene's buffers cropped
    to the image's size (H, W) drawn from PASCAL_SHAPES, plus "primitive": (H, W) index of the hit primitive in its
    object (-1 on planes and sky)."""
    scene = data.SyntheticScenes(split, i + 1, "pascal", seed=seed).scene(i)
    shapes, p = zip(*PASCAL_SHAPES)
    rng = np.random.default_rng([seed, data.SPLIT_IDS[split], i, 1])  # a stream of its own: the scene stays as drawn
    H, W = (max(1, round(s * long_side / 500)) for s in shapes[rng.choice(len(shapes), p=p)])
    L = max(H, W)
    r0, c0 = (L - H) // 2, (L - W) // 2
    buf = {k: v[r0:r0 + H, c0:c0 + W] for k, v in data.render_scene(scene, L).items()}
    # surface id -> primitive index in its object, in cast_rays' numbering (planes, then faces; -1 = sky, last)
    primitive = [-1] * len(scene.planes)
    for obj in scene.objects:
        for j, prim in enumerate(obj.primitives):
            primitive += [j] * data.NUM_FACES[prim.kind]
    buf["primitive"] = np.array(primitive + [-1])[buf["surface"]]
    return scene, buf


def pascal_semseg(buf):
    """(H, W) uint8 VOC class ids (0 = background) of the categories in buf."""
    voc = np.array([PASCAL_CLASSES[c][0] for c in data.SYNTHETIC_OBJECT_CATEGORIES] + [0])  # category -1 -> last
    return voc[buf["category"]].astype(np.uint8)


def pascal_label_map(buf, scene):
    """(H, W) uint16 PASCAL-Context LabelMap of buf: one 459-class context id per pixel."""
    context = np.array([PASCAL_CLASSES[c][2] for c in data.SYNTHETIC_OBJECT_CATEGORIES])
    floor = PASCAL_CONTEXT_PLANES["ground" if data.SYNTHETIC_SCENE_CATEGORIES[scene.layout] == "outdoor" else "floor"]
    # planes are surfaces 0..P-1 with the floor first; sky is surface -1
    planes = np.where(buf["surface"] == 0, floor, np.where(buf["surface"] < 0, PASCAL_CONTEXT_PLANES["sky"],
                                                           PASCAL_CONTEXT_PLANES["wall"]))
    return np.where(buf["object"] >= 0, context[buf["category"]], planes).astype(np.uint16)


def pascal_anno(buf, scene, image_id):
    """The PASCAL-Part 'anno' struct of buf as scipy.io.savemat writes MATLAB structs: anno.imname, anno.objects
    (class, class_ind, mask, parts), one object per visible VOC-class object; a person's parts are (part_name, mask)
    with PASCAL-Part names (head, torso, luarm, ..., rlleg), every other object has no parts."""
    objects = []
    for rank, obj in enumerate(scene.objects):
        name = data.SYNTHETIC_OBJECT_CATEGORIES[obj.category]
        voc_id, voc_name, _ = PASCAL_CLASSES[name]
        mask = buf["object"] == rank
        if voc_id == 0 or not mask.any():
            continue
        parts = {}
        if name == "figure":
            torso = next(p for p in obj.primitives if p.part == 2)
            right = data.yaw_matrix(torso.yaw)[:, 0]  # the figure's right, as data.figure_primitives builds it
            for j, prim in enumerate(obj.primitives):
                part_mask = mask & (buf["primitive"] == j)
                if part_mask.any():
                    side = "" if prim.part <= 2 else "r" if (prim.center - torso.center) @ right > 0 else "l"
                    part_name = side + PASCAL_PART_NAMES[prim.part]
                    parts[part_name] = parts.get(part_name, False) | part_mask
        part_arr = np.zeros((1, len(parts)), dtype=[("part_name", "O"), ("mask", "O")]) if parts else np.zeros((0, 0))
        for k, (part_name, part_mask) in enumerate(sorted(parts.items())):
            part_arr[0, k] = (part_name, part_mask.astype(np.uint8))
        objects.append((voc_name, np.array([[voc_id]], np.uint8), mask.astype(np.uint8), part_arr))
    objs = np.zeros((1, len(objects)), dtype=[("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")])
    for k, o in enumerate(objects):
        objs[0, k] = o
    anno = np.zeros((1, 1), dtype=[("imname", "O"), ("objects", "O")])
    anno[0, 0] = (image_id, objs)
    return {"anno": anno}


def voc_palette():
    """The PASCAL VOC colour map (256 RGB entries, flattened), as VOC's label PNGs carry it."""
    palette = []
    for i in range(256):
        r = g = b = 0
        for j in range(8):  # bit j of the label goes to bit 7 - j of the red, green, blue channels in turn
            r |= ((i >> (3 * j)) & 1) << (7 - j)
            g |= ((i >> (3 * j + 1)) & 1) << (7 - j)
            b |= ((i >> (3 * j + 2)) & 1) << (7 - j)
        palette += [r, g, b]
    return palette


def write_pascal_image(root, split, i, seed=0, long_side=500):
    """Write every file of scene i of `split` into the PASCAL_MT tree at root; returns its image id."""
    image_id = pascal_id(split, i)
    scene, buf = pascal_sample(split, i, seed, long_side)
    path = lambda *parts: os.path.join(root, *parts)  # noqa: E731
    rgb = np.round(np.clip(buf["rgb"], 0, 1) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(path("JPEGImages", image_id + ".jpg"), quality=PASCAL_JPEG_QUALITY)
    semseg = Image.fromarray(pascal_semseg(buf), mode="P")
    semseg.putpalette(voc_palette())
    semseg.save(path("semseg", "pascal-context" if i % 3 == 2 else "VOC12", image_id + ".png"))
    scipy.io.savemat(path("human_parts", image_id + ".mat"), pascal_anno(buf, scene, image_id), do_compression=True)
    normals = np.round((buf["normal"] + 1) / 2 * 255).astype(np.uint8)
    Image.fromarray(normals).save(path("normals_distill", image_id + ".png"))
    saliency = data.saliency(buf, scene)[0][0]
    Image.fromarray((saliency * 255).astype(np.uint8)).save(path("sal_distill", image_id + ".png"))
    label_map = {"LabelMap": pascal_label_map(buf, scene)}
    scipy.io.savemat(path("pascal-context", "trainval", image_id + ".mat"), label_map, do_compression=True)
    return image_id


def write_pascal(root, images, seed=0, long_side=500):
    """A PASCAL_MT tree of `images` synthetic scenes under root, half train (rounded up) and half val, as the real
    split (4998 / 5105). Deterministic by seed: every decoded value (the .mat headers carry the write time).
    Returns {"train": ids, "val": ids}."""
    if os.path.exists(os.path.join(root, "JPEGImages")):
        raise FileExistsError(f"{root} already holds a tree (JPEGImages/); write to a new directory or remove it first")
    if images < 2:
        raise ValueError(f"--images {images}: need at least 2 (one train and one val image)")
    if long_side < 16:
        raise ValueError(f"--long-side {long_side}: use at least 16 (pixels; VOC's images have 500)")
    for folder in ("JPEGImages", "ImageSets/Context", "semseg/VOC12", "semseg/pascal-context", "human_parts",
                   "normals_distill", "sal_distill", "pascal-context/trainval"):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    jobs = [("train", i) for i in range((images + 1) // 2)] + [("val", i) for i in range(images // 2)]
    ids = {"train": [], "val": []}
    t0 = time.time()
    for split, i in tqdm(jobs, desc="write PASCAL_MT", unit="image"):
        ids[split].append(write_pascal_image(root, split, i, seed, long_side))
    for split, split_ids in ids.items():
        with open(os.path.join(root, "ImageSets", "Context", f"{split}.txt"), "w") as f:
            f.write("".join(i + "\n" for i in split_ids))
    dt = time.time() - t0
    print(f"wrote {images} PASCAL_MT images ({len(ids['train'])} train, {len(ids['val'])} val, longer side "
          f"{long_side}) to {root} in {dt:.2f} s ({1000 * dt / images:.0f} ms per image)")
    return ids
