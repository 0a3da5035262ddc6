"""Properties of the embedded synthetic multi-task scene set (data.py): determinism, disjoint splits, target formats
and physical sanity. Everything renders at 32 px, so the file runs in a few seconds."""
import numpy as np
import pytest
import torch

import data

TASKONOMY = data.SyntheticScenes("train", 64, "taskonomy")
PASCAL = data.SyntheticScenes("train", 64, "pascal")

# name -> (shape, dtype, min, max) at 32 px, from the contract's conventions
CURVATURE_LO, CURVATURE_HI = (0 - 123.572) / 31.922, (255 - 120.1) / 21.658
TASKONOMY_FORMATS = {
    "class_object": ((6,), torch.float32, 0, 1), "class_scene": ((4,), torch.float32, 0, 1),
    "depth_euclidean": ((1, 32, 32), torch.float32, 0, 1), "depth_zbuffer": ((1, 32, 32), torch.float32, 0, 1),
    "edge_occlusion": ((1, 32, 32), torch.float32, -1, 2 * 8 * 512 / 409.6 - 1),
    "edge_texture": ((1, 32, 32), torch.float32, -1, 1), "keypoints2d": ((1, 32, 32), torch.float32, -1, 1),
    "keypoints3d": ((1, 32, 32), torch.float32, -1, 1), "normal": ((3, 32, 32), torch.float32, -1, 1),
    "principal_curvature": ((2, 32, 32), torch.float32, CURVATURE_LO, CURVATURE_HI),
    "reshading": ((3, 32, 32), torch.float32, -1, 1), "segment_unsup2d": ((1, 32, 32), torch.float32, -1, 1),
    "segment_unsup25d": ((1, 32, 32), torch.float32, -1, 1),
    "depth_euclidean_mask": ((1, 32, 32), torch.bool, 0, 1), "depth_zbuffer_mask": ((1, 32, 32), torch.bool, 0, 1),
    "normal_mask": ((1, 32, 32), torch.bool, 0, 1),
}
PASCAL_FORMATS = {
    "semseg": ((32, 32), torch.int64, 0, 6), "human_parts": ((32, 32), torch.int64, 0, 255),
    "saliency": ((1, 32, 32), torch.float32, 0, 1), "normals": ((3, 32, 32), torch.float32, -1, 1),
    "normals_mask": ((1, 32, 32), torch.bool, 0, 1), "edge": ((1, 32, 32), torch.float32, 0, 1),
}


def decode_depth(encoded):
    """Invert the log encoding log(1 + 512 m) / log(2^16): metres."""
    return torch.expm1(encoded.double() * np.log(2 ** 16)) / 512


def test_same_index_gives_identical_sample_and_different_index_a_different_one():
    """Sample i is a pure function of (seed, split, i)."""
    image_a, targets_a = TASKONOMY[5]
    image_b, targets_b = data.SyntheticScenes("train", 64, "taskonomy")[5]
    assert torch.equal(image_a, image_b)
    assert all(torch.equal(targets_a[k], targets_b[k]) for k in targets_a)
    assert not torch.equal(image_a, TASKONOMY[6][0])
    assert not torch.equal(image_a, data.SyntheticScenes("train", 64, "taskonomy", seed=1)[5][0])


def test_train_and_val_scenes_are_disjoint():
    """train / val draw from different random streams: no scene of the first 200 of each is shared."""
    train = data.SyntheticScenes("train", 200)
    val = data.SyntheticScenes("val", 200)
    params = lambda s: (s.layout, s.yaw, s.pitch, s.fov, s.camera[1], s.ambient, len(s.objects))  # noqa: E731
    train_scenes = {params(train.scene(i)) for i in range(200)}
    val_scenes = {params(val.scene(i)) for i in range(200)}
    assert len(train_scenes) == 200 and len(val_scenes) == 200
    assert not train_scenes & val_scenes


@pytest.mark.parametrize("ds, formats", [(TASKONOMY, TASKONOMY_FORMATS), (PASCAL, PASCAL_FORMATS)],
                         ids=["taskonomy", "pascal"])
def test_targets_have_the_contract_shapes_dtypes_and_ranges(ds, formats):
    """Every target (and mask) has the documented shape, dtype and value range; the image is (3, H, W) in [-1, 1]."""
    for i in range(8):
        image, targets = ds[i]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert -1 <= image.min() and image.max() <= 1
        assert set(targets) == set(formats)
        for name, (shape, dtype, lo, hi) in formats.items():
            y = targets[name]
            assert y.shape == shape and y.dtype == dtype, name
            assert lo - 1e-5 <= y.min() and y.max() <= hi + 1e-5, name


def test_no_nan_inf_or_out_of_range_targets_over_many_scenes():
    """100 scenes (both task sets): finite values, within the documented ranges, segmentation labels valid."""
    taskonomy = data.SyntheticScenes("test", 100, "taskonomy")
    pascal = data.SyntheticScenes("test", 100, "pascal")
    for i in range(100):
        for ds, formats in ((taskonomy, TASKONOMY_FORMATS), (pascal, PASCAL_FORMATS)):
            image, targets = ds[i]
            assert torch.isfinite(image).all()
            for name, (_, _, lo, hi) in formats.items():
                y = targets[name]
                assert torch.isfinite(y.float()).all() and lo - 1e-5 <= y.min() and y.max() <= hi + 1e-5, (i, name)
        parts = targets["human_parts"]
        assert (parts == 255).all() or parts.max() <= 6


def test_euclidean_depth_is_never_smaller_than_zbuffer_depth():
    """The distance along the ray is at least its forward component: depth_euclidean >= depth_zbuffer (metres)."""
    for i in range(10):
        _, targets = TASKONOMY[i]
        valid = targets["depth_euclidean_mask"] & targets["depth_zbuffer_mask"]
        euclidean, zbuffer = decode_depth(targets["depth_euclidean"]), decode_depth(targets["depth_zbuffer"])
        assert valid.any()
        assert (euclidean[valid] >= zbuffer[valid] - 1e-9).all()
        # and off the image centre the two really differ
        assert (euclidean[valid] > zbuffer[valid] + 0.01).any()


def test_sky_is_invalid_depth_encoded_as_missing():
    """Sky pixels are masked and carry the value of a raw 65535 depth: log(65536) / log(2^16) = 1."""
    for i in range(len(TASKONOMY)):
        _, targets = TASKONOMY[i]
        invalid = ~targets["depth_euclidean_mask"]
        if invalid.any():
            assert torch.allclose(targets["depth_euclidean"][invalid], torch.tensor(1.0))
            assert not targets["normal_mask"][invalid].any()
            return
    pytest.fail("no scene with sky among the first 64")


def test_normals_are_unit_vectors_on_valid_pixels():
    """PASCAL normals are unit length where valid and zero on the sky; Taskonomy 8-bit normals nearly unit."""
    for i in range(10):
        _, targets = PASCAL[i]
        n, valid = targets["normals"], targets["normals_mask"][0]
        assert torch.allclose(n.norm(dim=0)[valid], torch.ones(int(valid.sum())), atol=1e-5)
        assert (n[:, ~valid] == 0).all()
        _, targets = TASKONOMY[i]
        n, valid = targets["normal"], targets["normal_mask"][0]
        assert ((n.norm(dim=0)[valid] - 1).abs() < 0.02).all()


def test_normals_face_the_camera():
    """Camera-frame normals (x right, y down, z forward) of visible surfaces point back towards the camera."""
    scene = TASKONOMY.scene(3)
    buf = data.render_scene(scene, 32)
    rays = data.pixel_rays(scene, 32) @ data.camera_axes(scene)  # (H*W, 3) in the camera frame
    valid = buf["surface"].ravel() >= 0
    assert ((buf["normal"].reshape(-1, 3)[valid] * rays[valid]).sum(1) < 1e-9).all()


def box_corners(box, y):
    """The 4 world corners of a box at local height y = -1 (bottom) or +1 (top); a box of yaw a has its local x axis
    along (cos a, 0, -sin a) and its z axis along (sin a, 0, cos a)."""
    c, s = np.cos(box.yaw), np.sin(box.yaw)
    local = np.array([[x, y, z] for x in (-1, 1) for z in (-1, 1)]) * box.size
    return box.center + local @ np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]])


def crate_scene(yaw=0.2):
    """A scene with one crate 3.5 m ahead (and right of the image diagonal) of a camera that looks down at it."""
    scene = data.sample_scene(np.random.default_rng(0))
    crate, _ = data.make_object(data.SYNTHETIC_OBJECT_CATEGORIES.index("crate"), np.random.default_rng(1))
    crate.primitives[0].center = crate.primitives[0].center + [0.8, 0.0, 3.5]
    crate.primitives[0].yaw = yaw
    scene.objects, scene.camera, scene.yaw, scene.pitch = [crate], np.array([0.0, 1.6, 0.0]), 0.0, -0.4
    return scene, crate.primitives[0]


def test_keypoints3d_peak_at_a_visible_box_vertex():
    """The 3D keypoint response at the projection of the box's top vertex nearest the camera (visible from above)
    clearly exceeds the image median."""
    scene, box = crate_scene()
    buf = data.render_scene(scene, 32)
    y = data.TASKONOMY_TARGETS["keypoints3d"](buf, scene)[0][0]
    corners = box_corners(box, 1)
    nearest = corners[np.argmin(np.linalg.norm(corners - scene.camera, axis=1))]
    (col, row), = data.project(scene, nearest[None], 32)[0]
    assert y[int(round(row)), int(round(col))] > np.median(y) + 0.5


def test_keypoints3d_ignore_a_hidden_box_vertex():
    """The bottom vertex farthest from the camera is hidden by the box itself: no peak there (at 64 px)."""
    scene, box = crate_scene()
    buf = data.render_scene(scene, 64)
    y = data.TASKONOMY_TARGETS["keypoints3d"](buf, scene)[0][0]
    corners = box_corners(box, -1)
    farthest = corners[np.argmax(np.linalg.norm(corners - scene.camera, axis=1))]
    (col, row), = data.project(scene, farthest[None], 64)[0]
    # precondition: every other vertex projects > 4 blob widths (sigma = 1.6 px) away, so no visible blob reaches it
    others = data.project(scene, np.concatenate([box_corners(box, -1), box_corners(box, 1)]), 64)[0]
    assert np.sort(np.hypot(*(others - [col, row]).T))[1] > 4 * 1.6
    assert y[int(round(row)), int(round(col))] < np.median(y) + 0.1


def test_class_object_is_a_distribution_over_visible_categories():
    """class_object sums to 1 and puts mass exactly on the categories visible in semseg."""
    taskonomy = data.SyntheticScenes("train", 20, "taskonomy", tasks=["class_object"])
    pascal = data.SyntheticScenes("train", 20, "pascal", tasks=["semseg"])
    for i in range(20):
        p = taskonomy[i][1]["class_object"]
        assert torch.isclose(p.sum(), torch.tensor(1.0))
        visible = torch.bincount(pascal[i][1]["semseg"].flatten(), minlength=7)[1:] > 0  # semseg 0 = background
        assert torch.equal(p > 0, visible)


def test_human_parts_all_ignore_exactly_when_no_figure_is_visible():
    """Like PASCAL images without a person, an image without a visible figure is all 255; otherwise parts 0..6."""
    seen = set()
    for i in range(40):
        targets = PASCAL[i][1]
        figure_visible = bool((targets["semseg"] == 1 + data.SYNTHETIC_OBJECT_CATEGORIES.index("figure")).any())
        parts = targets["human_parts"]
        assert bool((parts == 255).all()) == (not figure_visible)
        if figure_visible:
            assert parts.max() <= 6 and (parts > 0).any()
        seen.add(figure_visible)
    assert seen == {True, False}


def test_every_task_varies_across_scenes_and_pixels():
    """No target is constant: each varies across 16 scenes, and each dense one varies within some image."""
    for ds in (TASKONOMY, PASCAL):
        batch = torch.utils.data.default_collate([ds[i] for i in range(16)])[1]
        for name, _, kind in ds.tasks:
            y = batch[name].float()
            assert y.std(0).max() > 0, name
            if kind == "dense":
                assert y.flatten(1).std(1).max() > 0, name


def test_cache_renders_each_scene_once_and_returns_the_same_sample(monkeypatch):
    """cache=True: a second read of a sample renders nothing and gives exactly the uncached sample."""
    cached = data.SyntheticScenes("train", 8, cache=True)
    first = cached[3]
    renders = []
    real_render = data.render_scene
    monkeypatch.setattr(data, "render_scene", lambda *a, **k: renders.append(1) or real_render(*a, **k))
    again, fresh = cached[3], TASKONOMY[3]
    assert len(renders) == 1  # only the uncached dataset rendered
    for image, targets in (again, fresh):
        assert torch.equal(image, first[0]) and targets.keys() == first[1].keys()
        assert all(torch.equal(targets[k], first[1][k]) for k in targets)


def test_scene_cache_folder_shares_the_rendered_split_between_datasets(tmp_path, monkeypatch):
    """cache_dir: the first dataset renders the split (every task) into one file; a later one with a subset of the
    tasks, as another run of the same seed, renders nothing and gives exactly the rendered samples of its tasks."""
    first = data.SyntheticScenes("train", 8, cache_dir=str(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == ["taskonomy_train_seed0_8x32px.pt"]  # no temporary file left
    renders = []
    real_render = data.render_scene
    monkeypatch.setattr(data, "render_scene", lambda *a, **k: renders.append(1) or real_render(*a, **k))
    single = data.SyntheticScenes("train", 8, tasks=["normal"], cache_dir=str(tmp_path))
    assert renders == []
    for i in (0, 7):
        image, targets = single[i]
        assert torch.equal(image, TASKONOMY[i][0]) and torch.equal(first[i][0], image)
        assert targets.keys() == {"normal", "normal_mask"}
        assert all(torch.equal(targets[k], TASKONOMY[i][1][k]) for k in targets)
    # another seed, length or size is another file
    data.SyntheticScenes("train", 4, seed=1, cache_dir=str(tmp_path))
    assert len(list(tmp_path.iterdir())) == 2
    with pytest.raises(ValueError, match="scene-cache"):  # a real dataset has nothing to render
        data.build_dataset("taskonomy", "train", root=str(tmp_path), cache_dir=str(tmp_path))


def test_samples_collate_into_batches():
    """Every sample has the same keys and shapes, so torch's default collate batches them."""
    images, targets = next(iter(torch.utils.data.DataLoader(PASCAL, batch_size=8)))
    assert images.shape == (8, 3, 32, 32)
    assert targets["human_parts"].shape == (8, 32, 32) and targets["normals_mask"].shape == (8, 1, 32, 32)


def test_tasks_selects_by_name_in_the_official_order():
    """tasks= keeps only the named tasks, in the official order whatever the order asked, and only their targets
    (and masks) are returned."""
    ds = data.SyntheticScenes(tasks=["normal", "class_scene"])
    assert ds.tasks == (("class_scene", 4, "image"), ("normal", 3, "dense"))
    assert set(ds[0][1]) == {"normal", "normal_mask", "class_scene"}


def test_select_tasks_rejects_an_unknown_name_listing_the_valid_ones():
    with pytest.raises(ValueError, match="unknown task 'depth'.*valid tasks: class_object, class_scene, depth_"):
        data.select_tasks(data.SYNTHETIC_TASKONOMY_TASKS, ["normal", "depth"], "synthetic")
    with pytest.raises(ValueError, match="semseg, human_parts, saliency, normals, edge"):
        data.build_dataset("synthetic-pascal", "train", tasks=["normal"])


def test_build_dataset_names_the_task_sets():
    assert data.build_dataset("synthetic", "train").tasks == data.SYNTHETIC_TASKONOMY_TASKS
    val = data.build_dataset("synthetic-pascal", "val", img_size=48, length=3)
    assert val.tasks == data.SYNTHETIC_PASCAL_TASKS and len(val) == 3 and val[2][0].shape == (3, 48, 48)
    with pytest.raises(ValueError, match="unknown dataset"):
        data.build_dataset("imagenet", "train")


def test_renders_at_128_px():
    """Resolutions from 32 to 128 px work: shapes follow img_size and targets stay finite."""
    image, targets = data.SyntheticScenes("val", 1, img_size=128)[0]
    assert image.shape == (3, 128, 128) and targets["edge_occlusion"].shape == (1, 128, 128)
    assert all(torch.isfinite(y.float()).all() for y in targets.values())


def test_model_default_matches_the_synthetic_categories():
    """ModSquadConfig() is built for these scenes: its class heads have one output per synthetic category."""
    from modsquad import ModSquadConfig

    channels = {name: c for name, c, _ in ModSquadConfig().tasks}
    assert channels["class_object"] == len(data.SYNTHETIC_OBJECT_CATEGORIES)
    assert channels["class_scene"] == len(data.SYNTHETIC_SCENE_CATEGORIES)
    assert ModSquadConfig().tasks == data.SyntheticScenes().tasks
