"""Rehearsal trees (data_trees.py): what the writers encode in the real on-disk formats, the real loaders decode."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import scipy.ndimage
import torch
from PIL import Image
from torchvision.transforms import v2

import data
import data_trees

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------------------------------------------
# Taskonomy (omnitools layout)

SEED = 8  # its first 2 scenes: an outdoor view (sky: missing depth, no normal) and a corridor
STEP8 = 2 / 255  # one 8-bit step, in the [-1, 1] units of the decoded targets


@pytest.fixture(scope="module")
def taskonomy_tree(tmp_path_factory):
    """A 2-building x 1-view tree at 512 px, and each view's synthetic targets and render buffers:
    {(building, point, view): (targets, buf)}."""
    root = tmp_path_factory.mktemp("taskonomy") / "tree"
    renders, render = [], data.render_scene
    with pytest.MonkeyPatch.context() as mp:  # keep the writer's renders (512 px renders are slow) ...
        mp.setattr(data, "render_scene", lambda *a, **k: renders.append(render(*a, **k)) or renders[-1])
        keys = data_trees.write_taskonomy(root, buildings=2, views=1, seed=SEED)
    # ... which are SyntheticScenes' scenes k (checked at 32 px in the next test)
    synthetic = data.SyntheticScenes("train", len(keys), "taskonomy", 512, SEED)
    views = {}
    for k, (key, buf) in enumerate(zip(keys, renders)):
        scene = synthetic.scene(k)
        # what SyntheticScenes.__getitem__ returns (checked against it at 32 px in the test below)
        targets = {n: torch.from_numpy(f(buf, scene)[0].astype(np.float32)) for n, f in data.TASKONOMY_TARGETS.items()}
        targets.update({n + "_mask": torch.from_numpy(f(buf, scene)[1]) for n, f in data.TASKONOMY_TARGETS.items()
                        if f(buf, scene)[1] is not None})
        views[key] = targets, buf
    return root, views


def _test_geometry(x, img_size, nearest=False):
    """The loader's test-time geometry applied to a (C, 512, 512) synthetic map: resize to round(S * 256 / 224)
    (bilinear antialiased, or NEAREST for ids and masks), centre crop S."""
    R = round(img_size * 256 / 224)
    mode = v2.InterpolationMode.NEAREST if nearest else v2.InterpolationMode.BILINEAR
    return v2.functional.center_crop(v2.functional.resize(x, [R, R], mode, antialias=True), [img_size])


@pytest.mark.parametrize("img_size", [448, 224])
def test_taskonomy_tree_round_trip(taskonomy_tree, img_size):
    """TaskonomyDataset reads back the synthetic targets of the same scenes, up to each format's quantisation.
    448: the resize is 512 -> 512 (none), so the bounds are the encodings' alone; 224: the real geometry (resize 256,
    crop 224), where the loader resizes 8-bit maps with torch's integer kernel, which rounds after each of its two
    passes: up to one 8-bit step more than the float resize of the reference (measured: 1.0 step)."""
    root, views = taskonomy_tree
    ds = data.TaskonomyDataset(root, split="test", buildings=sorted({b for b, _, _ in views}), img_size=img_size)
    assert len(ds) == 2
    native = img_size == 448
    resize8 = 0 if native else STEP8  # the uint8 resize's two roundings
    # per task: the largest |loaded - synthetic| allowed, in decoded units
    bound = {"keypoints2d": 0.5 / 327.68 * 2, "keypoints3d": 0.5 / 65536 * 2, "edge_texture": 0.5 / 5242.88 * 2,
             "normal": 1e-6 + resize8, "reshading": 1e-6 + resize8,  # the synthetic targets are 8-bit already
             "segment_unsup2d": 1e-6, "segment_unsup25d": 1e-6}  # NEAREST: the ids themselves
    seen_sky = seen_far = False
    for i, key in enumerate(ds.views):
        expected, buf = views[key]
        image, t = ds[i]
        # rgb: round(255 x) on disk, half a step (measured at 224: 1.36 steps of the 1.5 allowed)
        rgb = torch.from_numpy(buf["rgb"].transpose(2, 0, 1) * 2 - 1).float()
        assert (image - _test_geometry(rgb, img_size)).abs().max() <= STEP8 / 2 + resize8 + 1e-6
        for name, b in bound.items():
            nearest = name.startswith("segment")
            err = (t[name] - _test_geometry(expected[name], img_size, nearest)).abs().max()
            assert err <= b, (name, err.item(), b)
        # curvature: 8-bit (u - mean) / std, so a step is 1 / std per channel
        err = (t["principal_curvature"] - _test_geometry(expected["principal_curvature"], img_size)).abs()
        assert (err.amax((1, 2)) <= torch.tensor([1 / 31.922, 1 / 21.658]) * resize8 / STEP8 + 1e-5).all()
        # depth: the file holds the synthetic raw v exactly; log(1 + v) does not commute with the resize, so the
        # reference resizes v (as the loader and the official code do) and takes the log after it
        for name in ("depth_euclidean", "depth_zbuffer"):
            raw = torch.round(torch.expm1(expected[name].double() * np.log(2**16))).float()  # integers 0..65535
            mask = _test_geometry((raw != 65535).to(torch.uint8), img_size, nearest=True).bool()
            assert torch.equal(t[name + "_mask"], mask)
            ref = torch.log1p(_test_geometry(raw, img_size)) / np.log(2**16)
            assert (t[name] - ref.masked_fill(~mask, 1.0)).abs().max() <= 1e-6
            # the synthetic mask (taskbank's raw < 64500) is the loader's (raw != 65535) less valid depth past 126 m
            synthetic_mask = _test_geometry(expected[name + "_mask"].to(torch.uint8), img_size, nearest=True).bool()
            far = _test_geometry(((raw >= 64500) & (raw < 65535)).to(torch.uint8), img_size, nearest=True).bool()
            assert torch.equal(t[name + "_mask"], synthetic_mask | far)
            seen_far |= bool(far.any())
        # no-normal pixels (sky) survive exactly
        normal_mask = _test_geometry(expected["normal_mask"].to(torch.uint8), img_size, nearest=True).bool()
        assert torch.equal(t["normal_mask"], normal_mask)
        seen_sky |= bool((~normal_mask).any())
        # edge_occlusion is stored unblurred (the loader blurs it, sigma 4 at the 224 scale, as the official code)
        occ = torch.from_numpy(data.occlusion_jumps(buf) / 409.6 * 2 - 1).float()[None]
        ref = scipy.ndimage.gaussian_filter(_test_geometry(occ, img_size)[0].numpy(), sigma=4 * img_size / 224)
        assert (t["edge_occlusion"][0] - torch.from_numpy(ref)).abs().max() <= 0.5 / 409.6 * 2 + 1e-5
        assert t["edge_occlusion"].max() > -0.9  # there are occlusion edges (raw 0 is -1)
        # the 6 / 4 synthetic classes at their ImageNet / Places365 indices, zero elsewhere
        for name, index, labels in (
                ("class_object", data_trees.TASKONOMY_OBJECT_INDEX, data.SYNTHETIC_OBJECT_CATEGORIES),
                ("class_scene", data_trees.TASKONOMY_SCENE_INDEX, data.SYNTHETIC_SCENE_CATEGORIES)):
            idx = [index[c] for c in labels]
            torch.testing.assert_close(t[name][idx], expected[name])
            assert t[name].sum() == pytest.approx(1.0) and (t[name][idx] > 0).any()
    assert seen_sky and seen_far  # the masks were exercised


def test_taskonomy_tree_views_are_the_synthetic_dataset(tmp_path):
    """View k of a written tree is SyntheticScenes("train", seed=seed)[k], and the fixture's targets (TASKONOMY_TARGETS
    on render_scene) are what SyntheticScenes returns; checked at 32 px."""
    keys = data_trees.write_taskonomy(tmp_path, buildings=2, views=2, seed=SEED, img_size=32)
    synthetic = data.SyntheticScenes("train", len(keys), "taskonomy", 32, SEED)
    # img_size 28: resize to 32, none at this native size; centre crop at offset 2
    ds = data.TaskonomyDataset(tmp_path, split="test", buildings=sorted({b for b, _, _ in keys}), img_size=28)
    for i, key in enumerate(ds.views):
        k = keys.index(key)
        _, targets = synthetic[k]
        _, t = ds[i]
        for name in ("normal", "depth_zbuffer", "segment_unsup25d", "class_scene"):
            expected = targets[name][:, 2:30, 2:30] if targets[name].ndim == 3 else targets[name]
            got = t[name][[data_trees.TASKONOMY_SCENE_INDEX[c] for c in data.SYNTHETIC_SCENE_CATEGORIES]] \
                if name == "class_scene" else t[name]
            assert (got - expected).abs().max() <= 1e-6, (name, key, k)
        scene = synthetic.scene(k)
        buf = data.render_scene(scene, 32)
        for name, f in data.TASKONOMY_TARGETS.items():
            assert torch.equal(targets[name], torch.from_numpy(f(buf, scene)[0].astype(np.float32)))
        # the occlusion edges the tree stores unblurred are where the synthetic (blurred) target rises above -1
        jumps = data.occlusion_jumps(buf) > 0
        assert jumps.any() and (targets["edge_occlusion"][0][torch.from_numpy(jumps)] > -1).all()


def test_taskonomy_tree_layout_names_and_split_file(tmp_path):
    keys = data_trees.write_taskonomy(tmp_path / "a", buildings=3, views=3, seed=0, img_size=32)
    root = tmp_path / "a"
    assert len(keys) == 9 and len(set(keys)) == 9
    buildings = sorted({b for b, _, _ in keys})
    assert all(b in sum(data_trees.TASKONOMY_TINY_SPLIT.values(), ()) for b in buildings)  # real names
    modes = {"rgb": "RGB", "normal": "RGB", "reshading": "RGB", "principal_curvature": "RGB", "segment_unsup2d": "L",
             "segment_unsup25d": "L", **dict.fromkeys(data._16BIT, "I;16")}
    for domain in data_trees.TASKONOMY_DOMAINS:
        folder = root / domain / "taskonomy"
        assert sorted(os.listdir(folder)) == buildings
        for b, p, v in keys:
            stem = folder / b / f"point_{p}_view_{v}_domain_{domain}"
            if domain.startswith("class_"):
                assert np.load(f"{stem}.npy").shape == ({"class_object": 1000, "class_scene": 365}[domain],)
            else:
                with Image.open(f"{stem}.png") as im:
                    assert im.mode == modes[domain] and im.size == (32, 32), (domain, im.mode)
    # the official format: header id,train,val,test, 0/1 flags, CR line endings; it names buildings the tree does not
    # have, the two the loader always skips and fullplus's new_list
    csv = root / "splits_taskonomy" / "train_val_test_fullplus.csv"
    text = csv.read_bytes().decode()
    assert text.startswith("id,train,val,test\r") and "\n" not in text
    rows = {ln.split(",")[0]: ln.split(",")[1:] for ln in text.split("\r")[1:] if ln}
    assert all(re.fullmatch(r"[a-z]+", b) and sorted(f) == ["0", "0", "1"] for b, f in rows.items())
    assert set(buildings) < set(rows) and {"woodbine", "wiconisco", "gough", "ballou"} <= set(rows)
    splits = {s: data.read_split_csv(csv, s) for s in ("train", "val", "test")}
    assert [sum(b in splits[s] for b in buildings) for s in ("train", "val", "test")] == [1, 1, 1]
    # deterministic by seed; another seed, other scenes
    data_trees.write_taskonomy(tmp_path / "b", buildings=3, views=3, seed=0, img_size=32)
    data_trees.write_taskonomy(tmp_path / "c", buildings=3, views=3, seed=1, img_size=32)
    for dirpath, _, files in os.walk(root):
        for f in files:
            rel = os.path.relpath(os.path.join(dirpath, f), root)
            assert (tmp_path / "b" / rel).read_bytes() == (root / rel).read_bytes(), rel
    b, p, v = keys[0]
    rgb = f"rgb/taskonomy/{b}/point_{p}_view_{v}_domain_rgb.png"
    assert not os.path.exists(tmp_path / "c" / rgb) or (tmp_path / "c" / rgb).read_bytes() != (root / rgb).read_bytes()
    with pytest.raises(FileExistsError, match="already holds a tree"):
        data_trees.write_taskonomy(root, buildings=1, views=1, img_size=32)
    with pytest.raises(ValueError, match="--buildings 99: use 1 to"):
        data_trees.write_taskonomy(tmp_path / "d", buildings=99, views=1, img_size=32)


def test_taskonomy_partial_download_skips_incomplete_buildings_with_one_line(tmp_path, capsys):
    """Issue 12 item 1: buildings absent from the root, or present in only some domains, are skipped and counted in
    one warning line; require_all_buildings makes it a one-line error; fullplus drops the official new_list."""
    root = tmp_path / "tree"
    keys = data_trees.write_taskonomy(root, buildings=7, views=1, seed=0, img_size=32)
    capsys.readouterr()
    csv = root / "splits_taskonomy" / "train_val_test_fullplus.csv"
    train = [b for b, _, _ in keys if b in data.read_split_csv(csv, "train")]
    assert len(train) == 5
    # one train building lacks a domain (a tar not fetched); a new_list building is present in full
    os.rename(root / "keypoints2d" / "taskonomy" / train[0], tmp_path / "moved")
    for domain in data_trees.TASKONOMY_DOMAINS:
        src = root / domain / "taskonomy" / train[1]
        os.symlink(src, root / domain / "taskonomy" / "gough")
    ds = data.TaskonomyDataset(root, split="train", split_csv=csv, img_size=24)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("warning: ")
    skip = data.TASKONOMY_SKIP_BUILDINGS + data.TASKONOMY_SPLIT_SKIPS["train_val_test_fullplus.csv"]
    assert "gough" in skip
    n_csv = len([b for b in data.read_split_csv(csv, "train") if b not in skip])
    assert f"{n_csv - 4} of the {n_csv} buildings" in lines[0]  # all but the 4 complete train buildings
    assert f"1 in only some of the 14 domains (e.g. {train[0]} lacks keypoints2d)" in lines[0]
    assert "--require-all-buildings" in lines[0] and "reading the other 4" in lines[0]
    assert sorted({b for b, _, _ in ds.views}) == sorted(train[1:])  # gough (new_list) is not read
    # only the tasks asked for count: without keypoints2d the building is complete
    ds = data.TaskonomyDataset(root, split="train", split_csv=csv, img_size=24, tasks=["normal"])
    assert train[0] in {b for b, _, _ in ds.views}
    # the same buildings from a CSV of another name: no new_list rule, gough is read
    other = tmp_path / "my_split.csv"
    other.write_bytes(csv.read_bytes())
    ds = data.TaskonomyDataset(root, split="train", split_csv=other, img_size=24)
    assert "gough" in {b for b, _, _ in ds.views}
    with pytest.raises(FileNotFoundError) as e:
        data.TaskonomyDataset(root, split="train", split_csv=csv, require_all_buildings=True)
    assert "\n" not in str(e.value) and "omnitools.download" in str(e.value) and train[0] in str(e.value)
    # through build_dataset and train.py's flag
    with pytest.raises(FileNotFoundError, match="incomplete"):
        data.build_dataset("taskonomy", "train", root=root, require_all_buildings=True)
    with pytest.raises(FileNotFoundError, match=r"no split file .*nowhere.csv.*--split-csv"):
        data.build_dataset("taskonomy", "train", root=root, split_csv=tmp_path / "nowhere.csv")
    # a truncated file still stops the run, with its path
    b, p, v = ds.views[0]
    path = root / "depth_zbuffer" / "taskonomy" / b / f"point_{p}_view_{v}_domain_depth_zbuffer.png"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match=f"cannot decode {re.escape(str(path))}.*truncated or corrupt"):
        ds[0]


def test_taskonomy_augmentation_stream_by_seed(tmp_path):
    """dataset[(i, seed)] draws crop and flip from a generator seeded with seed; dataset[i] from torch's global RNG."""
    root = tmp_path / "tree"
    data_trees.write_taskonomy(root, buildings=1, views=1, seed=0, img_size=32)
    # img_size 24: resize to 27, crop offsets 0..3 in each axis, flip: 32 possible draws
    ds = data.TaskonomyDataset(root, split="train", buildings=["allensville"], img_size=24)
    assert ds.augment

    def equal(a, b):
        return torch.equal(a[0], b[0]) and all(torch.equal(a[1][k], b[1][k]) for k in a[1])

    torch.manual_seed(0)
    state = torch.get_rng_state()
    samples = [ds[(0, seed)] for seed in range(6)]
    assert torch.equal(torch.get_rng_state(), state)  # the global stream is untouched
    assert all(equal(ds[(0, seed)], s) for seed, s in enumerate(samples))
    assert sum(not equal(samples[0], s) for s in samples[1:]) >= 4  # different seeds, different crops
    torch.manual_seed(3)
    a = ds[0]
    torch.manual_seed(3)
    assert equal(ds[0], a) and not torch.equal(torch.get_rng_state(), state)
    # the same index and seed give the same sample in a DataLoader worker process
    loader = torch.utils.data.DataLoader(ds, sampler=[(0, 4)], batch_size=None, num_workers=1)
    assert equal(next(iter(loader)), samples[4])


def test_taskonomy_class_indices_are_the_named_imagenet_classes():
    from torchvision.models._meta import _IMAGENET_CATEGORIES as imagenet
    names = {"ball": "soccer ball", "crate": "crate", "can": "ashcan", "pillar": "pole", "slab": "dining table",
             "figure": "ballplayer"}
    assert {c: imagenet[i] for c, i in data_trees.TASKONOMY_OBJECT_INDEX.items()} == names
    assert set(data_trees.TASKONOMY_OBJECT_INDEX) == set(data.SYNTHETIC_OBJECT_CATEGORIES)
    assert set(data_trees.TASKONOMY_SCENE_INDEX) == set(data.SYNTHETIC_SCENE_CATEGORIES)
    assert all(0 <= i < 365 for i in data_trees.TASKONOMY_SCENE_INDEX.values())


def _reference_getitem(ds, index):
    """The loader as it was before the speed-up (PIL decoding, v2 transforms on tv_tensors, masks at native
    resolution, out-of-place decoding): the oracle that the fast path must equal bit for bit."""
    from torchvision import tv_tensors
    b, p, v = ds.views[index]
    paths = {d: ds._path(b, p, v, d) for d in ["rgb"] + [n for n, _, _ in ds.tasks]}
    targets = {n: ds._load_class(paths[n], c) for n, c, kind in ds.tasks if kind == "image"}
    rgb = data.read_image(paths["rgb"])
    x = {"rgb": tv_tensors.Image(torch.from_numpy(rgb[..., :3].copy()).permute(2, 0, 1))}
    for n in [n for n, _, kind in ds.tasks if kind == "dense"]:
        arr = data.read_image(paths[n], sixteen_bit=n in data._16BIT)
        t = torch.from_numpy(arr.astype(np.float32) if n in data._16BIT else arr.copy())
        t = t.permute(2, 0, 1) if t.ndim == 3 else t[None]
        if n == "principal_curvature":
            t = t[:2]
        elif n == "reshading" and t.shape[0] == 1:
            t = t.repeat(3, 1, 1)
        elif n.startswith("segment_unsup"):
            t = t[:1]
        x[n] = tv_tensors.Mask(t) if n.startswith("segment_unsup") else tv_tensors.Image(t)
        if n.startswith("depth"):
            x[n + "_mask"] = tv_tensors.Mask(torch.from_numpy(arr != 65535)[None].to(torch.uint8))
        if n == "normal":
            x[n + "_mask"] = tv_tensors.Mask(torch.from_numpy(~((arr >= 127) & (arr <= 128)).all(-1))[None]
                                             .to(torch.uint8))
    crop = v2.RandomCrop(ds.img_size) if ds.augment else v2.CenterCrop(ds.img_size)
    geometry = v2.Compose([v2.Resize((ds.resize, ds.resize), v2.InterpolationMode.BILINEAR, antialias=True), crop])
    x = {k: t.as_subclass(torch.Tensor) for k, t in geometry(x).items()}
    flip = ds.augment and torch.rand(()) < 0.5
    if flip:
        x = {k: t.flip(-1) for k, t in x.items()}
    for n, _, kind in ds.tasks:
        if kind != "dense":
            continue
        v = x[n].float()
        if n.startswith("depth"):
            v = torch.log1p(v) / np.log(2**16)
        elif n == "principal_curvature":
            v = (v - torch.tensor([123.572, 120.1])[:, None, None]) / torch.tensor([31.922, 21.658])[:, None, None]
        else:
            lo, hi, clip = data._RESCALE.get(n, (0.0, 255.0, True))
            v = data.rescale(v, lo, hi, clip)
            if n == "edge_occlusion":
                v = torch.from_numpy(scipy.ndimage.gaussian_filter(v[0].numpy(), sigma=4 * ds.img_size / 224))[None]
        targets[n] = v
    if flip and "normal" in targets:
        targets["normal"][0] = -targets["normal"][0]
    targets.update({k: x[k].bool() for k in x if k.endswith("_mask")})
    for n in ("depth_euclidean", "depth_zbuffer"):
        if n in targets:
            targets[n][~targets[n + "_mask"]] = 1.0
    return x["rgb"].float() / 255 * 2 - 1, targets


def _assert_same_as_reference(ds, seeds, views=None):
    for i in range(len(ds)) if views is None else views:
        for r in seeds:
            torch.manual_seed(r)
            image, t = ds[i]
            torch.manual_seed(r)
            ref_image, ref = _reference_getitem(ds, i)
            assert torch.equal(image, ref_image) and list(t) == list(ref)
            for k in ref:
                assert t[k].dtype == ref[k].dtype and torch.equal(t[k], ref[k]), k


def test_taskonomy_fast_loader_equals_the_reference_path(taskonomy_tree):
    """The faster loader (libpng decoding, masks and ids by index selection, in-place decoding) changes no value:
    random crops and flips at 224 (seed 0 draws a flip, seed 2 none), the centre crop at 160 (resize 183, a
    scale that is not an integer)."""
    root, views = taskonomy_tree
    buildings = sorted({b for b, _, _ in views})
    _assert_same_as_reference(data.TaskonomyDataset(root, split="train", buildings=buildings), seeds=(0, 2))
    _assert_same_as_reference(data.TaskonomyDataset(root, split="test", buildings=buildings, img_size=160), seeds=(0,),
                              views=[0])


SAMPLE = os.path.join(REPO, "..", "shared", "taskonomy_sample")


@pytest.mark.skipif(not os.path.isdir(SAMPLE), reason="the real Taskonomy sample view is not on this machine")
def test_taskonomy_fast_loader_equals_the_reference_path_on_the_real_sample(tmp_path):
    """The same on the real sample view (10 domains; symlinked, never copied), plus written segment/class files."""
    root, stem = tmp_path / "real", "point_202_view_5_domain_"
    rng = np.random.default_rng(0)
    for domain in data_trees.TASKONOMY_DOMAINS:
        os.makedirs(root / domain / "taskonomy" / "sample")
        src = os.path.join(SAMPLE, domain, "taskonomy", "sample", f"{stem}{domain}.png")
        dst = root / domain / "taskonomy" / "sample" / f"{stem}{domain}"
        if os.path.exists(src):
            os.symlink(os.path.realpath(src), f"{dst}.png")
        elif domain.startswith("segment"):
            ids = np.kron(rng.integers(0, 256, (16, 16)), np.ones((32, 32))).astype(np.uint8)
            Image.fromarray(ids).save(f"{dst}.png")
        else:
            np.save(f"{dst}.npy", rng.random(1000 if domain == "class_object" else 365).astype(np.float32))
    for split in ("train", "test"):
        _assert_same_as_reference(data.TaskonomyDataset(root, split=split, buildings=["sample"]), seeds=(0, 2))


@pytest.mark.slow
def test_train_py_starts_on_a_partial_tree_and_says_so(tmp_path):
    """train.py on a written tree whose split file names absent buildings: one warning line, two steps, a checkpoint."""
    root = tmp_path / "tree"
    data_trees.write_taskonomy(root, buildings=2, views=2, seed=0, img_size=32)
    out = tmp_path / "run"
    cmd = [sys.executable, "train.py", "--dataset", "taskonomy", "--data-root", str(root), "--img-size", "32",
           "--batch-size", "2", "--steps", "2", "--workers", "0", "--no-final-eval", "--out-dir", str(out)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("warning: ")]
    assert len(warnings) == 1 and "absent" in warnings[0], r.stderr[-2000:]
    assert os.path.exists(out / "ckpt.pt")


@pytest.mark.slow
def test_train_py_require_all_buildings_stops_with_one_line(tmp_path):
    root = tmp_path / "tree"
    data_trees.write_taskonomy(root, buildings=2, views=2, seed=0, img_size=32)
    cmd = [sys.executable, "train.py", "--dataset", "taskonomy", "--data-root", str(root), "--img-size", "32",
           "--batch-size", "2", "--steps", "2", "--no-final-eval", "--out-dir", str(tmp_path / "run"),
           "--require-all-buildings"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode != 0 and last.startswith("error: ") and "absent" in last and "--require-all-buildings" in last
    split_csv = tmp_path / "only_present.csv"
    split_csv.write_text("id,train,val,test\nallensville,1,0,0\ncollierville,0,1,0\n")
    r = subprocess.run(cmd + ["--split-csv", str(split_csv)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "warning: " not in r.stderr, r.stderr[-2000:]


def test_bench_loader_prints_workers_needed(tmp_path, tiny_cfg, capsys):
    """bench.py --only loader at a tiny size: one worker's samples/s on a written tree against a training step."""
    import bench
    root = tmp_path / "tree"
    data_trees.write_taskonomy(root, buildings=1, views=2, seed=0, img_size=32)
    threads = torch.get_num_threads()
    results = bench.bench_loader(torch.device("cpu"), [("tiny", tiny_cfg, 2, 1)], str(root), samples=2)
    assert torch.get_num_threads() == threads  # the worker's one thread is given back
    (r,) = results
    assert r["worker_samples_per_s"] > 0 and r["step_images_per_s"] > 0
    assert r["workers_needed"] == pytest.approx(r["step_images_per_s"] / r["worker_samples_per_s"])
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| tiny |")]
    assert len(rows) == 1 and "CPU step" in rows[0]
