"""reproduce.py's table, built from fabricated run directories (no training)."""
import json
import math
import os
from dataclasses import asdict

import reproduce
from modsquad import ModSquadConfig

TASKS = ["class_object", "depth_euclidean"]  # top1 ↑, rmse_remap ↓


def write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def fake_run(out, name, tasks, values, moe=True, mi=None):
    """A run directory as reproduce.py leaves it: config.json, metrics_val.json, reproduce.json."""
    cfg = ModSquadConfig(tasks=tuple(t for t in ModSquadConfig().tasks if t[0] in tasks), moe=moe)
    args = {"steps": 30, "batch_size": 8, "blr": 8e-3, "seed": 0, "warmup_steps": 20, "preset": "tiny"}
    write(os.path.join(out, name, "config.json"), {"model": asdict(cfg), "args": args})
    write(os.path.join(out, name, "metrics_val.json"),
          {"metrics": {t: {"loss": 1.0, metric: v} for t, (metric, v) in zip(tasks, values)}})
    write(os.path.join(out, name, "reproduce.json"), {"train_s": 1.0, "eval_s": 1.0, **({"mi": mi} if mi else {})})


def test_table_from_fabricated_runs(tmp_path):
    out = str(tmp_path)
    fake_run(out, "single_class_object", ["class_object"], [("top1", 0.5)])
    fake_run(out, "single_depth_euclidean", ["depth_euclidean"], [("rmse_remap", 10.0)])
    fake_run(out, "dense", TASKS, [("top1", 0.4), ("rmse_remap", 12.0)], moe=False)  # worse on both: Δm -20 %
    mi = {"layers": ["blocks.0.attn", "blocks.1.mlp"], "per_layer": [0.1, 0.3], "bound": [math.log(2)] * 2}
    fake_run(out, "modsquad_nomi", TASKS, [("top1", 0.5), ("rmse_remap", 10.0)], mi=mi)  # equal: Δm 0
    fake_run(out, "modsquad", TASKS, [("top1", 0.6), ("rmse_remap", 8.0)], mi=mi)  # better on both: Δm +20 %
    write(os.path.join(out, "modsquad", "mean_predictor_val.json"),
          {"class_object": {"top1": 0.25}, "depth_euclidean": {"rmse_remap": 15.0}})  # Δm -50 %
    for name, top1, rmse in (("modsquad", 0.6, 9.0), ("modsquad_nomi", 0.45, 10.0)):
        write(os.path.join(out, name, "extraction.json"), {
            t: {"extracted": {"params": 1000, "macs": 500, "metrics": {metric: v}}, "kept_experts": [2, 4]}
            for t, metric, v in (("class_object", "top1", top1), ("depth_euclidean", "rmse_remap", rmse))})

    results = reproduce.build_results(out, TASKS)
    delta = results["delta_m"]
    assert delta["single"] is None and math.isclose(delta["mean"], -50)
    assert math.isclose(delta["dense"], -20) and math.isclose(delta["modsquad"], 20)
    assert math.isclose(delta["modsquad_nomi"], 0, abs_tol=1e-9)
    assert math.isclose(delta["extracted"], 15) and math.isclose(delta["extracted_nomi"], -5)
    assert results["params_all_tasks"]["extracted"] == 2000 and results["kept_experts_mean"]["extracted"] == 3
    assert results["params_one_task"]["single"] < results["params_one_task"]["modsquad"]
    assert math.isclose(results["mi"]["modsquad"]["mean"], 0.2)

    markdown = reproduce.format_markdown(results)
    rows = [line.split(" | ")[0].lstrip("| ") for line in markdown.splitlines() if line.startswith("| ")]
    assert rows[:3] == ["task", "class_object", "depth_euclidean"]
    assert rows[3].startswith("**Δm") and any(r.startswith("I(T;E)") for r in rows)
    delta_row = next(line for line in markdown.splitlines() if line.startswith("| **Δm"))
    assert delta_row.split(" | ")[2:] == ["-50.00", "—", "-20.00", "+0.00", "+20.00", "+15.00", "-5.00 |"]
