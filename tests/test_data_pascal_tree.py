"""The PASCAL_MT rehearsal tree (data_trees.py): written in the exact on-disk formats from the synthetic scenes, read
back by the real loader (PascalContextDataset) and scored at each image's own size by evaluate.py."""
import json
import math
import os
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import scipy.io
import torch
import torch.nn.functional as F
from PIL import Image

import data
import data_trees
import evaluate
from modsquad import ModSquad, ModSquadConfig

IMAGES, LONG_SIDE, SEED = 12, 80, 0  # 6 train + 6 val images of 45-80 px: the tree takes ~0.3 s to write
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("PASCAL_MT")
    return root, data_trees.write_pascal(str(root), IMAGES, seed=SEED, long_side=LONG_SIDE)


def each_image(ids):
    """(split, index in the split, image id) of every image of the tree."""
    return [(split, i, image_id) for split, split_ids in ids.items() for i, image_id in enumerate(split_ids)]


def synthetic(split, i):
    """What the synthetic scenes give for image i of split, at its native size: (scene, buffers, targets), targets
    {task: (value, mask)} from data.PASCAL_TARGETS, computed from the renderer and not from the files."""
    scene, buf = data_trees.pascal_sample(split, i, SEED, LONG_SIDE)
    return scene, buf, {name: data.PASCAL_TARGETS[name](buf, scene) for name, _, _ in data.SYNTHETIC_PASCAL_TASKS}


# VOC id of synthetic semseg label k (0 background, k = category + 1), the writer's stated mapping
VOC_OF_SYNTHETIC = np.array([0] + [data_trees.PASCAL_CLASSES[c][0] for c in data.SYNTHETIC_OBJECT_CATEGORIES])
NORMALS_QUANTUM = math.sqrt(3) / 255  # |decoded - true| of an 8-bit normal: 1/255 per channel at most
CUBIC_GAIN = 1.375 ** 2  # max Σ|w| of the a = -0.75 cubic kernel in 2-D (1.375 per axis, at a half-pixel shift)


def rgb_uint8(buf):
    return torch.from_numpy(np.round(np.clip(buf["rgb"], 0, 1) * 255)).permute(2, 0, 1)


def angle_deg(a, b):
    """Angle between (3, ...) vector fields, in degrees."""
    return torch.rad2deg(torch.acos(F.cosine_similarity(a, b, dim=0).clamp(-1, 1)))


def test_pascal_tree_layout_sizes_and_split_files(tree):
    root, ids = tree
    assert len(ids["train"]) == len(ids["val"]) == IMAGES // 2
    for split in ("train", "val"):
        assert (root / "ImageSets" / "Context" / f"{split}.txt").read_text().split() == ids[split]
    sizes = set()
    for split, i, image_id in each_image(ids):
        with Image.open(root / "JPEGImages" / f"{image_id}.jpg") as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            sizes.add(im.size)
            size = im.size
        semseg = [root / "semseg" / d / f"{image_id}.png" for d in ("VOC12", "pascal-context")]
        assert sum(p.exists() for p in semseg) == 1
        with Image.open(next(p for p in semseg if p.exists())) as im:
            assert im.mode == "P" and im.size == size  # a palette PNG, as VOC's label files
        for sub, ext in (("human_parts", ".mat"), ("normals_distill", ".png"), ("sal_distill", ".png"),
                         (os.path.join("pascal-context", "trainval"), ".mat")):
            assert (root / sub / f"{image_id}{ext}").exists()
    # VOC-like sizes: not square (most), not 512, both orientations, the longer side as asked
    assert len(sizes) >= 3 and any(w > h for w, h in sizes) and any(w < h for w, h in sizes)
    assert max(max(s) for s in sizes) == LONG_SIDE and (512, 512) not in sizes
    assert os.listdir(root / "semseg" / "VOC12") and os.listdir(root / "semseg" / "pascal-context")


def test_pascal_tree_is_deterministic_by_seed(tree, tmp_path):
    root, _ = tree
    data_trees.write_pascal(str(tmp_path / "same"), 4, seed=SEED, long_side=LONG_SIDE)
    data_trees.write_pascal(str(tmp_path / "other"), 4, seed=SEED + 1, long_side=LONG_SIDE)
    for image_id in ("2008_000000", "2008_000001", "2009_000000", "2009_000001"):
        for name in (f"JPEGImages/{image_id}.jpg", f"normals_distill/{image_id}.png", f"sal_distill/{image_id}.png"):
            assert (tmp_path / "same" / name).read_bytes() == (root / name).read_bytes()
        mat = f"pascal-context/trainval/{image_id}.mat"  # the headers of .mat files carry the write time
        assert (scipy.io.loadmat(tmp_path / "same" / mat)["LabelMap"] == scipy.io.loadmat(root / mat)["LabelMap"]).all()
        jpeg = f"JPEGImages/{image_id}.jpg"
        assert (tmp_path / "other" / jpeg).read_bytes() != (root / jpeg).read_bytes()
    with pytest.raises(FileExistsError, match="already holds a tree"):
        data_trees.write_pascal(str(tmp_path / "same"), 4)
    with pytest.raises(ValueError, match="--images 1: need at least 2"):
        data_trees.write_pascal(str(tmp_path / "one"), 1)


def test_pascal_tree_reads_back_exactly_at_native_size(tree):
    """Labels exact, the 8-bit normals within their quantum, the JPEG within a bound; the masks survive: no person
    -> all 255, normals valid only on NYU-compatible context classes (some surfaces are, some are not)."""
    root, ids = tree
    seen = {"no person": 0, "person": 0, "normals kept": 0, "normals dropped off the sky": 0}
    for split, i, image_id in each_image(ids):
        ds = data.PascalContextDataset(str(root), split, augment=False, native_labels=True)
        native = ds.native_targets(i)
        scene, buf, synth = synthetic(split, i)
        assert native["id"] == image_id and native["size"] == buf["surface"].shape
        # semseg: the synthetic classes in VOC ids (exact)
        assert (native["semseg"].numpy() == VOC_OF_SYNTHETIC[synth["semseg"][0]]).all()
        # human parts (exact), including the all-255 map of an image without a visible figure
        parts = synth["human_parts"][0]
        assert (native["human_parts"].numpy() == parts).all()
        seen["no person" if (parts == 255).all() else "person"] += 1
        assert (native["saliency"].numpy() == synth["saliency"][0]).all()
        # LabelMap: the file holds the writer's context map; edges and the normals mask derive from it as upstream
        label_map = scipy.io.loadmat(root / "pascal-context" / "trainval" / f"{image_id}.mat")["LabelMap"]
        assert (label_map == data_trees.pascal_label_map(buf, scene)).all()
        assert (native["edge"][0].numpy() == data.label_edges(label_map)).all()
        surface = synth["normals"][1][0]  # the synthetic validity: every surface, not the sky
        valid = surface & np.isin(label_map, list(data.NYU_NORMAL_CLASSES))
        assert (native["normals_mask"][0].numpy() == valid).all()
        seen["normals kept"] += valid.sum()
        seen["normals dropped off the sky"] += (surface & ~valid).sum()
        n, m = native["normals"], native["normals_mask"][0]
        assert (n[:, ~m] == 0).all()
        # 8-bit normals: |decoded - n| <= sqrt(3)/255, so the angle is at most asin(sqrt(3)/255) = 0.39 degrees
        assert angle_deg(n[:, m], torch.from_numpy(synth["normals"][0])[:, m].float()).max() <= 0.39
        # JPEG quality 90 (4:2:0): mean |error| <= 6 levels, 99th percentile <= 40 (measured <= 5.1 and <= 33)
        err = (native["image"].float() - rgb_uint8(buf)).abs()
        assert err.mean() <= 6 and err.flatten().quantile(0.99) <= 40
    assert all(seen.values()), seen


def test_pascal_tree_reads_back_through_the_test_time_resize(tree):
    """The loader's 64² targets equal the synthetic targets put through the same resize (cv2 nearest for labels,
    cubic for image and normals), up to the formats' quantisation."""
    root, ids = tree
    size = (64, 64)  # native sizes are 45-80 px: every image is up- and/or downscaled
    for split, i, image_id in each_image(ids):
        image, t = data.PascalContextDataset(str(root), split, img_size=64, augment=False)[i]
        scene, buf, synth = synthetic(split, i)
        def near(a):
            return data.cv2_resize(torch.from_numpy(np.ascontiguousarray(a))[None], size, "nearest")[0]

        assert (t["semseg"] == near(VOC_OF_SYNTHETIC[synth["semseg"][0]])).all()
        parts = near(synth["human_parts"][0])
        assert (t["human_parts"] == (parts.fill_(255) if (parts == 0).all() else parts)).all()
        assert (t["saliency"][0] == near(synth["saliency"][0])).all()
        label_map = data_trees.pascal_label_map(buf, scene)
        assert (t["edge"][0] == near(data.label_edges(label_map).astype(np.uint8))).all()
        valid = synth["normals"][1][0] & np.isin(label_map, list(data.NYU_NORMAL_CLASSES))
        assert (t["normals_mask"][0] == near(valid)).all()
        # normals: the resize moves each channel's quantum by at most CUBIC_GAIN, relative to the resized length
        m = t["normals_mask"][0]
        reference = data.cv2_resize(torch.from_numpy(synth["normals"][0] * valid).float(), size, "cubic")[:, m]
        bound = torch.rad2deg(torch.asin((CUBIC_GAIN * NORMALS_QUANTUM / reference.norm(dim=0)).clamp(max=1)))
        assert (angle_deg(t["normals"][:, m], reference) <= bound + 1e-3).all()
        # image: JPEG error through the same cubic resize and truncation, mean <= 6 levels (measured <= 4.8)
        ref = data.cv2_resize(rgb_uint8(buf).float(), size, "cubic").clamp(0, 255).floor() / 255 * 2 - 1
        assert image.shape == (3, 64, 64) and ((image - ref).abs() * 255 / 2).mean() <= 6


class Oracle(torch.nn.Module):
    """A 'model' that predicts each batch's own targets at the network's resolution, as confident logits."""

    def __init__(self, cfg, batches):
        super().__init__()
        self.cfg, self.batches = cfg, batches

    def forward(self, images, tasks):
        targets = next(b[1] for b in self.batches if torch.equal(b[0], images))
        preds = []
        for task in tasks:
            name, C, _ = self.cfg.tasks[task]
            y = targets[name]
            if name in ("semseg", "human_parts"):
                preds.append(10.0 * F.one_hot(y.masked_fill(y == 255, 0), C).permute(0, 3, 1, 2).float())
            elif name == "normals":
                preds.append(y.clone())
            else:
                preds.append(20 * (2 * y - 1))
        return preds, [[] for _ in tasks]


def test_pascal_native_evaluation_scores_at_each_images_own_size(tree):
    """An oracle at 32² is perfect in the in-loop protocol but not at native size, where its predictions are resized
    back to the images' 45-80 px and scored on the untouched labels, as MTL-PyTorch's final evaluation."""
    root, _ = tree
    cfg = ModSquadConfig(img_size=32, patch_size=8, tasks=data.PASCAL_TASKS)
    ds = data.PascalContextDataset(str(root), "val", img_size=32, augment=False, native_labels=True)
    batches = list(torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=data.collate_native))
    oracle = Oracle(cfg, batches)
    in_loop = evaluate.evaluate_model(oracle, [b[:2] for b in batches], "cpu")
    native = evaluate.evaluate_pascal_native(oracle, batches, "cpu")
    assert in_loop["semseg"]["miou"] == in_loop["human_parts"]["miou"] == in_loop["saliency"]["miou"] == 1.0
    assert in_loop["normals"]["mean_angle_deg"] < 0.1 and in_loop["edge"]["odsF"] > 0.99
    assert 0.3 < native["semseg"]["miou"] < 0.99 and 0.3 < native["human_parts"]["miou"] < 0.99
    assert 0.3 < native["saliency"]["miou"] < 0.99 and 1 < native["normals"]["mean_angle_deg"] < 45
    assert native["edge"]["odsF"] < 0.99
    assert native["semseg"]["loss"] == pytest.approx(in_loop["semseg"]["loss"])  # the loss stays at 32²
    # each saved prediction has its image's size, 8-bit values, labels by nearest from the argmax
    images, targets, natives = batches[0]
    preds, _ = oracle(images, [0, 3])
    for j, native in enumerate(natives):
        labels = evaluate.pascal_native_prediction("semseg", preds[0][j], native["size"])
        assert labels.dtype == torch.uint8 and labels.shape == native["size"]
        torch.testing.assert_close(labels, data.cv2_resize(targets["semseg"][j][None].to(torch.uint8),
                                                           native["size"], "nearest")[0])
        png = evaluate.pascal_native_prediction("normals", preds[1][j], native["size"])
        assert png.dtype == torch.uint8 and png.shape == (3, *native["size"])
    # 8 bits by truncation, as astype(np.uint8): 255 sigmoid(x) = 100.9 is saved as 100
    logit = torch.logit(torch.tensor(100.9 / 255)).expand(1, 4, 4)
    assert (evaluate.pascal_native_prediction("saliency", logit, (6, 6)) == 100).all()


def make_pascal_run(run_dir, root):
    """A run directory as train.py writes it for --dataset pascal, holding an untrained tiny model."""
    torch.manual_seed(0)
    cfg = ModSquadConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, head_dim=16,
                         num_attn_experts=4, num_mlp_experts=4, mlp_top_k=2, tasks=data.PASCAL_TASKS)
    args = {"dataset": "pascal", "data_root": str(root), "img_size": 32, "tasks": None, "batch_size": 3, "seed": 0}
    torch.save({"model": ModSquad(cfg).state_dict(), "optimizer": {}, "scheduler": {"step": 0}, "step": 0,
                "config": asdict(cfg), "args": args, "loss_weights": None}, run_dir / "ckpt.pt")


def test_evaluate_cli_scores_a_pascal_run_at_native_size_by_default(tree, tmp_path, capsys):
    root, _ = tree
    make_pascal_run(tmp_path, root)
    evaluate.main([str(tmp_path), "--device", "cpu", "--max-batches", "1"])
    out = capsys.readouterr().out
    scored = json.loads((tmp_path / "metrics_val.json").read_text())
    assert "protocol: native size" in out and scored["protocol"] == "native"
    assert set(scored["metrics"]) == {name for name, _, _ in data.PASCAL_TASKS}
    assert all(math.isfinite(v) for m in scored["metrics"].values() for v in m.values())
    evaluate.main([str(tmp_path), "--device", "cpu", "--max-batches", "1", "--protocol", "in-loop"])
    out = capsys.readouterr().out
    in_loop = json.loads((tmp_path / "metrics_val.json").read_text())
    assert "protocol: in-loop" in out and "32²" in out and in_loop["protocol"] == "in-loop"
    assert in_loop["metrics"]["semseg"]["miou"] != scored["metrics"]["semseg"]["miou"]
    # Δm only between runs scored with the same protocol
    single = tmp_path / "single"
    single.mkdir()
    (single / "metrics_val.json").write_text(json.dumps(in_loop))
    with pytest.raises(SystemExit):
        evaluate.main([str(tmp_path), "--device", "cpu", "--max-batches", "1", "--single-task", str(single)])
    assert "--protocol native" in capsys.readouterr().err


@pytest.mark.slow
def test_write_pascal_command_line(tmp_path):
    out = subprocess.run([sys.executable, "data.py", "--write-pascal", str(tmp_path / "t"), "--images", "2",
                          "--long-side", "32"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "wrote 2 PASCAL_MT images (1 train, 1 val" in out.stdout
    assert len(data.PascalContextDataset(str(tmp_path / "t"), "val")) == 1
    again = subprocess.run([sys.executable, "data.py", "--write-pascal", str(tmp_path / "t")], cwd=REPO,
                           capture_output=True, text=True)
    assert again.returncode == 2 and again.stderr.strip().splitlines()[-1].endswith("or remove it first")
