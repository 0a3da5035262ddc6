"""
Evaluation for Mod-Squad: the official per-task losses, per-task metrics accumulated over a whole evaluation set,
Δm, the expert-extraction report and a few figures.

    python evaluate.py out/run                        # metrics of out/run/ckpt.pt on the val split
    python evaluate.py out/run --max-batches 20 --extract all   # + per-task extraction: params, MACs, metrics

Losses follow the official code for Taskonomy (get_loss, engine_mt.py:15-35) and MTL-PyTorch for PASCAL-Context
(losses/loss_functions.py, reused by M3ViT). Metrics per task (↑ higher is better, ↓ lower is better):
    Taskonomy, official (get_metric, engine_mt.py:37-61), so that numbers compare with the paper:
        class_object, class_scene   top1 ↑        argmax(logits) == argmax(soft target)
        depth_euclidean             rmse_remap ↓  RMSE in the code's remapped [1, 80] space, averaged per batch
        depth_zbuffer               l1 ↓          the official metric is a constant 0; the paper's number is the test L1
        normal                      l1 ↓          L1 of the raw, un-normalised output (official quirk)
        principal_curvature         mse ↓
        every other task            l1 ↓
    Taskonomy, physical: rmse_m ↓ (both depths, metres, valid pixels), mean/median_angle_deg ↓ (normal, valid pixels)
    PASCAL-Context (MTL-PyTorch protocol): semseg/human_parts miou ↑, saliency maxF ↑ and miou ↑,
        normals mean/median_angle_deg ↓, edge odsF ↑ (an approximation of SEISM, see EdgeMeter); by default at each
        image's own size, as MTL-PyTorch's final evaluation (evaluate_pascal_native); --protocol in-loop scores
        the labels resized to the network's 512² instead
Every task also reports `loss`, its task loss averaged over batches weighted by batch size, as the official logs do.

Shapes: B batch · C channels (classes) · H, W pixels · HW = H*W · T tasks · E experts.
"""

import argparse
import itertools
import json
import math
import os
from contextlib import nullcontext
from dataclasses import asdict

import matplotlib
import torch
import torch.nn.functional as F
from tqdm import tqdm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

import data  # noqa: E402
from modsquad import ModSquad, ModSquadConfig, count_params_flops, expert_usage, extract  # noqa: E402

TASKONOMY_TASKS = tuple(name for name, _, _ in data.TASKONOMY_TASKS)
PASCAL_TASKS = tuple(name for name, _, _ in data.PASCAL_TASKS)
PASCAL_LOSS_WEIGHTS = {"semseg": 1, "human_parts": 2, "saliency": 5, "edge": 50, "normals": 10}  # M3ViT/MTL-PyTorch
IGNORE = 255  # PASCAL label value that losses and metrics skip

# the metric each task is judged by (official for Taskonomy; M3ViT's Δm uses the saliency mIoU, not maxF)
PRIMARY_METRIC = {**{name: "l1" for name in TASKONOMY_TASKS}, "class_object": "top1", "class_scene": "top1",
                  "depth_euclidean": "rmse_remap", "principal_curvature": "mse", "semseg": "miou",
                  "human_parts": "miou", "saliency": "miou", "normals": "mean_angle_deg", "edge": "odsF"}
NOTES = {"depth_zbuffer": "official metric is 0: the paper's number is this test L1", "normal": "L1 of raw output",
         "edge": "approximate SEISM"}
HIGHER_IS_BETTER = {"top1", "miou", "maxF", "odsF"}


def direction(metric):
    return "↑" if metric in HIGHER_IS_BETTER else "↓"


# -----------------------------------------------------------------------------
# Task losses

def masked_mean(x, mask=None):
    """Mean of x (B, C, H, W) over the pixels where mask (B, 1, H, W) is True; the plain mean when mask is None."""
    if mask is None:
        return x.mean()
    m = mask.expand_as(x).float()
    # a batch without one valid pixel gives 0 (with a zero gradient), not 0/0
    return (x * m).sum() / m.sum().clamp_min(1)


def balanced_bce(logits, target, pos_weight=None):
    """MTL-PyTorch's BalancedCrossEntropyLoss (size_average=True) on logits and {0, 1} targets of the same shape."""
    labels = (target >= 0.5).float()
    # HED-style auto-balance: positives are weighted by the fraction of negative pixels in the batch
    w = (1 - labels).mean() if pos_weight is None else pos_weight
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    # L = [w Σ_pos bce + (1 - w) Σ_neg bce] / #pixels
    return (w * (labels * bce).sum() + (1 - w) * ((1 - labels) * bce).sum()) / labels.numel()


def task_loss(name, pred, target, mask=None):
    """The official loss of task `name`, a scalar float32 tensor.

    pred: (B, C, H, W) dense output (logits for semseg, human_parts, saliency, edge) or (B, C) image-level logits.
    target: in the contract's encoding (soft labels (B, C), dense float (B, C, H, W), or int64 labels (B, H, W)).
    mask: optional bool (B, 1, H, W), True = valid. The official Taskonomy losses use no mask; I use it when given,
    except for depth (see there).
    """
    pred = pred.float()
    if name in ("class_object", "class_scene"):
        # MSE between logits and the soft distribution, not cross-entropy: what engine_mt.py:17 does
        return F.mse_loss(pred, target.float())
    if name == "normal":
        # 1 - cos(pred, target) per pixel, with the eps of engine_mt.py:25
        cos = (pred * target).sum(1, keepdim=True) / (pred.norm(dim=1, keepdim=True) + 1e-6) \
            / (target.norm(dim=1, keepdim=True) + 1e-6)
        return masked_mean(1 - cos, mask)
    if name == "principal_curvature":
        return masked_mean((pred - target.float()) ** 2, mask)
    if name in ("depth_euclidean", "depth_zbuffer"):
        # every pixel, missing depth (target 1.0) included, as the official loss: the official metrics score every
        # pixel, and a model never trained on the sky loses most of its depth metric there (the mask is kept for
        # the metres metric)
        return (pred - target.float()).abs().mean()
    if name in TASKONOMY_TASKS:
        return masked_mean((pred - target.float()).abs(), mask)
    if name in ("semseg", "human_parts"):
        target = target.long()
        # mean cross-entropy over non-ignored pixels; an all-255 batch (no person in any image) gives 0, not NaN
        ce = F.cross_entropy(pred, target, ignore_index=IGNORE, reduction="sum")
        return ce / (target != IGNORE).sum().clamp_min(1)
    if name == "saliency":
        return balanced_bce(pred, target)
    if name == "edge":
        return balanced_bce(pred, target, pos_weight=0.95)
    if name == "normals":
        valid = target.norm(dim=1, keepdim=True) > 0 if mask is None else mask
        # L1 between the L2-normalised prediction and the unit target (NormalsLoss(normalize=True))
        unit = pred / (pred.norm(dim=1, keepdim=True) + 1e-12)
        return masked_mean((unit - target).abs(), valid)
    raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKONOMY_TASKS + PASCAL_TASKS)}")


# -----------------------------------------------------------------------------
# Metrics. Each meter sums additive statistics over batches, so metrics are computed over the whole evaluation
# set (one confusion matrix, one pixel count, ...), not averaged per batch, unless a meter says otherwise.

class Meter:
    def __init__(self):
        self.sums = {}

    def add(self, **stats):
        for k, v in stats.items():
            self.sums[k] = self.sums.get(k, 0) + v


class MeanMeter(Meter):
    """A metric Σ values / Σ counts; stat(pred, target, mask) -> (sum, count) of one batch. root: report the sqrt."""
    def __init__(self, key, stat, root=False):
        super().__init__()
        self.key, self.stat, self.root = key, stat, root

    def update(self, pred, target, mask=None):
        total, n = self.stat(pred.float(), target, mask)
        self.add(total=total, n=n)

    def compute(self):
        mean = float(self.sums["total"] / self.sums["n"])
        return {self.key: math.sqrt(mean) if self.root else mean}


def loss_stat(name):
    """The task loss per batch, weighted by batch size, as the official test loss (MetricLogger, engine_mt.py)."""
    return lambda pred, target, mask: (task_loss(name, pred, target, mask) * len(pred), len(pred))


def error_stat(p):
    """|pred - target|^p over all pixels and channels, with no mask, as the official L1 / MSE metrics."""
    return lambda pred, target, mask: (((pred - target.float()).abs() ** p).sum(), target.numel())


def top1_stat(pred, target, mask):
    return (pred.argmax(1) == target.argmax(1)).sum(), len(pred)


def depth_to_metres(v):
    """Taskonomy depth target v = log(1 + 512 d)/log(2^16) back to metres d."""
    # d = (exp(v ln 2^16) - 1) / 512
    return (torch.exp(v * math.log(2 ** 16)) - 1) / 512


def depth_metres_stat(pred, target, mask):
    """Squared depth error in metres on valid pixels; the prediction is clamped to the encoding's range [0, 1]."""
    valid = torch.ones_like(target, dtype=torch.bool) if mask is None else mask
    err = depth_to_metres(pred.clamp(0, 1)) - depth_to_metres(target.float())
    return (err ** 2)[valid].sum(), valid.sum()


def official_depth_remap(v):
    # d = exp(v ln 2^16) - 1;  d = ln(d)/11.09;  d = (d - 0.64)/0.18;  d = (d + 1)/2 * 80, clamped to [1, 80]
    d = torch.exp(v * math.log(2 ** 16)) - 1
    d = (torch.log(d) / 11.09 - 0.64) / 0.18
    return ((d + 1) / 2 * 80).clamp(1, 80)


def official_depth_stat(pred, target, mask):
    """The official depth_euclidean metric (util/metric.py): RMSE of the remapped depth over all pixels (its `gt > 0`
    mask is always true after the clamp), per batch. I keep its mean of per-batch RMSEs weighted by batch size."""
    err = official_depth_remap(pred.clamp_min(0)) - official_depth_remap(target.float())
    return err.pow(2).mean().sqrt() * len(pred), len(pred)


class AngleMeter(Meter):
    """Angle between predicted and target normals in degrees, pixel-wise over the valid pixels of the whole set.

    Both vectors are L2-normalised first (eval_normals.py). The median comes from a 0.01° histogram.
    """
    bins = 18000

    def update(self, pred, target, mask=None):
        valid = target.norm(dim=1, keepdim=True) > 0
        valid = valid if mask is None else valid & mask
        cos = (F.normalize(pred.float(), dim=1) * F.normalize(target.float(), dim=1)).sum(1, keepdim=True)
        deg = torch.rad2deg(torch.acos(cos.clamp(-1, 1)))[valid]
        self.add(total=deg.sum(), n=deg.numel(), hist=torch.histc(deg, bins=self.bins, min=0, max=180))

    def compute(self):
        n = self.sums["n"]
        median_bin = int((self.sums["hist"].cumsum(0) < n / 2).sum())
        return {"mean_angle_deg": float(self.sums["total"] / n),
                "median_angle_deg": (median_bin + 0.5) * 180 / self.bins if n else math.nan}


class IoUMeter(Meter):
    """mIoU from one confusion matrix accumulated over the whole set, ignoring label 255.

    skip_empty (human_parts): skip images whose labels are all 255 or all 0, as eval_human_parts.py does.
    The official code counts a class that appears neither in labels nor predictions as IoU 0; I leave it out
    of the mean instead (the same thing on the full val set, where every class appears).
    """
    def __init__(self, skip_empty=False):
        super().__init__()
        self.skip_empty = skip_empty

    def update(self, pred, target, mask=None):
        self.update_labels(pred.argmax(1), target, pred.shape[1])

    def update_labels(self, labels, target, num_classes):
        """labels: (B, H, W) predicted class ids; target: (B, H, W) labels, 255 = ignore."""
        C, target = num_classes, target.long()
        if self.skip_empty:
            flat = target.flatten(1)
            uniform = (flat == flat[:, :1]).all(1) & ((flat[:, 0] == IGNORE) | (flat[:, 0] == 0))
            labels, target = labels[~uniform], target[~uniform]
        valid = target != IGNORE
        # confusion[i, j] = number of pixels with label i predicted as j
        confusion = torch.bincount(target[valid] * C + labels[valid], minlength=C * C).reshape(C, C)
        self.add(confusion=confusion)

    def compute(self):
        if "confusion" not in self.sums:  # nothing scored, e.g. human_parts on images without a person
            return {"miou": math.nan}
        confusion = self.sums["confusion"].double()
        tp = confusion.diag()
        # IoU_c = TP / (TP + FP + FN)
        union = confusion.sum(0) + confusion.sum(1) - tp
        return {"miou": float((tp[union > 0] / union[union > 0]).mean())}


class SaliencyMeter(Meter):
    """maxF and mIoU of saliency as MTL-PyTorch's eval_sal.py: 15 thresholds in [0.2, 0.9] on sigmoid(logits);
    precision, recall and IoU per image, averaged over images, then the best threshold."""
    thresholds = torch.linspace(0.2, 0.9, 15, dtype=torch.float64).float()  # np.linspace's values, compared in float32

    def update(self, pred, target, mask=None):
        self.update_probs(torch.sigmoid(pred.float()), target)

    def update_probs(self, prob, target):
        """prob: (B, 1, H, W) saliency probabilities; target: (B, 1, H, W) {0, 1}."""
        prob = prob.flatten(1)[:, None]  # (B, 1, HW)
        gt = (target >= 0.5).flatten(1)[:, None]
        binary = prob > self.thresholds.to(prob)[None, :, None]  # (B, 15, HW)
        tp, fp, fn = (binary & gt).sum(2), (binary & ~gt).sum(2), (~binary & gt).sum(2)  # (B, 15)
        # an image with an empty label and an empty prediction has IoU 1 (jaccard.py)
        iou = torch.where(tp + fp + fn > 0, tp / (tp + fp + fn).clamp_min(1), 1.0)
        self.add(precision=(tp / (tp + fp + 1e-12)).sum(0), recall=(tp / (tp + fn + 1e-12)).sum(0),
                 iou=iou.sum(0), n=len(prob))

    def compute(self):
        n = self.sums["n"]
        p, r = self.sums["precision"] / n, self.sums["recall"] / n
        # F_β = (1 + β²) P R / (β² P + R) with β² = 1, on the image-averaged P and R
        f = 2 * p * r / (p + r + 1e-12)
        return {"maxF": float(f.max()), "miou": float((self.sums["iou"] / n).max())}


def disk_max(x, radius):
    """Max of x (B, 1, H, W) over a disk of `radius` pixels around every pixel: a binary dilation for 0/1 maps."""
    H, W = x.shape[-2:]
    r = int(radius)
    padded = F.pad(x, (r, r, r, r))  # zero padding is neutral because x >= 0
    out = x
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if dy * dy + dx * dx <= radius * radius:
                out = torch.maximum(out, padded[..., r + dy:r + dy + H, r + dx:r + dx + W])
    return out


class EdgeMeter(Meter):
    """Edge odsF, a pure-torch approximation of SEISM's boundary F-measure (PASCAL-Context, maxDist 0.0075).

    For each of the thresholds 0.01..0.99 on sigmoid(logits), a predicted edge pixel is correct when a label edge
    pixel lies within max_dist × image diagonal, and a label edge pixel is recalled when a predicted one lies within
    that distance. Counts are summed over the whole set per threshold, and ODS is the F at the best single threshold.
    Unlike SEISM there is no one-to-one (bipartite) matching and no thinning of the predictions, so a thick
    prediction along a label edge counts as all correct: the result is an approximation and typically optimistic.
    It is measured at the resolution it is given: the network's in the in-loop evaluation, each image's own in
    evaluate_pascal_native (as SEISM).
    """
    thresholds = torch.linspace(0.01, 0.99, 99)

    def __init__(self, max_dist=0.0075):
        super().__init__()
        self.max_dist = max_dist

    @staticmethod
    def count_at_least(values, thresholds):
        """counts[j] = #(values >= thresholds[j]) for ascending thresholds, in one pass."""
        idx = torch.bucketize(values.flatten(), thresholds, right=True)  # number of thresholds <= value
        counts = torch.bincount(idx, minlength=len(thresholds) + 1)
        return counts.flip(0).cumsum(0).flip(0)[1:]

    def update(self, pred, target, mask=None):
        self.update_probs(torch.sigmoid(pred.float()), target)

    def update_probs(self, prob, target):
        """prob: (B, 1, H, W) edge probabilities; target: (B, 1, H, W) {0, 1} label edges."""
        H, W = prob.shape[-2:]
        radius = self.max_dist * math.hypot(H, W)
        gt = (target >= 0.5).to(prob.dtype)
        thr = self.thresholds.to(prob)
        near_gt = disk_max(gt, radius) > 0  # pixels within the tolerance of a label edge
        best_near = disk_max(prob, radius)  # a label pixel is recalled at threshold t iff best_near >= t
        self.add(matched_pred=self.count_at_least(prob[near_gt], thr), total_pred=self.count_at_least(prob, thr),
                 matched_gt=self.count_at_least(best_near[gt > 0], thr), total_gt=gt.sum())

    def compute(self):
        s = self.sums
        precision = s["matched_pred"] / s["total_pred"].clamp_min(1)
        recall = s["matched_gt"] / max(float(s["total_gt"]), 1.0)
        f = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
        return {"odsF": float(f.max())}


def task_meters(name):
    """The meters of one task: its loss first, then its official and physical metrics."""
    l1, rmse_m = MeanMeter("l1", error_stat(1)), MeanMeter("rmse_m", depth_metres_stat, root=True)
    extra = {"class_object": [MeanMeter("top1", top1_stat)], "class_scene": [MeanMeter("top1", top1_stat)],
             "depth_euclidean": [MeanMeter("rmse_remap", official_depth_stat), rmse_m],
             "depth_zbuffer": [l1, rmse_m], "normal": [l1, AngleMeter()],
             "principal_curvature": [MeanMeter("mse", error_stat(2))],
             "semseg": [IoUMeter()], "human_parts": [IoUMeter(skip_empty=True)], "saliency": [SaliencyMeter()],
             "normals": [AngleMeter()], "edge": [EdgeMeter()]}
    return [MeanMeter("loss", loss_stat(name))] + extra.get(name, [l1] if name in TASKONOMY_TASKS else [])


class TaskMetrics:
    """All metrics of several tasks: update(name, pred, target, mask) per batch; compute() -> {task: {metric: v}}."""
    def __init__(self):
        self.meters = {}

    def update(self, name, pred, target, mask=None):
        if name not in self.meters:
            self.meters[name] = task_meters(name)
        for meter in self.meters[name]:
            meter.update(pred.detach(), target, mask)

    def compute(self):
        return {name: {k: v for meter in meters for k, v in meter.compute().items()}
                for name, meters in self.meters.items()}


def delta_m(results, single_task_results, directions):
    """Δm in percent (M3ViT's calculate_multi_task_performance): the mean relative gain over single-task models.

    results, single_task_results: {task: value of its metric}; directions: {task: "↑" or "↓"}.
    """
    # Δm = (1/T) Σ_t (-1)^{l_t} (M_t - M_st,t) / M_st,t × 100,   l_t = 1 when lower is better
    gains = [(-1 if directions[t] == "↓" else 1) * (results[t] - single_task_results[t]) / single_task_results[t]
             for t in results]
    return 100 * sum(gains) / len(gains)


# -----------------------------------------------------------------------------
# Evaluating a model

@torch.no_grad()
def evaluate_model(model, loader, device, tasks=None, max_batches=None):
    """Run the tasks (names, default all of model.cfg.tasks) over loader's (images, targets) batches, all tasks in
    one model call per batch. Returns {task: {metric: value}}, each with the task's mean `loss`."""
    names = [name for name, _, _ in model.cfg.tasks]
    tasks = names if tasks is None else list(tasks)
    was_training = model.training
    model.eval()
    metrics = TaskMetrics()
    batches = itertools.islice(loader, max_batches)
    total = len(loader) if max_batches is None else min(max_batches, len(loader))
    for images, targets in tqdm(batches, total=total, desc="evaluate", leave=False):
        images = images.to(device)
        preds, _ = model(images, [names.index(name) for name in tasks])
        for name, pred in zip(tasks, preds):
            mask = targets.get(f"{name}_mask")
            metrics.update(name, pred, targets[name].to(device), None if mask is None else mask.to(device))
    model.train(was_training)
    return metrics.compute()


class CountingUsage(torch.nn.Module):
    """A model, unchanged, that also counts the experts each task's tokens choose in the passes made through it: the
    usage modsquad.expert_usage measures, from an evaluation pass itself instead of one more pass per task.
    usage(name) -> per MoE layer, (E,) fractions of the task's tokens choosing each expert (each sums to K)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.cfg = model, model.cfg
        self.counts, self.tokens = {}, {}

    def forward(self, images, task):
        preds, routings = self.model(images, task)
        for t, layers in [(task, routings)] if isinstance(task, int) else zip(task, routings):
            name = self.cfg.tasks[t][0]
            counts = self.counts.setdefault(name, [torch.zeros(m.num_experts, device=images.device)
                                                   for m in self.model.moe_layers])
            for c, r in zip(counts, layers):
                idx = r.topk_idx.flatten()  # (B*N*K,)
                c.index_add_(0, idx, torch.ones_like(idx, dtype=c.dtype))  # bincount, without its host sync on GPU
            self.tokens[name] = self.tokens.get(name, 0) + (layers[0].topk_idx.shape[0] if layers else 0)
        return preds, routings

    def usage(self, name):
        return [c.cpu() / max(self.tokens[name], 1) for c in self.counts[name]]


# -----------------------------------------------------------------------------
# PASCAL-Context at each image's own size: MTL-PyTorch's final evaluation (evaluate_utils.py save_model_predictions,
# then evaluation/eval_*.py on the full-resolution labels), which M3ViT and its successors report. The in-loop
# evaluation above scores labels resized to the network's 512² instead (MTL-PyTorch's online evaluation).

def pascal_native_prediction(name, pred, size):
    """One image's output pred (C, h, w) at the network's resolution -> the uint8 map save_model_predictions writes
    for it as PNG, resized to the image's size (H, W) with cv2 as its INFER_FLAGVALS say: semseg, human_parts: argmax,
    then nearest -> (H, W) class ids; normals: (n / |n| + 1) * 255 / 2, bilinear -> (3, H, W); saliency, edge:
    255 sigmoid, bilinear -> (1, H, W). astype(np.uint8) truncates; bilinear keeps the values inside [0, 255]."""
    pred = pred.float()
    if name in ("semseg", "human_parts"):
        return data.cv2_resize(pred.argmax(0)[None], size, "nearest")[0].to(torch.uint8)
    x = (F.normalize(pred, dim=0) + 1) * 255 / 2 if name == "normals" else 255 * torch.sigmoid(pred)
    return data.cv2_resize(x, size, "linear").to(torch.uint8)


def native_meters(name):
    """The meters of one task in the native-size protocol: its loss (at the network's resolution), its metric."""
    edge = EdgeMeter()
    # SEISM (MATLAB) compares double(png) / 255 >= threshold, its thresholds written as '%.2f'
    edge.thresholds = torch.arange(1, 100, dtype=torch.float64) / 100
    metric = {"semseg": IoUMeter(), "human_parts": IoUMeter(skip_empty=True), "saliency": SaliencyMeter(),
              "normals": AngleMeter(), "edge": edge}
    return [MeanMeter("loss", loss_stat(name)), metric[name]]


def update_native(name, meters, png, native):
    """Score one image's saved prediction png (pascal_native_prediction) against its native labels, as eval_*.py."""
    target = native[name][None]
    if name in ("semseg", "human_parts"):  # eval_semseg / eval_human_parts: TP, FP, FN over the set, 255 ignored
        meters[1].update_labels(png[None].long(), target, {n: c for n, c, _ in data.PASCAL_TASKS}[name])
    elif name == "normals":  # eval_normals: 2 png / 255 - 1, both normalised, pixels where the label is non-zero
        meters[1].update((2 * png.float() / 255 - 1)[None], target, native["normals_mask"][None])
    elif name == "saliency":  # eval_sal: png / 255 (float32) > 15 thresholds, IoU / precision / recall per image
        meters[1].update_probs(png[None].float() / 255, target)
    elif name == "edge":
        meters[1].update_probs(png[None].double() / 255, target)


@torch.no_grad()
def evaluate_pascal_native(model, loader, device, tasks=None, max_batches=None):
    """The final PASCAL-Context evaluation at each image's own size: loader gives (images, targets, natives) batches
    (data.PascalContextDataset(native_labels=True), collate_fn=data.collate_native); every prediction is resized to
    its image's size, quantised to 8 bits as the saved PNGs are (pascal_native_prediction) and scored against the
    untouched labels. Returns {task: {metric: value}}, each with the task's mean `loss` at the network's resolution."""
    names = [name for name, _, _ in model.cfg.tasks]
    tasks = names if tasks is None else list(tasks)
    was_training = model.training
    model.eval()
    meters = {name: native_meters(name) for name in tasks}
    batches = itertools.islice(loader, max_batches)
    total = len(loader) if max_batches is None else min(max_batches, len(loader))
    for images, targets, natives in tqdm(batches, total=total, desc="evaluate (native size)", leave=False):
        preds, _ = model(images.to(device), [names.index(name) for name in tasks])
        for name, pred in zip(tasks, preds):
            mask = targets.get(f"{name}_mask")
            meters[name][0].update(pred.detach(), targets[name].to(device), None if mask is None else mask.to(device))
            for p, native in zip(pred.detach().cpu(), natives):
                # save_model_predictions skips an image whose label is all 255 (human_parts: no person)
                if not (native[name] == IGNORE).all():
                    update_native(name, meters[name], pascal_native_prediction(name, p, native["size"]), native)
    model.train(was_training)
    return {name: {k: v for meter in ms for k, v in meter.compute().items()} for name, ms in meters.items()}


def pascal_native_loader(train_args, split, cfg, **loading):
    """A loader over `split` of a PASCAL-Context run's data (train.py's args) that also gives the native labels.
    loading: batch_size, workers, pin_memory (eval_loader)."""
    dataset = data.PascalContextDataset(train_args["data_root"], split, [name for name, _, _ in cfg.tasks],
                                        img_size=cfg.img_size, augment=False, native_labels=True)
    return eval_loader(dataset, train_args, collate_fn=data.collate_native, **loading)


class MeanPredictor(torch.nn.Module):
    """The floor every model must beat: each task predicts its mean training target at every pixel (masked pixels
    left out, except for depth, whose loss has no mask), whatever the image; label tasks predict the log class
    frequencies, binary ones the mean's logit."""

    def __init__(self, cfg, batches):
        super().__init__()
        self.cfg, self.means = cfg, {}
        sums, counts = {}, {}
        for _, targets in batches:
            for name, C, _ in cfg.tasks:
                y, mask = targets[name], targets.get(f"{name}_mask")
                if name in ("depth_euclidean", "depth_zbuffer"):  # every pixel, as the depth loss
                    mask = None
                if name in ("semseg", "human_parts"):  # one-hot frequencies of the non-ignored labels
                    mask = (y != IGNORE)[:, None]
                    y = F.one_hot(y.masked_fill(y == IGNORE, 0), C).permute(0, 3, 1, 2)
                mask = torch.ones_like(y[:, :1], dtype=torch.bool) if mask is None else mask
                sums[name] = sums.get(name, 0) + (y.float() * mask).sum(0)
                counts[name] = counts.get(name, 0) + mask.float().sum(0)
        for name, _, _ in cfg.tasks:
            mean = sums[name] / counts[name].clamp_min(1)
            if name in ("semseg", "human_parts"):
                mean = mean.clamp_min(1e-6).log()
            elif name in ("saliency", "edge"):
                mean = torch.logit(mean.clamp(1e-6, 1 - 1e-6))
            self.means[name] = mean

    def forward(self, images, task):  # task: an int or a list of them, as ModSquad.forward
        if not isinstance(task, int):
            return [self(images, t)[0] for t in task], [[] for _ in task]
        mean = self.means[self.cfg.tasks[task][0]].to(images.device)
        return mean.expand(images.shape[0], *mean.shape), []


def format_comparison(results, baseline):
    """The primary metric of each task for the model and the mean predictor, and whether the model is better. For
    normal the angle is compared: its official L1 of the raw output scores the output's length, which the cosine
    loss never trains."""
    rows = [f"{'task':<20} {'metric':<15} {'model':>9} {'mean pred.':>10}  better"]
    for task, metrics in results.items():
        m = "mean_angle_deg" if task == "normal" else PRIMARY_METRIC[task]
        a, b = metrics[m], baseline[task][m]
        better = a > b if direction(m) == "↑" else a < b
        verdict = "-  (nothing to score)" if math.isnan(a) or math.isnan(b) else "yes" if better else "NO"
        rows.append(f"{task:<20} {m + ' ' + direction(m):<15} {a:>9.4f} {b:>10.4f}  {verdict}")
    return "\n".join(rows)


def format_table(results):
    """One row per (task, metric): value and direction; * marks the task's primary metric."""
    rows = [f"{'task':<20} {'metric':<17} {'value':>11}"]
    for task, metrics in results.items():
        for metric, value in metrics.items():
            primary = metric == PRIMARY_METRIC.get(task)
            note = f"  {NOTES[task]}" if primary and task in NOTES else ""
            rows.append(f"{task:<20} {metric:<17} {value:>11.4f} {direction(metric)}{'*' if primary else ''}{note}")
    return "\n".join(rows)


# -----------------------------------------------------------------------------
# Figures

def plot_expert_usage(usage_per_task, layer_names, task_names, path):
    """usage_per_task[t][l]: (E,) fraction of task t's tokens choosing each expert in MoE layer l.
    One task × expert heatmap per MoE layer."""
    L = len(layer_names)
    cols = min(L, 4)
    rows = math.ceil(L / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols + 1.5, 0.3 * len(task_names) * rows + 1.2), squeeze=False,
                             layout="constrained")
    for l, ax in enumerate(axes.flat):
        if l >= L:
            ax.axis("off")
            continue
        usage = torch.stack([u[l].float().cpu() for u in usage_per_task]).numpy()  # (T, E)
        im = ax.imshow(usage, vmin=0, vmax=1, cmap="viridis", aspect="auto", interpolation="nearest")
        ax.set_title(layer_names[l], fontsize=8)
        ax.set_yticks(range(len(task_names)), task_names if l % cols == 0 else [], fontsize=6)
        ax.set_xticks([])
    fig.colorbar(im, ax=axes, shrink=0.8, label="fraction of tokens")
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_training_curves(log_jsonl_path, path):
    """Per-task losses (lines: training; dots: the --eval-interval validations) and the MI loss against the step,
    from train.py's log.jsonl. A step logged twice (a resumed run repeats the steps after its last checkpoint) is
    drawn once, with its last record."""
    with open(log_jsonl_path) as f:
        records = list(map(json.loads, f))
    logs = sorted({r["step"]: r for r in records if "task_losses" in r}.values(), key=lambda r: r["step"])
    vals = sorted({r["step"]: r for r in records if "val" in r}.values(), key=lambda r: r["step"])
    steps = [r["step"] for r in logs]
    fig, (ax_tasks, ax_mi) = plt.subplots(1, 2, figsize=(11, 3.5), width_ratios=(1.4, 1))
    for i, name in enumerate(logs[0]["task_losses"]):  # tab20: 13 tasks get 13 distinct colours
        ax_tasks.plot(steps, [r["task_losses"][name] for r in logs], label=name, lw=1, color=plt.cm.tab20(i % 20))
        if vals:
            ax_tasks.plot([r["step"] for r in vals], [r["val"][name]["loss"] for r in vals], "o", ms=3,
                          color=plt.cm.tab20(i % 20))
    ax_tasks.set(xlabel="step", ylabel="task loss (dots: validation)" if vals else "task loss", yscale="log")
    ax_tasks.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax_mi.plot(steps, [r.get("mi", float("nan")) for r in logs], color="k", lw=1)
    ax_mi.set(xlabel="step", ylabel="MI loss (= -I(T;E), summed over layers)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _show(ax, name, x, reference):
    """Draw one prediction or target x of task `name` for one image; `reference` fixes the colour scale of a
    one-channel map (the target's own for a target; a prediction's own for a prediction: an L1-trained map of sparse
    peaks, such as keypoints, is a low haze on the target's scale, and its own range shows where it peaks)."""
    ax.axis("off")
    if x.dim() == 1:  # image-level task: the top class
        ax.text(0.5, 0.5, f"class {int(x.argmax())}", ha="center", va="center", fontsize=8)
    elif name in ("semseg", "human_parts"):
        labels = x.argmax(0) if x.dim() == 3 else x
        labels = torch.where(labels == IGNORE, math.nan, labels.float())  # ignored pixels stay blank
        ax.imshow(labels.numpy(), cmap="tab20", vmin=0, vmax=19, interpolation="nearest")
    elif name in ("saliency", "edge"):
        ax.imshow(x[0].numpy(), cmap="gray", vmin=0, vmax=1)
    elif x.shape[0] == 3:
        ax.imshow(((x.permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy())
    else:
        ax.imshow(x[0].numpy(), cmap="magma", vmin=float(reference[0].min()), vmax=float(reference[0].max()))


@torch.no_grad()
def plot_predictions(model, batch, path, num_images=3):
    """Input, then prediction and target of every task, for the first images of an (images, targets) batch."""
    images, targets = batch
    images = images[:num_images]
    n, device = len(images), next(model.parameters()).device
    was_training = model.training
    model.eval()
    tasks = [name for name, _, _ in model.cfg.tasks]
    fig, axes = plt.subplots(1 + len(tasks), 2 * n, figsize=(1.6 * 2 * n, 1.6 * (1 + len(tasks))), squeeze=False)
    for i in range(n):
        _show(axes[0, 2 * i], "rgb", images[i], images[i])
        axes[0, 2 * i + 1].axis("off")
    preds, _ = model(images.to(device), list(range(len(tasks))))
    for t, (name, pred) in enumerate(zip(tasks, preds)):
        pred = pred.float().cpu()
        pred = torch.sigmoid(pred) if name in ("saliency", "edge") else pred  # logits -> probabilities
        for i in range(n):
            target = targets[name][i]
            _show(axes[1 + t, 2 * i], name, pred[i], pred[i])
            _show(axes[1 + t, 2 * i + 1], name, target, target)
            own_scale = pred.dim() == 4 and pred.shape[1] != 3 and name not in ("saliency", "edge", "semseg",
                                                                                 "human_parts")
            axes[1 + t, 2 * i].set_title(f"{name} pred" + (" (own scale)" if own_scale else ""), fontsize=6)
            axes[1 + t, 2 * i + 1].set_title("target", fontsize=6)
    model.train(was_training)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# -----------------------------------------------------------------------------
# Command line: metrics of a run, and the extraction report

def eval_loader(dataset, train_args, batch_size=None, workers=None, pin_memory=False, **kwargs):
    """A DataLoader over an evaluation set: the run's batch size and this machine's default number of workers
    (data.default_workers) unless given; the workers persist, as extraction goes over the set once per model."""
    workers = data.default_workers(train_args.get("dataset", "synthetic")) if workers is None else workers
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size or train_args.get("batch_size", 8),
                                       num_workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0,
                                       **kwargs)


def run_loader(train_args, split, cfg, length=None, **loading):
    """A loader over `split` of the data a run was trained on (train.py's args), for the tasks of cfg.
    loading: batch_size, workers, pin_memory (eval_loader)."""
    dataset = data.build_dataset(train_args.get("dataset", "synthetic"), split, root=train_args.get("data_root"),
                                 tasks=[name for name, _, _ in cfg.tasks], img_size=cfg.img_size, length=length,
                                 seed=train_args.get("seed", 0), split_csv=train_args.get("split_csv"),
                                 require_all_buildings=train_args.get("require_all_buildings", False))
    return eval_loader(dataset, train_args, **loading)


def extraction_report(model, loader, device, tasks, threshold, max_batches, full_results, run_dir, score=None,
                      usage=None):
    """Per task: measure expert usage on the evaluation data, extract, and evaluate the extracted model beside the
    full one. Prints them side by side; saves extract_<task>.pt, extraction.json and expert_usage.png into run_dir.
    score(model) -> {task: metrics} scores the extracted models as the full one was (default: evaluate_model).
    usage(name) -> the task's expert usage, counted in the full model's evaluation pass (CountingUsage.usage); by
    default it is measured here with modsquad.expert_usage, one more pass over the data per task."""
    score = score or (lambda m: evaluate_model(m, loader, device, max_batches=max_batches))
    names = [name for name, _, _ in model.cfg.tasks]
    report, usages = {}, []
    print(f"{'task':<20} {'model':<10} {'params':>9} {'MACs':>9}  metrics")
    for name in tasks:
        t = names.index(name)
        usages.append(usage(name) if usage else expert_usage(model, itertools.islice(loader, max_batches), t))
        small = extract(model, t, usages[-1], threshold)
        torch.save({"model": small.state_dict(), "config": asdict(small.cfg)},
                   os.path.join(run_dir, f"extract_{name}.pt"))
        report[name] = {"full": {**count_params_flops(model, t), "metrics": full_results[name]},
                        "extracted": {**count_params_flops(small, 0),
                                      "metrics": score(small)[name]},
                        "kept_experts": [len(ids) for ids in small.cfg.kept_experts]}
        for which in ("full", "extracted"):
            e = report[name][which]
            metrics = "  ".join(f"{k} {v:.4f}" for k, v in e["metrics"].items())
            print(f"{name:<20} {which:<10} {e['params'] / 1e6:>8.3f}M {e['macs'] / 1e6:>8.2f}M  {metrics}")
        print(f"{'':<20} kept experts per MoE layer: {report[name]['kept_experts']}")
    with open(os.path.join(run_dir, "extraction.json"), "w") as f:
        json.dump(report, f, indent=2)
    plot_expert_usage(usages, model.moe_layer_names, list(tasks), os.path.join(run_dir, "expert_usage.png"))
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate a Mod-Squad run: per-task metrics, extraction, figures.")
    parser.add_argument("run_dir", help="directory with ckpt.pt (and log.jsonl) written by train.py")
    parser.add_argument("--split", default="val", help="dataset split to evaluate")
    parser.add_argument("--max-batches", type=int, default=None, help="evaluate on at most this many batches")
    parser.add_argument("--extract", default=None, metavar="TASK|all", help="extract the experts of one task or all")
    parser.add_argument("--threshold", type=float, default=0.03,
                        help="keep experts chosen by more than this fraction of a task's tokens (official: 3%%)")
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, ...")
    parser.add_argument("--single-task", nargs="+", default=None, metavar="RUN_DIR",
                        help="single-task runs (their metrics_<split>.json) to compute Δm against")
    parser.add_argument("--mean-baseline", type=int, default=0, metavar="N",
                        help="also score the mean predictor, with means over N training batches")
    parser.add_argument("--protocol", choices=("native", "in-loop"), default=None,
                        help="PASCAL-Context runs: native (their default) = MTL-PyTorch's final evaluation, each "
                             "prediction resized to its image's own size and scored on the full-resolution labels; "
                             "in-loop = on labels resized to the network's resolution (512² in the recipe), as its "
                             "online evaluation. Every other dataset is scored in-loop")
    parser.add_argument("--val-length", type=int, default=None, metavar="N", help="synthetic runs: the number of "
                        "validation scenes (default: the run's --val-length; more give a tighter estimate, with "
                        "--max-batches covering them)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per batch (default: the run's)")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: 0 for synthetic "
                        "data, else the CPU cores less one, at most 16)")
    parser.add_argument("--fp32", action="store_true", help="evaluate in float32 on CUDA too (default: bf16 autocast)")
    args = parser.parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"

    # rebuild the model from the checkpoint's config, as nanoGPT resumes, and the evaluation data from its args
    ckpt = torch.load(os.path.join(args.run_dir, "ckpt.pt"), map_location="cpu", weights_only=True)
    model = ModSquad(ModSquadConfig.from_dict(ckpt["config"])).to(device)
    model.load_state_dict(ckpt["model"])
    names, train_args = [name for name, _, _ in model.cfg.tasks], ckpt.get("args", {})
    if args.extract not in (None, "all", *names):
        parser.error(f"--extract {args.extract}: not a task of this model ({', '.join(names)}) nor 'all'")
    pascal = train_args.get("dataset") == "pascal"
    protocol = args.protocol or ("native" if pascal else "in-loop")
    if protocol == "native" and not pascal:
        parser.error("--protocol native: only PASCAL-Context runs (train.py --dataset pascal) have native-size labels")
    loading = dict(batch_size=args.batch_size, workers=args.workers, pin_memory=device.startswith("cuda"))
    if protocol == "native":
        loader = pascal_native_loader(train_args, args.split, model.cfg, **loading)
        protocol_text = (f"native size (MTL-PyTorch's final evaluation: predictions resized to each image's own size, "
                         f"scored on its full-resolution labels; loss at {model.cfg.img_size}²)")
    else:
        if args.val_length and not train_args.get("dataset", "synthetic").startswith("synthetic"):
            parser.error("--val-length: only synthetic runs have a validation split of a chosen size")
        loader = run_loader(train_args, args.split, model.cfg, length=args.val_length or train_args.get("val_length"),
                            **loading)
        protocol_text = f"in-loop (labels at the network's resolution, {model.cfg.img_size}²)"
    if args.max_batches is not None:  # load them once: every task pass, usage count and extraction reuses them
        loader = list(itertools.islice(loader, args.max_batches))
    evaluate_fn = evaluate_pascal_native if protocol == "native" else evaluate_model

    def score(m):
        # bf16 autocast on CUDA, the routers in fp32 as in training; in fp32 expert_matmul cannot use grouped_mm on
        # CUDA and falls back to a loop over the experts with host syncs
        with torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") and not args.fp32 else \
                nullcontext():
            return evaluate_fn(m, loader, device, max_batches=args.max_batches)

    # the experts each task's tokens choose are counted in this same pass (extraction needs no pass of its own)
    counted = CountingUsage(model) if args.extract else model
    results = score(counted)
    print(f"{args.run_dir} (step {ckpt.get('step')}), split {args.split}, protocol: {protocol_text}:\n"
          f"{format_table(results)}")
    with open(os.path.join(args.run_dir, f"metrics_{args.split}.json"), "w") as f:
        json.dump({"step": ckpt.get("step"), "split": args.split, "protocol": protocol, "metrics": results,
                   "primary": {t: PRIMARY_METRIC.get(t) for t in results},
                   "directions": {m: direction(m) for r in results.values() for m in r}}, f, indent=2)

    if args.single_task:  # Δm against single-task runs evaluated on the same split
        single = {}
        for run in args.single_task:
            with open(os.path.join(run, f"metrics_{args.split}.json")) as f:
                scored = json.load(f)
            if scored.get("protocol", "in-loop") != protocol:
                parser.error(f"{run} was scored with the {scored.get('protocol', 'in-loop')} protocol, this run with "
                             f"{protocol}: run evaluate.py {run} --protocol {protocol} first")
            single.update(scored["metrics"])
        # Δm is a relative change: a task whose single-task metric is 0 cannot enter it
        shared = [t for t in results if t in single and single[t][PRIMARY_METRIC[t]] != 0]
        primary = {t: PRIMARY_METRIC[t] for t in shared}
        dm = delta_m({t: results[t][primary[t]] for t in shared}, {t: single[t][primary[t]] for t in shared},
                     {t: direction(primary[t]) for t in shared})
        print(f"Δm against the single-task runs, over {len(shared)} tasks (primary metrics): {dm:+.2f} %")

    if args.mean_baseline:
        train_batches = itertools.islice(run_loader(train_args, "train", model.cfg,
                                                    length=args.mean_baseline * train_args.get("batch_size", 8)),
                                         args.mean_baseline)
        baseline = score(MeanPredictor(model.cfg, train_batches))
        print(f"against predicting the training mean:\n{format_comparison(results, baseline)}")
        with open(os.path.join(args.run_dir, f"mean_predictor_{args.split}.json"), "w") as f:
            json.dump(baseline, f, indent=2)

    plot_predictions(model, next(iter(loader))[:2], os.path.join(args.run_dir, "predictions.png"))
    log_path = os.path.join(args.run_dir, "log.jsonl")
    if os.path.exists(log_path):
        plot_training_curves(log_path, os.path.join(args.run_dir, "training_curves.png"))
    if args.extract:
        extraction_report(model, loader, device, names if args.extract == "all" else [args.extract], args.threshold,
                          args.max_batches, results, args.run_dir, score, counted.usage)


if __name__ == "__main__":
    main()
