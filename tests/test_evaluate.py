"""evaluate.py end to end on a tiny untrained model: evaluate_model, figures and the command line."""
import json
import math
from dataclasses import asdict, replace

import pytest
import torch
import torch.nn.functional as F

import evaluate
from evaluate import evaluate_model, plot_expert_usage, plot_predictions, plot_training_curves
from modsquad import SYNTHETIC_TASKS, ModSquad, expert_usage

PASCAL_TASKS = (("semseg", 7, "dense"), ("human_parts", 7, "dense"), ("saliency", 1, "dense"),
                ("normals", 3, "dense"), ("edge", 1, "dense"))


def fake_targets(tasks, B, H):
    """Random targets in the contract's encodings, with the masks the real datasets carry."""
    targets = {}
    for name, C, kind in tasks:
        if kind == "image":
            targets[name] = torch.softmax(torch.randn(B, C), dim=1)
        elif name in ("semseg", "human_parts"):
            targets[name] = torch.randint(0, C, (B, H, H))
            targets[name][0] = 255  # an image without a person / a fully ignored image
        elif name in ("saliency", "edge"):
            targets[name] = (torch.rand(B, 1, H, H) > 0.8).float()
        elif name == "normals":
            targets[name] = F.normalize(torch.randn(B, 3, H, H), dim=1)
        else:
            targets[name] = torch.rand(B, C, H, H) if name.startswith("depth") else torch.rand(B, C, H, H) * 2 - 1
        if name.startswith("depth") or name in ("normal", "normals"):
            targets[f"{name}_mask"] = torch.rand(B, 1, H, H) > 0.1
    return targets


def fake_loader(cfg, num_batches=2, B=2):
    return [(torch.rand(B, 3, cfg.img_size, cfg.img_size) * 2 - 1, fake_targets(cfg.tasks, B, cfg.img_size))
            for _ in range(num_batches)]


def all_finite(results):
    return all(math.isfinite(v) for metrics in results.values() for v in metrics.values())


def test_evaluate_model_gives_finite_metrics_for_every_taskonomy_task(tiny_cfg):
    cfg = replace(tiny_cfg, tasks=SYNTHETIC_TASKS)
    results = evaluate_model(ModSquad(cfg), fake_loader(cfg), "cpu")
    assert set(results) == {name for name, _, _ in cfg.tasks} and all_finite(results)


def test_evaluate_model_gives_finite_metrics_for_every_pascal_task(tiny_cfg):
    cfg = replace(tiny_cfg, tasks=PASCAL_TASKS)
    results = evaluate_model(ModSquad(cfg), fake_loader(cfg), "cpu")
    assert set(results) == {name for name, _, _ in cfg.tasks} and all_finite(results)


def test_evaluate_model_restores_training_mode_and_honours_task_subset(tiny_cfg):
    model = ModSquad(tiny_cfg).train()
    results = evaluate_model(model, fake_loader(tiny_cfg, num_batches=3), "cpu", tasks=["normal"], max_batches=1)
    assert list(results) == ["normal"] and model.training


def test_plot_expert_usage_writes_png(tiny_cfg, tmp_path):
    model = ModSquad(tiny_cfg)
    batches = [images for images, _ in fake_loader(tiny_cfg)]
    usage = [expert_usage(model, batches, t) for t in range(len(tiny_cfg.tasks))]
    path = tmp_path / "usage.png"
    plot_expert_usage(usage, model.moe_layer_names, [name for name, _, _ in tiny_cfg.tasks], path)
    assert path.stat().st_size > 0


def test_plot_training_curves_writes_png(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "lr": 1e-3, "loss": 1 / (s + 1), "mi": -0.1 * s,
                                       "task_losses": {"normal": 1 / (s + 1), "depth_euclidean": 2 / (s + 1)}}) + "\n"
                           for s in range(5)))
    plot_training_curves(log, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0


@pytest.mark.parametrize("tasks", [SYNTHETIC_TASKS, PASCAL_TASKS])
def test_plot_predictions_writes_png(tiny_cfg, tmp_path, tasks):
    cfg = replace(tiny_cfg, tasks=tasks)
    plot_predictions(ModSquad(cfg), fake_loader(cfg, num_batches=1)[0], tmp_path / "pred.png")
    assert (tmp_path / "pred.png").stat().st_size > 0


def make_run(cfg, run_dir, dataset="synthetic"):
    """A run directory as train.py writes it, holding an untrained model."""
    model = ModSquad(cfg)
    args = {"dataset": dataset, "data_root": None, "img_size": cfg.img_size, "tasks": None, "batch_size": 2,
            "seed": 0, "val_length": 4}
    torch.save({"model": model.state_dict(), "optimizer": {}, "scheduler": {"step": 0}, "step": 0,
                "config": asdict(cfg), "args": args, "loss_weights": None}, run_dir / "ckpt.pt")
    return model


def test_cli_prints_table_and_writes_metrics_json(tiny_cfg, tmp_path, capsys):
    make_run(replace(tiny_cfg, tasks=SYNTHETIC_TASKS[:4]), tmp_path)
    evaluate.main([str(tmp_path), "--max-batches", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "metrics_val.json").read_text())["metrics"]
    assert "rmse_remap" in out and "↑*" in out and all_finite(metrics) and len(metrics) == 4


def test_cli_extract_writes_extraction_report(tiny_cfg, tmp_path):
    make_run(replace(tiny_cfg, tasks=SYNTHETIC_TASKS[:3]), tmp_path)
    evaluate.main([str(tmp_path), "--max-batches", "1", "--device", "cpu", "--extract", "all"])
    report = json.loads((tmp_path / "extraction.json").read_text())
    assert set(report) == {name for name, _, _ in SYNTHETIC_TASKS[:3]}
    assert all(r["extracted"]["params"] < r["full"]["params"] for r in report.values())
    assert (tmp_path / "extract_depth_euclidean.pt").exists() and (tmp_path / "expert_usage.png").exists()


def test_val_length_scores_more_validation_scenes_than_the_run_was_given(tiny_cfg, tmp_path, monkeypatch):
    """--val-length N: a synthetic run scored on N validation scenes instead of its own --val-length (4 here); a real
    dataset's run is refused with the reason."""
    make_run(replace(tiny_cfg, tasks=SYNTHETIC_TASKS[:2]), tmp_path)
    seen, real = [], evaluate.evaluate_model
    monkeypatch.setattr(evaluate, "evaluate_model",
                        lambda model, loader, *a, **k: seen.append(sum(len(x) for x, _ in loader)) or
                        real(model, loader, *a, **k))
    evaluate.main([str(tmp_path), "--max-batches", "8", "--device", "cpu"])
    evaluate.main([str(tmp_path), "--max-batches", "8", "--device", "cpu", "--val-length", "10"])
    assert seen == [4, 10]
    real_run = tmp_path / "real"
    real_run.mkdir()
    make_run(replace(tiny_cfg, tasks=SYNTHETIC_TASKS[:2]), real_run, dataset="taskonomy")
    with pytest.raises(SystemExit):
        evaluate.main([str(real_run), "--device", "cpu", "--val-length", "10"])


def test_mean_predictor_predicts_the_masked_mean_target():
    """The floor every model must beat: the per-pixel mean of the training targets, masked pixels left out (but not
    for depth, whose loss trains every pixel)."""
    from evaluate import MeanPredictor
    from modsquad import ModSquadConfig

    cfg = ModSquadConfig(img_size=8, patch_size=4, tasks=(("segment_unsup2d", 1, "dense"), ("semseg", 3, "dense"),
                                                          ("depth_euclidean", 1, "dense")))
    value = torch.tensor([0.2, 0.4, 0.9]).view(3, 1, 1, 1).expand(3, 1, 8, 8)
    mask = torch.tensor([True, True, False]).view(3, 1, 1, 1).expand(3, 1, 8, 8)
    semseg = torch.tensor([0, 2, 255]).view(3, 1, 1).expand(3, 8, 8)
    predictor = MeanPredictor(cfg, [(None, {"segment_unsup2d": value, "segment_unsup2d_mask": mask, "semseg": semseg,
                                            "depth_euclidean": value, "depth_euclidean_mask": mask})])
    pred, routings = predictor(torch.zeros(2, 3, 8, 8), 0)
    assert pred.shape == (2, 1, 8, 8) and routings == []
    torch.testing.assert_close(pred, torch.full((2, 1, 8, 8), 0.3))
    torch.testing.assert_close(predictor(torch.zeros(2, 3, 8, 8), 2)[0], torch.full((2, 1, 8, 8), 0.5))
    logits, _ = predictor(torch.zeros(1, 3, 8, 8), 1)  # classes 0 and 2 seen once each, class 1 never
    assert logits[0, 0, 0, 0] == logits[0, 2, 0, 0] > logits[0, 1, 0, 0]


def test_cli_delta_m_against_single_task_runs(tiny_cfg, tmp_path, capsys):
    """Δm of a run against single-task runs' metrics: 0 when they score the same, signed by direction otherwise."""
    run = tmp_path / "mtl"
    run.mkdir()
    make_run(replace(tiny_cfg, tasks=SYNTHETIC_TASKS[2:5]), run)  # dense tasks: no top-1 of 0 to divide by
    evaluate.main([str(run), "--max-batches", "1", "--device", "cpu"])
    metrics = json.loads((run / "metrics_val.json").read_text())["metrics"]
    single = tmp_path / "single"
    single.mkdir()
    worse = {t: {k: v * (1.1 if evaluate.direction(k) == "↓" else 0.9) for k, v in m.items()} for t, m in metrics.items()}
    (single / "metrics_val.json").write_text(json.dumps({"metrics": worse}))
    capsys.readouterr()
    evaluate.main([str(run), "--max-batches", "1", "--device", "cpu", "--single-task", str(single)])
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("Δm")][0]
    assert "over 3 tasks" in line and float(line.split(":")[1].split()[0]) > 0


def test_comparison_with_the_mean_predictor_says_when_there_is_nothing_to_score():
    """A metric that is nan (e.g. human_parts mIoU on a batch without a person) is neither better nor worse."""
    text = evaluate.format_comparison({"semseg": {"miou": 0.3}, "human_parts": {"miou": float("nan")}},
                                      {"semseg": {"miou": 0.2}, "human_parts": {"miou": float("nan")}})
    rows = {line.split()[0]: line for line in text.splitlines()[1:]}
    assert rows["semseg"].endswith("yes") and rows["human_parts"].endswith("(nothing to score)")
