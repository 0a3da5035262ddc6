"""Task losses and metrics of evaluate.py on tiny hand-made tensors."""
import math

import pytest
import torch
import torch.nn.functional as F

from evaluate import (AngleMeter, EdgeMeter, IoUMeter, MeanMeter, SaliencyMeter, TaskMetrics, delta_m,
                      depth_metres_stat, depth_to_metres, official_depth_stat, task_loss)

torch.manual_seed(0)


def one_hot_logits(labels, num_classes):
    """(B, H, W) labels -> (B, C, H, W) logits whose argmax is the label (+10 / -10)."""
    return F.one_hot(labels, num_classes).permute(0, 3, 1, 2).float() * 20 - 10


def vertical_line(size, column):
    edge = torch.zeros(1, 1, size, size)
    edge[..., size // 4:3 * size // 4, column] = 1
    return edge


# --- losses

@pytest.mark.parametrize("name", ["depth_euclidean", "keypoints2d", "principal_curvature", "reshading", "normal"])
def test_loss_is_zero_for_perfect_taskonomy_prediction(name):
    target = torch.rand(2, 3, 4, 4) * 2 - 1
    assert task_loss(name, target.clone(), target).item() == pytest.approx(0, abs=1e-4)  # 1-cos has eps 1e-6


def test_l1_with_mask_ignores_masked_pixels_but_depth_scores_every_pixel():
    target = torch.zeros(1, 1, 2, 2)
    pred = torch.tensor([[[[0.5, 100.0], [0.5, 100.0]]]])
    mask = torch.tensor([[[[True, False], [True, False]]]])
    assert task_loss("edge_texture", pred, target, mask).item() == pytest.approx(0.5)
    # depth trains on missing depth too, as the official loss: the official metrics score every pixel
    assert task_loss("depth_zbuffer", pred, target, mask).item() == pytest.approx(50.25)


def test_cosine_loss_of_orthogonal_normals_is_one():
    pred = torch.tensor([1.0, 0, 0]).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    target = torch.tensor([0, 1.0, 0]).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    assert task_loss("normal", pred, target).item() == pytest.approx(1.0, abs=1e-5)


def test_class_loss_is_mse_on_logits():
    pred, target = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert task_loss("class_object", pred, target).item() == pytest.approx(1.0)


def test_saliency_balanced_bce_matches_hand_computation():
    logits = torch.zeros(1, 1, 2, 2)
    target = torch.tensor([[[[1.0, 0], [0, 0]]]])
    # w = 3/4 (fraction of negatives); every pixel costs ln 2: (3/4 ln2 + 1/4 · 3 ln2) / 4
    assert task_loss("saliency", logits, target).item() == pytest.approx(1.5 * math.log(2) / 4)


def test_edge_balanced_bce_uses_pos_weight_095():
    logits = torch.zeros(1, 1, 2, 2)
    target = torch.tensor([[[[1.0, 0], [0, 0]]]])
    assert task_loss("edge", logits, target).item() == pytest.approx((0.95 + 0.05 * 3) * math.log(2) / 4)


def test_semseg_cross_entropy_ignores_255():
    labels = torch.tensor([[[0, 1], [2, 255]]])
    logits = torch.randn(1, 3, 2, 2)
    expected = F.cross_entropy(logits.permute(0, 2, 3, 1)[labels != 255], labels[labels != 255])
    assert task_loss("semseg", logits, labels).item() == pytest.approx(expected.item(), rel=1e-5)


def test_all_ignored_human_parts_give_zero_loss_and_finite_grad():
    logits = torch.randn(2, 7, 4, 4, requires_grad=True)
    loss = task_loss("human_parts", logits, torch.full((2, 4, 4), 255))
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(logits.grad).all()


def test_pascal_normals_loss_normalises_the_prediction():
    target = F.normalize(torch.randn(2, 3, 4, 4), dim=1)
    assert task_loss("normals", 3 * target, target).item() == pytest.approx(0, abs=1e-6)


def test_unknown_task_raises_with_known_names():
    with pytest.raises(ValueError, match="semseg"):
        task_loss("depth", torch.zeros(1, 1), torch.zeros(1, 1))


# --- metrics

def test_miou_on_hand_made_confusion():
    target = torch.tensor([[[0, 0], [1, 1]]])
    pred = one_hot_logits(torch.tensor([[[0, 1], [1, 1]]]), 2)
    meter = IoUMeter()
    meter.update(pred, target)
    # class 0: TP 1, FN 1 -> 1/2; class 1: TP 2, FP 1 -> 2/3
    assert meter.compute()["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_human_parts_miou_skips_images_without_parts():
    target = torch.stack([torch.tensor([[0, 1], [1, 1]]), torch.full((2, 2), 255)])
    pred = one_hot_logits(torch.tensor([[[0, 1], [1, 1]], [[1, 1], [1, 1]]]), 2)
    meter = IoUMeter(skip_empty=True)
    meter.update(pred, target)
    assert meter.compute()["miou"] == 1.0


def test_miou_of_a_set_with_nothing_to_score_is_nan_not_an_error():
    """human_parts on evaluation images without any person: every image is skipped, and the mIoU is undefined."""
    assert math.isnan(IoUMeter(skip_empty=True).compute()["miou"])


def test_depth_rmse_in_metres_on_known_pair():
    metres = torch.tensor([1.0, 2.0]).view(1, 1, 1, 2)
    encode = lambda d: torch.log1p(512 * d) / math.log(2 ** 16)
    meter = MeanMeter("rmse_m", depth_metres_stat, root=True)
    meter.update(encode(metres + torch.tensor([0.3, -0.4]).view(1, 1, 1, 2)), encode(metres))
    assert meter.compute()["rmse_m"] == pytest.approx(math.sqrt((0.3 ** 2 + 0.4 ** 2) / 2), rel=1e-4)


def test_depth_decoding_inverts_the_encoding():
    assert depth_to_metres(torch.tensor(math.log1p(512 * 3.0) / math.log(2 ** 16))).item() == pytest.approx(3.0)


def test_official_depth_rmse_is_zero_for_perfect_prediction():
    target = torch.rand(2, 1, 4, 4)
    meter = MeanMeter("rmse_remap", official_depth_stat)
    meter.update(target.clone(), target)
    assert meter.compute()["rmse_remap"] == pytest.approx(0, abs=1e-4)


def test_angle_error_of_orthogonal_normals_is_90_degrees():
    pred = torch.tensor([1.0, 0, 0]).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    target = torch.tensor([0, 0, 1.0]).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    meter = AngleMeter()
    meter.update(pred, target)
    result = meter.compute()
    assert result["mean_angle_deg"] == pytest.approx(90, abs=1e-3)
    assert result["median_angle_deg"] == pytest.approx(90, abs=0.01)


def test_angle_error_skips_invalid_pixels():
    target = torch.tensor([0, 0, 1.0]).view(1, 3, 1, 1).repeat(1, 1, 2, 2)
    pred = target.clone()
    pred[..., 0, 0] = torch.tensor([1.0, 0, 0])
    mask = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    mask[..., 0, 0] = False
    meter = AngleMeter()
    meter.update(pred, target, mask)
    assert meter.compute()["mean_angle_deg"] == pytest.approx(0, abs=1e-2)


def test_odsf_is_one_for_perfect_edges():
    edge = vertical_line(64, 20)
    meter = EdgeMeter()
    meter.update(edge * 20 - 10, edge)
    assert meter.compute()["odsF"] == pytest.approx(1.0)


def test_odsf_below_one_for_shift_beyond_tolerance():
    # 64 px: tolerance 0.0075 * 90.5 = 0.68 px, so a 2-px shift misses every label pixel
    meter = EdgeMeter()
    meter.update(vertical_line(64, 22) * 20 - 10, vertical_line(64, 20))
    assert meter.compute()["odsF"] < 1.0


def test_odsf_is_one_for_shift_within_tolerance():
    # 384 px: tolerance 0.0075 * 543 = 4.07 px > 2 px
    meter = EdgeMeter()
    meter.update(vertical_line(384, 102) * 20 - 10, vertical_line(384, 100))
    assert meter.compute()["odsF"] == pytest.approx(1.0)


def test_saliency_maxf_and_miou_are_one_for_perfect_prediction():
    target = (torch.rand(2, 1, 8, 8) > 0.5).float()
    meter = SaliencyMeter()
    meter.update(target * 20 - 10, target)
    result = meter.compute()
    assert result["maxF"] == pytest.approx(1.0) and result["miou"] == pytest.approx(1.0)


def test_delta_m_is_positive_when_lower_is_better_metric_improves():
    assert delta_m({"normals": 15.0}, {"normals": 20.0}, {"normals": "↓"}) == pytest.approx(25.0)


def test_delta_m_is_negative_when_higher_is_better_metric_drops():
    assert delta_m({"semseg": 0.6, "edge": 0.7}, {"semseg": 0.6, "edge": 0.8}, {"semseg": "↑", "edge": "↑"}) \
        == pytest.approx(-6.25)


@pytest.mark.parametrize("name, make_target", [
    ("semseg", lambda: torch.randint(0, 4, (4, 8, 8))),
    ("human_parts", lambda: torch.where(torch.rand(4, 8, 8) > 0.3, torch.randint(0, 4, (4, 8, 8)), 255)),
    ("saliency", lambda: (torch.rand(4, 1, 8, 8) > 0.5).float()),
    ("edge", lambda: (torch.rand(4, 1, 64, 64) > 0.9).float()),
    ("normals", lambda: F.normalize(torch.randn(4, 3, 8, 8), dim=1)),
    ("normal", lambda: torch.rand(4, 3, 8, 8) * 2 - 1),
    ("class_scene", lambda: torch.softmax(torch.randn(4, 5), 1)),
    ("depth_zbuffer", lambda: torch.rand(4, 1, 8, 8)),
    ("keypoints3d", lambda: torch.rand(4, 1, 8, 8)),
])
def test_two_batches_accumulate_to_one_big_batch(name, make_target):
    target = make_target()
    channels = {"semseg": 4, "human_parts": 4, "normals": 3, "normal": 3, "class_scene": 5}.get(name, 1)
    pred = torch.randn(target.shape[0], channels, *target.shape[-2:]) if target.dim() > 2 else torch.randn(4, 5)
    halves, whole = TaskMetrics(), TaskMetrics()
    for i in (slice(0, 2), slice(2, 4)):
        halves.update(name, pred[i], target[i])
    whole.update(name, pred, target)
    split, joint = halves.compute()[name], whole.compute()[name]
    split.pop("loss"), joint.pop("loss")  # the loss is a per-batch average, like the official logs
    assert split == pytest.approx(joint, rel=1e-5)
