"""Real-dataset loaders on tiny fixtures written in the exact on-disk formats (no real data, no downloads)."""

import math
import os

import numpy as np
import pytest
import scipy.io
import scipy.ndimage
import torch
import torch.nn.functional as F
from PIL import Image

from data import (NYU_NORMAL_CLASSES, PASCAL_TASKS, TASKONOMY_TASKS, PascalContextDataset, TaskonomyDataset,
                        cv2_resize, cv2_zoom, read_split_csv, thin)

DENSE = [n for n, _, kind in TASKONOMY_TASKS if kind == "dense"]


# ---------------------------------------------------------------------------------------------------------------
# Taskonomy fixtures: <root>/<domain>/taskonomy/<building>/point_<P>_view_<V>_domain_<domain>.png


def _taskonomy_file(root, domain, building, point, view, value, size=16):
    """Write one file of `domain` whose pixels are `value` (a scalar/colour, or a full array)."""
    folder = os.path.join(root, domain, "taskonomy", building)
    os.makedirs(folder, exist_ok=True)
    stem = os.path.join(folder, f"point_{point}_view_{view}_domain_{domain}")
    if domain.startswith("class_"):
        np.save(stem + ".npy", np.asarray(value, dtype=np.float32))
        return stem + ".npy"
    if domain in ("depth_euclidean", "depth_zbuffer", "edge_occlusion", "edge_texture", "keypoints2d", "keypoints3d"):
        arr = np.broadcast_to(np.asarray(value, dtype=np.uint16), (size, size))
        img = Image.fromarray(np.ascontiguousarray(arr))  # uint16 -> mode 'I;16', saved as a 16-bit PNG
    elif domain in ("reshading", "segment_unsup2d", "segment_unsup25d"):
        img = Image.fromarray(np.ascontiguousarray(np.broadcast_to(np.asarray(value, np.uint8), (size, size))))
    else:
        img = Image.fromarray(np.ascontiguousarray(np.broadcast_to(np.asarray(value, np.uint8), (size, size, 3))))
    img.save(stem + ".png")
    return stem + ".png"


def _taskonomy_view(root, building, point, view, size=16, **overrides):
    """All 13 domains + rgb of one view, with the known values below unless overridden."""
    values = {"rgb": (255, 0, 51), "class_object": np.arange(1000.0)[None], "class_scene": np.ones(365) / 365,
              "depth_euclidean": 1024, "depth_zbuffer": 2048, "edge_occlusion": 1024, "edge_texture": 2000,
              "keypoints2d": 100, "keypoints3d": 32768, "normal": (200, 100, 50), "principal_curvature": (127, 127, 0),
              "reshading": 51, "segment_unsup2d": 7, "segment_unsup25d": 255}
    values.update(overrides)
    return {d: _taskonomy_file(root, d, building, point, view, v, size) for d, v in values.items()}


def test_taskonomy_decodes_the_official_normalisation(tmp_path):
    """Every domain decodes to the contract's official target; 65535 and the no-normal colour are masked."""
    depth = np.full((16, 16), 1024, np.uint16)
    depth[5, 5] = 65535
    normal = np.full((16, 16, 3), (200, 100, 50), np.uint8)
    normal[6, 6], normal[7, 7] = (128, 128, 128), (127, 128, 127)
    kp2d = np.full((16, 16), 100, np.uint16)
    kp2d[3, 3] = 5000
    _taskonomy_view(tmp_path, "b1", 1, 0, depth_euclidean=depth, normal=normal, keypoints2d=kp2d)
    # img_size 14 -> resize to round(14 * 256 / 224) = 16 (the native size) then centre crop 14 at offset 1
    ds = TaskonomyDataset(tmp_path, split="test", buildings=["b1"], img_size=14)
    assert ds.tasks == TASKONOMY_TASKS and len(ds) == 1
    image, t = ds[0]
    assert image.shape == (3, 14, 14) and image.dtype == torch.float32
    torch.testing.assert_close(image[:, 0, 0], torch.tensor([1.0, -1.0, 51 / 255 * 2 - 1]))
    torch.testing.assert_close(t["class_object"], torch.arange(1000.0))  # (1, 1000) on disk, squeezed, raw
    assert t["class_scene"].shape == (365,)

    def at(name, r=0, c=0):
        return t[name][:, r, c]

    # depth: v = 512 * metres, target log(1 + v) / log(2^16); 65535 (missing) -> mask False and value 1.0
    assert at("depth_euclidean").item() == pytest.approx(math.log(1 + 1024) / math.log(2**16), abs=1e-6)
    assert at("depth_zbuffer").item() == pytest.approx(math.log(1 + 2048) / math.log(2**16), abs=1e-6)
    assert at("depth_euclidean", 4, 4).item() == 1.0 and not t["depth_euclidean_mask"][0, 4, 4]
    assert t["depth_euclidean_mask"].sum() == 14 * 14 - 1 and t["depth_zbuffer_mask"].all()
    assert at("edge_occlusion").item() == pytest.approx(1024 / 409.6 * 2 - 1, abs=1e-5)  # 4.0: never clipped
    assert at("edge_texture").item() == pytest.approx(2000 / 5242.88 * 2 - 1, abs=1e-6)
    assert at("keypoints2d").item() == pytest.approx(100 / 327.68 * 2 - 1, abs=1e-6)
    assert at("keypoints2d", 2, 2).item() == 1.0  # 5000 clipped at 0.005 * 2^16
    assert at("keypoints3d").item() == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(at("normal"), torch.tensor([200, 100, 50]) / 255 * 2 - 1)
    assert not t["normal_mask"][0, 5, 5] and not t["normal_mask"][0, 6, 6] and t["normal_mask"].sum() == 14 * 14 - 2
    # curvature 127 (zero curvature) -> standardised with the official channel statistics
    curvature = torch.tensor([(127 - 123.572) / 31.922, (127 - 120.1) / 21.658])
    torch.testing.assert_close(at("principal_curvature"), curvature)
    torch.testing.assert_close(at("reshading"), torch.full((3,), 51 / 255 * 2 - 1))  # 1-channel file -> 3 channels
    assert at("segment_unsup2d").item() == pytest.approx(7 / 255 * 2 - 1) and at("segment_unsup25d").item() == 1.0
    for name, channels, kind in TASKONOMY_TASKS:
        if kind == "dense":
            assert t[name].shape == (channels, 14, 14) and t[name].dtype == torch.float32
    assert {k for k in t if k.endswith("_mask")} == {"depth_euclidean_mask", "depth_zbuffer_mask", "normal_mask"}


def test_taskonomy_joins_views_by_point_and_view(tmp_path):
    """Targets pair with their own rgb view even when a domain holds extra files that shift any sorted order."""
    for k, (point, view) in enumerate([(2, 1), (10, 0), (1, 3)], start=1):  # "point_10" sorts before "point_2"
        _taskonomy_view(tmp_path, "b1", point, view, rgb=(10 * k, 0, 0), depth_zbuffer=100 * k)
    _taskonomy_file(tmp_path, "depth_zbuffer", "b1", 0, 0, 9999)  # a depth view without rgb: ignored
    ds = TaskonomyDataset(tmp_path, split="test", tasks=["depth_zbuffer"], buildings=["b1"], img_size=14)
    assert len(ds) == 3
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    k = ((batch[0][:, 0, 0, 0] + 1) / 2 * 255 / 10).round()  # rgb red channel encodes k
    expected = torch.log1p(100 * k) / math.log(2**16)
    torch.testing.assert_close(batch[1]["depth_zbuffer"][:, 0, 0, 0], expected)


def test_taskonomy_flip_mirrors_everything_and_negates_normal_x(tmp_path):
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[:, 16:] = 255  # left half black, right half white
    _taskonomy_view(tmp_path, "b1", 1, 0, size=32, rgb=rgb)
    ds = TaskonomyDataset(tmp_path, split="train", tasks=["normal"], buildings=["b1"], img_size=28)
    torch.manual_seed(0)
    x = 200 / 255 * 2 - 1
    seen = set()
    for _ in range(16):
        image, t = ds[0]
        flipped = bool(image[0, :, 0].mean() > image[0, :, -1].mean())
        torch.testing.assert_close(t["normal"][0], torch.full((28, 28), -x if flipped else x))
        torch.testing.assert_close(t["normal"][1], torch.full((28, 28), 100 / 255 * 2 - 1))
        seen.add(flipped)
    assert seen == {True, False}


def test_taskonomy_edge_occlusion_blur_sigma_scales_with_img_size(tmp_path):
    raw = np.zeros((32, 32), np.uint16)
    raw[16, 16] = 40000
    _taskonomy_view(tmp_path, "b1", 1, 0, size=32, edge_occlusion=raw)
    # img_size 28 -> resize 32 (identity), centre crop at offset 2, blur sigma = 4 * 28 / 224 = 0.5 px
    _, t = TaskonomyDataset(tmp_path, split="test", tasks=["edge_occlusion"], buildings=["b1"], img_size=28)[0]
    expected = scipy.ndimage.gaussian_filter(raw[2:30, 2:30].astype(np.float32) / 409.6 * 2 - 1, sigma=0.5)
    torch.testing.assert_close(t["edge_occlusion"][0], torch.from_numpy(expected))
    assert t["edge_occlusion"].max() > 1  # unclipped, as the official target


@pytest.mark.parametrize("newline", ["\r", "\n", "\r\n"])
def test_split_csv_any_line_ending(tmp_path, newline):
    csv = tmp_path / "train_val_test_tiny.csv"
    rows = ["id,train,val,test", "hanson,1,0,0", "merom,0,1,0", "pomaria,0,0,1", "woodbine,1,0,0", ""]
    csv.write_bytes(newline.join(rows).encode())
    assert read_split_csv(csv, "train") == ["hanson", "woodbine"]
    assert read_split_csv(csv, "trainval") == ["hanson", "merom", "woodbine"]
    assert read_split_csv(csv, "test") == ["pomaria"]


def test_taskonomy_split_csv_skips_official_buildings_and_names_absent_ones(tmp_path, capsys):
    data = tmp_path / "data"
    for b in ("hanson", "woodbine", "gough"):
        _taskonomy_view(data, b, 1, 0)
    csv = tmp_path / "train_val_test_fullplus.csv"
    csv.write_bytes(b"id,train,val,test\rhanson,1,0,0\rwoodbine,1,0,0\rmerom,0,1,0\rgough,1,0,0\r")
    ds = TaskonomyDataset(data, split="train", tasks=["normal"], split_csv=csv)
    # woodbine is always skipped, gough is in fullplus's new_list; nothing is absent, so no warning
    assert {b for b, _, _ in ds.views} == {"hanson"} and capsys.readouterr().err == ""
    with pytest.raises(FileNotFoundError, match="1 of the 2 buildings .* incomplete .*: 1 absent \\(e.g. merom\\)"):
        TaskonomyDataset(data, split="trainval", tasks=["normal"], split_csv=csv, require_all_buildings=True)
    ds = TaskonomyDataset(data, split="trainval", tasks=["normal"], split_csv=csv)
    assert len(ds) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: 1 of the 2 buildings") and "merom" in err


def test_taskonomy_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="omnitools.download .*--components taskonomy"):
        TaskonomyDataset(tmp_path / "nowhere", buildings=["b1"])
    with pytest.raises(FileNotFoundError, match="rgb"):
        TaskonomyDataset(tmp_path, buildings=["b1"])  # exists but empty
    files = _taskonomy_view(tmp_path, "b1", 1, 0)
    _taskonomy_view(tmp_path, "b1", 2, 0)
    with pytest.raises(ValueError, match="valid tasks: .*class_object"):
        TaskonomyDataset(tmp_path, tasks=["depth"], buildings=["b1"])
    os.remove(files["keypoints2d"])
    with pytest.raises(FileNotFoundError, match=files["keypoints2d"]):
        TaskonomyDataset(tmp_path, tasks=["keypoints2d"], buildings=["b1"])
    os.rename(tmp_path / "keypoints2d", tmp_path / "kp")
    with pytest.raises(FileNotFoundError, match=os.path.join(str(tmp_path), "keypoints2d", "taskonomy")):
        TaskonomyDataset(tmp_path, tasks=["keypoints2d"], buildings=["b1"])


def test_taskonomy_corrupt_or_wrong_depth_files_name_their_path(tmp_path):
    files = _taskonomy_view(tmp_path, "b1", 1, 0, size=64)
    ds = TaskonomyDataset(tmp_path, split="test", tasks=["depth_zbuffer", "class_scene"], buildings=["b1"], img_size=56)
    with open(files["depth_zbuffer"], "r+b") as f:
        f.truncate(os.path.getsize(files["depth_zbuffer"]) // 2)
    with pytest.raises(ValueError, match=f"cannot decode {files['depth_zbuffer']}"):
        ds[0]
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(files["depth_zbuffer"])  # 8-bit where 16-bit is expected
    with pytest.raises(ValueError, match="16-bit"):
        ds[0]
    _taskonomy_view(tmp_path, "b1", 1, 0, size=64, class_scene=np.ones(10))
    with pytest.raises(ValueError, match="expected 365"):
        ds[0]


def test_taskonomy_class_softmax_gives_a_distribution(tmp_path):
    _taskonomy_view(tmp_path, "b1", 1, 0)
    ds = TaskonomyDataset(tmp_path, tasks=["class_object"], buildings=["b1"], img_size=14, class_softmax=True)
    _, t = ds[0]
    torch.testing.assert_close(t["class_object"], torch.arange(1000.0).softmax(0))


# ---------------------------------------------------------------------------------------------------------------
# PASCAL-Context fixtures (PASCAL_MT layout)


def _anno(objects):
    """A PASCAL-Part 'anno' struct: objects = [(class_ind, mask, [(part_name, mask), ...]), ...]."""
    objs = np.zeros((1, len(objects)), dtype=[("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")])
    for i, (cls, mask, parts) in enumerate(objects):
        part_arr = np.zeros((1, len(parts)), dtype=[("part_name", "O"), ("mask", "O")]) if parts else np.zeros((0, 0))
        for j, (name, pmask) in enumerate(parts):
            part_arr[0, j] = (name, pmask.astype(np.uint8))
        objs[0, i] = ("obj", np.array([[cls]]), mask.astype(np.uint8), part_arr)
    anno = np.zeros((1, 1), dtype=[("imname", "O"), ("objects", "O")])
    anno[0, 0] = ("img", objs)
    return {"anno": anno}


def _pascal(root, ids=("2008_000001",), split="train", size=12, objects=None):
    """One PASCAL_MT tree; the image is black on the left half and white on the right."""
    for d in ("JPEGImages", "ImageSets/Context", "semseg/VOC12", "human_parts", "normals_distill", "sal_distill",
              "pascal-context/trainval"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    (root / "ImageSets/Context" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    image = np.zeros((size, size, 3), np.uint8)
    image[:, size // 2:] = 255
    semseg = np.zeros((size, size), np.uint8)
    semseg[:4], semseg[-1] = 15, 255
    label_map = np.full((size, size), 440, np.uint16)  # wall: NYU-compatible
    label_map[:, size // 2:] = 360  # sky: not NYU-compatible
    label_map[0, 0] = 427  # tvmonitor: added by hand in MTL-PyTorch
    sal = np.zeros((size, size), np.uint8)
    sal[:, 0], sal[:, 1], sal[:, 2] = 128, 127, 255
    for i in ids:
        Image.fromarray(image).save(root / "JPEGImages" / f"{i}.jpg", quality=100)
        seg = Image.fromarray(semseg, mode="P")
        seg.putpalette([0, 0, 0, 128, 0, 0] * 128)
        seg.save(root / "semseg/VOC12" / f"{i}.png")
        Image.fromarray(np.full((size, size, 3), (255, 128, 0), np.uint8)).save(root / "normals_distill" / f"{i}.png")
        Image.fromarray(sal).save(root / "sal_distill" / f"{i}.png")
        scipy.io.savemat(root / "pascal-context/trainval" / f"{i}.mat", {"LabelMap": label_map})
        scipy.io.savemat(root / "human_parts" / f"{i}.mat", _anno(objects or []))


def _box(r0, r1, c0, c1, size=12):
    m = np.zeros((size, size), bool)
    m[r0:r1, c0:c1] = True
    return m


def test_pascal_decodes_all_tasks(tmp_path):
    person = (15, _box(0, 12, 0, 12), [("head", _box(0, 2, 0, 12)), ("torso", _box(2, 4, 0, 12)),
                                       ("luarm", _box(4, 5, 0, 12)), ("lhand", _box(5, 6, 0, 12)),
                                       ("ruleg", _box(6, 7, 0, 12)), ("rfoot", _box(7, 8, 0, 12))])
    dog = (12, _box(8, 12, 0, 12), [("head", _box(8, 12, 0, 12))])  # parts of non-persons are ignored
    _pascal(tmp_path, objects=[person, dog])
    ds = PascalContextDataset(tmp_path, img_size=12, augment=False)
    assert ds.tasks == PASCAL_TASKS and len(ds) == 1
    image, t = ds[0]
    assert image.shape == (3, 12, 12) and image[:, :, 0].max() < -0.9 and image[:, :, -1].min() > 0.9
    assert t["semseg"].dtype == torch.int64 and t["semseg"].shape == (12, 12)
    assert t["semseg"][0, 0] == 15 and t["semseg"][5, 5] == 0 and t["semseg"][-1, 0] == 255
    assert t["human_parts"][:, 0].tolist() == [1, 1, 2, 2, 3, 4, 5, 6, 0, 0, 0, 0]
    assert t["saliency"].shape == (1, 12, 12) and t["saliency"][0, 0, :4].tolist() == [1.0, 0.0, 1.0, 0.0]
    n = torch.tensor([1.0, 128 * 2 / 255 - 1, -1.0])
    n = n / n.norm()
    torch.testing.assert_close(t["normals"][:, 5, 0], n)  # wall: kept, unit length
    torch.testing.assert_close(t["normals"][:, 0, 0], n)  # tvmonitor: kept
    assert (t["normals"][:, :, 6:] == 0).all() and not t["normals_mask"][:, :, 6:].any()  # sky: dropped
    assert t["normals_mask"][:, :, :6].all()
    # edge: the label boundary between columns 5 and 6 thinned to one pixel per row
    e = t["edge"][0]
    assert e.shape == (12, 12) and set(e.unique().tolist()) <= {0.0, 1.0}
    assert (e[2:-2, :5] == 0).all() and (e[2:-2, 7:] == 0).all() and (e[2:-2, 5:7].sum(1) == 1).all()


def test_pascal_without_person_parts_is_all_ignore(tmp_path):
    person_without_parts = (15, _box(0, 6, 0, 6), [])
    _pascal(tmp_path, objects=[person_without_parts, (12, _box(6, 12, 0, 12), [("head", _box(6, 8, 0, 12))])])
    _, t = PascalContextDataset(tmp_path, tasks=["human_parts"], img_size=12, augment=False)[0]
    assert (t["human_parts"] == 255).all() and list(t) == ["human_parts"]


def test_pascal_flip_negates_normals_x(tmp_path):
    _pascal(tmp_path)
    ds = PascalContextDataset(tmp_path, tasks=["normals"], img_size=12, augment=True)
    torch.manual_seed(0)
    seen = set()
    for _ in range(16):
        image, t = ds[0]
        row = image[0, 6]
        flipped = bool(row[:6].mean() > row[6:].mean())  # the right (white) half moved left
        valid = t["normals_mask"][0]
        assert valid.any() and (t["normals"][:, ~valid] == 0).all()
        x = t["normals"][0][valid]
        assert ((x < 0) if flipped else (x > 0)).all()
        seen.add(flipped)
    assert seen == {True, False}


def test_pascal_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="PASCAL_MT.tgz"):
        PascalContextDataset(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="ImageSets"):
        PascalContextDataset(tmp_path)
    _pascal(tmp_path, ids=("a", "b"))
    with pytest.raises(ValueError, match="valid tasks: .*semseg"):
        PascalContextDataset(tmp_path, tasks=["segmentation"])
    os.remove(tmp_path / "sal_distill" / "b.png")
    with pytest.raises(FileNotFoundError, match=os.path.join(str(tmp_path), "sal_distill", "b.png")):
        PascalContextDataset(tmp_path)
    # semseg/VOC12 is preferred, semseg/pascal-context is the fallback; neither is an error naming both
    os.makedirs(tmp_path / "semseg" / "pascal-context")
    os.rename(tmp_path / "semseg" / "VOC12" / "b.png", tmp_path / "semseg" / "pascal-context" / "b.png")
    ds = PascalContextDataset(tmp_path, tasks=["semseg"], img_size=12, augment=False)
    assert ds[1][1]["semseg"][0, 0] == 15
    os.remove(tmp_path / "semseg" / "pascal-context" / "b.png")
    with pytest.raises(FileNotFoundError, match="semseg/VOC12/b.png nor semseg/pascal-context/b.png"):
        PascalContextDataset(tmp_path, tasks=["semseg"])
    (tmp_path / "JPEGImages" / "a.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=os.path.join(str(tmp_path), "JPEGImages", "a.jpg")):
        ds[0]


def test_thin_matches_skimage_and_normal_classes_match_mtl_pytorch():
    # the example of skimage.morphology.thin's docstring
    square = np.zeros((7, 7), np.uint8)
    square[1:-1, 2:-2] = 1
    square[0, 1] = 1
    expected = np.zeros((7, 7), bool)
    expected[0, 1] = expected[1, 2] = expected[2, 3] = expected[3, 3] = expected[4, 3] = True
    assert (thin(square) == expected).all()
    # 169 NYU names shared with PASCAL-Context (not 'unknown' = 431) plus tvmonitor = 427; sky = 360 is not one
    assert len(NYU_NORMAL_CLASSES) == 170 and 427 in NYU_NORMAL_CLASSES and 440 in NYU_NORMAL_CLASSES
    assert 431 not in NYU_NORMAL_CLASSES and 360 not in NYU_NORMAL_CLASSES


# ---------------------------------------------------------------------------------------------------------------
# PASCAL-Context geometry as MTL-PyTorch's cv2 calls compute it, against numpy transcriptions of OpenCV's resize.cpp


def _cv2_taps(n_out, n_in):
    """OpenCV resize's source position per output pixel: fx = (float)((dx + 0.5) * scale - 0.5), scale = 1 / (n_out /
    n_in) in double; sx = floor(fx), t = fx - sx in float32."""
    fx = ((np.arange(n_out) + 0.5) * (1 / (n_out / n_in)) - 0.5).astype(np.float32)
    sx = np.floor(fx).astype(np.int64)
    return sx, (fx - sx).astype(np.float32)


def _cv2_cubic(img, h, w):
    """cv2.resize(img, (w, h), interpolation=cv2.INTER_CUBIC) of a float32 (H, W, C) image: interpolateCubic's
    coefficients (A = -0.75, float32, the last as 1 - the others), taps sx-1..sx+2 clamped to the border (replicate),
    rows first (HResizeCubic), then columns (VResizeCubic)."""
    def weights(n_out, n_in):
        sx, t = _cv2_taps(n_out, n_in)
        A = np.float32(-0.75)
        c0 = ((A * (t + 1) - 5 * A) * (t + 1) + 8 * A) * (t + 1) - 4 * A
        c1 = ((A + 2) * t - (A + 3)) * t * t + 1
        c2 = ((A + 2) * (1 - t) - (A + 3)) * (1 - t) * (1 - t) + 1
        return np.clip(sx[:, None] + np.arange(-1, 3), 0, n_in - 1), np.stack([c0, c1, c2, 1 - c0 - c1 - c2], 1)
    (ri, rw), (ci, cw) = weights(h, img.shape[0]), weights(w, img.shape[1])
    rows = (img[:, ci] * cw[None, :, :, None]).sum(2, dtype=np.float32)  # (H, w, C)
    return (rows[ri] * rw[:, :, None, None]).sum(1, dtype=np.float32)  # (h, w, C)


def _cv2_linear(img, h, w):
    """cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR) of a float32 (H, W, C) image: sx < 0 -> (0, t = 0),
    sx >= n - 1 -> (n - 1, t = 0), two taps."""
    def weights(n_out, n_in):
        sx, t = _cv2_taps(n_out, n_in)
        t = np.where((sx < 0) | (sx >= n_in - 1), 0, t).astype(np.float32)
        sx = np.clip(sx, 0, n_in - 1)
        return np.stack([sx, np.minimum(sx + 1, n_in - 1)], 1), np.stack([1 - t, t], 1)
    (ri, rw), (ci, cw) = weights(h, img.shape[0]), weights(w, img.shape[1])
    rows = (img[:, ci] * cw[None, :, :, None]).sum(2)
    return (rows[ri] * rw[:, :, None, None]).sum(1)


def _cv2_nearest(img, h, w):
    """cv2.resize(img, (w, h), interpolation=cv2.INTER_NEAREST), resizeNN: sx = cvFloor(x * ifx), ifx = 1. / fx."""
    ify, ifx = 1.0 / (h / img.shape[0]), 1.0 / (w / img.shape[1])
    rows = [min(math.floor(y * ify), img.shape[0] - 1) for y in range(h)]
    cols = [min(math.floor(x * ifx), img.shape[1] - 1) for x in range(w)]
    return img[rows][:, cols]


def _pascal_style_image(H, W, seed=0):
    """uint8 (H, W, 3): random flat 4-px blocks (sharp edges, all of 0..255, so cubic overshoots past both ends)."""
    blocks = np.random.default_rng(seed).integers(0, 256, (H // 4 + 1, W // 4 + 1, 3))
    return np.kron(blocks, np.ones((4, 4, 1)))[:H, :W].astype(np.uint8)


@pytest.mark.parametrize("hw", [(375, 500), (333, 500), (500, 375), (600, 800)])
def test_pascal_test_time_image_resize_matches_mtl_pytorch_within_one_level(hw):
    """MTL-PyTorch's test-time image: cv2.resize(float image, (512, 512), INTER_CUBIC), then astype(np.uint8) in
    ToTensor (truncation; I clip first where numpy would wrap). VOC sizes are upscaled, 600x800 is downscaled
    without antialiasing. The loader's float values match to 2e-3, its 8-bit levels within 1 (issue: within 2)."""
    img = _pascal_style_image(*hw)
    x = torch.from_numpy(img).permute(2, 0, 1).float()
    ours = cv2_resize(x, (512, 512), "cubic").permute(1, 2, 0).numpy()
    ref = _cv2_cubic(img.astype(np.float32), 512, 512)
    np.testing.assert_allclose(ours, ref, atol=1e-3)
    # torch's own bicubic (a = -0.75, half-pixel centres, replicated border) agrees: an independent kernel
    torch_bicubic = F.interpolate(x[None], (512, 512), mode="bicubic", align_corners=False)[0].permute(1, 2, 0)
    np.testing.assert_allclose(torch_bicubic.numpy(), ref, atol=2e-3)
    assert ref.min() < -1 and ref.max() > 256  # overshoot past both ends: the clipping is exercised
    # 8-bit: a float rounding can only move a value that is an integer in exact arithmetic across the truncation
    levels = np.abs(np.floor(np.clip(ours, 0, 255)) - np.clip(ref, 0, 255).astype(np.uint8))
    assert levels.max() <= 1 and levels.mean() < 0.02


def test_pascal_label_and_prediction_resizes_match_cv2():
    """Labels: INTER_NEAREST (dtype kept, cv2's float64 source index); predictions back to native size:
    INTER_LINEAR (INTER_AREA for an exact 2x shrink, as cv2 switches)."""
    labels = np.random.default_rng(1).integers(0, 21, (372, 500)).astype(np.uint8)  # 372: cv2 != exact floor there
    for h, w in ((512, 512), (300, 700)):
        ours = cv2_resize(torch.from_numpy(labels)[None], (h, w), "nearest")[0]
        assert ours.dtype == torch.uint8 and (ours.numpy() == _cv2_nearest(labels, h, w)).all()
    pred = np.random.default_rng(2).random((512, 512, 3), dtype=np.float32) * 255
    for h, w in ((375, 500), (500, 333), (700, 600)):
        ours = cv2_resize(torch.from_numpy(pred).permute(2, 0, 1), (h, w), "linear").permute(1, 2, 0).numpy()
        np.testing.assert_allclose(ours, _cv2_linear(pred, h, w), atol=1e-3)
    ours = cv2_resize(torch.from_numpy(pred).permute(2, 0, 1), (256, 256), "linear").permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours, pred.reshape(256, 2, 256, 2, 3).mean((1, 3)), atol=1e-3)


def test_pascal_train_zoom_is_cv2_warp_affine_about_the_centre():
    """ScaleNRotate's zoom: dst(x) = src((x - c) / s + c) with c = (W/2, H/2), zeros outside (nearest and cubic)."""
    H, W, s = 30, 40, 1.3
    src = torch.arange(H * W, dtype=torch.float32).view(1, H, W) % 251 + 1  # no zeros inside
    out = cv2_zoom(src, s, "nearest")[0]
    rows = np.floor((np.arange(H) - H / 2) / s + H / 2 + 0.5).astype(int)  # nearest source (no exact ties here)
    cols = np.floor((np.arange(W) - W / 2) / s + W / 2 + 0.5).astype(int)
    torch.testing.assert_close(out, src[0][rows][:, cols])
    # a zoom-out pads with zeros; the cubic zoom keeps a constant constant away from the border
    small = cv2_zoom(torch.full((1, H, W), 7.0), 0.5, "cubic")[0]
    assert (small[:5] == 0).all() and (small[:, :8] == 0).all()
    torch.testing.assert_close(small[H // 2 - 3:H // 2 + 3, W // 2 - 4:W // 2 + 4], torch.full((6, 8), 7.0))


def test_pascal_seeded_augmentation_is_the_same_in_any_process(tmp_path):
    """dataset[(index, seed)] draws flip and scale from a generator seeded with seed, whatever the global RNG and
    the worker; dataset[index] keeps drawing from torch's global RNG."""
    _pascal(tmp_path, size=32)
    ds = PascalContextDataset(tmp_path, img_size=24, augment=True)

    def same(a, b):
        return torch.equal(a[0], b[0]) and a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k])
                                                                             for k in a[1])

    torch.manual_seed(0)
    first = ds[(0, 7)]
    torch.manual_seed(1)
    torch.rand(3)
    assert same(ds[(0, 7)], first)
    worker = next(iter(torch.utils.data.DataLoader(ds, batch_sampler=[[(0, 7)]], num_workers=1)))
    assert torch.equal(worker[0][0], first[0]) and torch.equal(worker[1]["semseg"][0], first[1]["semseg"])
    draws = [ds[(0, seed)] for seed in range(12)]
    distinct = {tuple(d[0].flatten().tolist()) for d in draws}
    flipped = {bool(d[0][0, 12, :12].mean() > d[0][0, 12, 12:].mean()) for d in draws}  # white half moved left
    assert len(distinct) >= 10 and flipped == {True, False}
    torch.manual_seed(3)
    a = ds[0]
    torch.manual_seed(3)
    assert same(ds[0], a) and not same(ds[0], a)  # the global stream: reproducible, and it moves on
