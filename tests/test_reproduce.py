"""reproduce.py's table, built from fabricated run directories (no training)."""
import ast
import json
import math
import os
import shutil
from dataclasses import asdict

import pytest

import reproduce
from modsquad import ModSquadConfig

TASKS = ["class_object", "depth_euclidean"]
METRICS = {"class_object": "top1", "depth_euclidean": "rmse_remap"}  # ↑, ↓


def write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def fake_run(run_dir, tasks, values, moe=True, mi=None):
    """A run directory as reproduce.py leaves it: config.json, metrics_val.json, reproduce.json."""
    cfg = ModSquadConfig(tasks=tuple(t for t in ModSquadConfig().tasks if t[0] in tasks), moe=moe)
    write(os.path.join(run_dir, "config.json"), {"model": asdict(cfg), "args": {}})
    write(os.path.join(run_dir, "metrics_val.json"),
          {"metrics": {t: {"loss": 1.0, metric: v} for t, (metric, v) in zip(tasks, values)}})
    write(os.path.join(run_dir, "reproduce.json"), {"train_s": 1.0, "eval_s": 1.0, **({"mi": mi} if mi else {})})


# per seed, the primary metric (top1 ↑, rmse_remap ↓) of every column; Δm vs single-task (0.5, 10.0) in the comments
SEEDS = {
    0: dict(single=(0.5, 10.0), dense=(0.4, 12.0), modsquad_nomi=(0.5, 10.0), modsquad=(0.6, 8.0),  # -20, 0, +20
            extracted=(0.6, 9.0), extracted_nomi=(0.45, 10.0), mean=(0.25, 15.0)),  # +15, -5, -50
    1: dict(single=(0.5, 10.0), dense=(0.45, 10.0), modsquad_nomi=(0.55, 10.0), modsquad=(0.6, 9.0),  # -5, +5, +15
            extracted=(0.6, 9.0), extracted_nomi=(0.55, 10.0), mean=(0.25, 15.0)),  # +15, +5, -50
}


def fake_study(out, eval_batches=4):
    """Run directories of both seeds, and the records reproduce.py makes of them (key seed<S>/<run>)."""
    records = {}
    mi = {"layers": ["blocks.0.attn", "blocks.1.mlp"], "per_layer": [0.1, 0.3], "bound": [math.log(2)] * 2}
    for seed, v in SEEDS.items():
        for name, settings, _ in reproduce.run_specs(TASKS, eval_batches):
            run_dir = os.path.join(out, f"seed{seed}", name)
            if name.startswith("single_"):
                t = name[len("single_"):]
                fake_run(run_dir, [t], [(METRICS[t], v["single"][TASKS.index(t)])])
            else:
                fake_run(run_dir, TASKS, list(zip(METRICS.values(), v[name])), moe=name != "dense",
                         mi=mi if name != "dense" else None)
            if name in ("modsquad", "modsquad_nomi"):
                col = {"modsquad": "extracted", "modsquad_nomi": "extracted_nomi"}[name]
                write(os.path.join(run_dir, "extraction.json"), {
                    t: {"extracted": {"params": 1000, "macs": 500, "metrics": {METRICS[t]: x}},
                        "kept_experts": [2, 4] if name == "modsquad" else [4, 4]} for t, x in zip(TASKS, v[col])})
            if name == "modsquad":
                write(os.path.join(run_dir, "mean_predictor_val.json"),
                      {t: {METRICS[t]: x} for t, x in zip(TASKS, v["mean"])})
            expected = reproduce.run_settings(reproduce.BUDGET, seed, settings)
            records[f"seed{seed}/{name}"] = reproduce.run_record(run_dir, expected, eval_batches)
    return records


def test_table_has_mean_and_spread_over_seeds_from_the_records_alone(tmp_path):
    records = fake_study(str(tmp_path / "runs"))
    shutil.rmtree(tmp_path / "runs")  # the records are enough: a later sitting may not have the run directories
    results = reproduce.build_results(records, TASKS, [0, 1])
    delta = results["table"]["delta_m"]
    assert delta["single"] is None and delta["mean"]["per_seed"] == [-50, -50]
    for col, per_seed in (("dense", [-20, -5]), ("modsquad_nomi", [0, 5]), ("modsquad", [20, 15]),
                          ("extracted", [15, 15]), ("extracted_nomi", [-5, 5])):
        assert all(math.isclose(a, b, abs_tol=1e-9) for a, b in zip(delta[col]["per_seed"], per_seed)), col
    assert math.isclose(delta["modsquad"]["mean"], 17.5) and math.isclose(delta["modsquad"]["std"], 5 / math.sqrt(2))
    gain = results["table"]["gain_over_mean"]["modsquad"]["depth_euclidean rmse_remap"]
    assert [round(g, 6) for g in gain["per_seed"]] == [round(700 / 15, 6), 40.0]  # (15 - 8) / 15, (15 - 9) / 15
    assert results["table"]["params_all_tasks"]["extracted"]["mean"] == 2000
    assert results["table"]["kept_experts_mean"]["extracted"]["mean"] == 3
    assert math.isclose(results["table"]["mi"]["modsquad"]["mean"], 0.2)

    verdicts = {d["what"]: d["verdict"] for d in results["differences"]}
    assert verdicts["Δm of dense MTL vs single-task"] == "exceeds the spread"  # -20, -5: mean -12.5 > std 10.6
    assert verdicts["Δm of Mod-Squad w/o MI vs single-task"].startswith("within")  # 0, +5: not the same sign
    assert verdicts["Δm: Mod-Squad − Mod-Squad w/o MI"] == "exceeds the spread"  # +20, +10
    assert verdicts["I(T;E) per MoE layer (nats): Mod-Squad − w/o MI"].startswith("within")  # 0, 0
    assert reproduce.verdict([3.0]) == "one seed: no claim"
    assert reproduce.verdict([1.0, 1.2, -0.1]).startswith("within")

    markdown = reproduce.format_markdown(results)
    rows = [line.split(" | ")[0].lstrip("| ") for line in markdown.splitlines() if line.startswith("| ")]
    assert rows[:3] == ["task", "class_object", "depth_euclidean"]
    assert rows[3].startswith("**Δm") and any(r.startswith("I(T;E)") for r in rows)
    delta_row = next(line for line in markdown.splitlines() if line.startswith("| **Δm"))
    assert delta_row.split(" | ")[2:] == ["-50.00 ± 0.00", "—", "-12.50 ± 10.61", "+2.50 ± 3.54", "+17.50 ± 3.54",
                                          "+15.00 ± 0.00", "+0.00 ± 7.07 |"]


def test_table_only_reuses_recorded_runs_and_trains_nothing(tmp_path):
    records = fake_study(str(tmp_path / "fake"), eval_batches=reproduce.EVAL_IMAGES // reproduce.BUDGET["batch_size"])
    results_dir, out = tmp_path / "results", tmp_path / "runs"
    write(str(results_dir / "results.json"), {"records": records})
    reproduce.main(["--table-only", "--tasks", ",".join(TASKS), "--seeds", "2", "--results", str(results_dir),
                    "--out", str(out)])
    assert not out.exists()
    markdown = (results_dir / "results.md").read_text()
    assert "over 2 seeds (0, 1)" in markdown and "+17.50 ± 3.54" in markdown
    assert "## The default run over seeds 0, 1" in markdown
    saved = json.loads((results_dir / "results.json").read_text())
    assert saved["records"] == records and saved["results"]["seeds"] == [0, 1]


def test_default_run_section_needs_only_the_mod_squad_runs(tmp_path):
    """A study under way (its Mod-Squad runs go first) already gives the default run's spread over the seeds."""
    records = fake_study(str(tmp_path / "fake"), eval_batches=reproduce.EVAL_IMAGES // reproduce.BUDGET["batch_size"])
    records = {k: v for k, v in records.items() if k.endswith("/modsquad")}
    results_dir = tmp_path / "results"
    write(str(results_dir / "results.json"), {"records": records})
    reproduce.main(["--table-only", "--tasks", ",".join(TASKS), "--seeds", "2", "--results", str(results_dir),
                    "--out", str(tmp_path / "runs")])
    markdown = (results_dir / "results.md").read_text()
    assert "runs recorded 2 of 10" in markdown and "## The default run over seeds 0, 1" in markdown
    # rmse_remap 8, 9 against the mean predictor's 15, 15: gains 46.7 % and 40 %
    assert "| depth_euclidean | rmse_remap ↓ | 8.5000 ± 0.7071 | 15.0000 ± 0.0000 | +43.3 ± 4.7 | +40.0 |" in markdown
    d = json.loads((results_dir / "results.json").read_text())["default_run"]
    assert d["misses"] == [] and "smallest margin is depth_euclidean's, +40.0 %" in markdown
    depth = next(r for r in d["rows"] if r["task"] == "depth_euclidean")
    assert math.isclose(depth["extracted_vs_full"], 1 / 8)  # seed 0: extracted 9 against the full model's 8


def test_budget_is_train_py_default_recipe():
    """reproduce.BUDGET pins train.py's defaults: the add_argument defaults, and no override in its synthetic recipe."""
    tree = ast.parse(open(os.path.join(os.path.dirname(reproduce.__file__), "train.py")).read())
    defaults, recipes = {}, None
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument" and node.args:
            flag = getattr(node.args[0], "value", None)
            for kw in node.keywords:
                if kw.arg == "default" and isinstance(flag, str):
                    defaults[flag] = ast.literal_eval(kw.value) if isinstance(kw.value, ast.Constant) else None
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "RECIPES":
            recipes = node.value
    synthetic = next(v for k, v in zip(recipes.keys, recipes.values) if k.value == "synthetic")
    overridden = {kw.arg for kw in synthetic.keywords} if isinstance(synthetic, ast.Call) else set()
    for k, v in reproduce.BUDGET.items():
        assert defaults["--" + k.replace("_", "-")] == v and k not in overridden, k
    assert defaults["--train-length"] == reproduce.TRAIN_SCENES


@pytest.mark.slow
def test_quick_study_in_two_jobs_records_every_run_on_scenes_rendered_once(tmp_path):
    """`reproduce.py --quick --jobs 2` end to end (real train.py and evaluate.py subprocesses, two at a time): every
    run of the seed is recorded and the table is written; a second call trains nothing."""
    out, results_dir = tmp_path / "runs", tmp_path / "results"
    reproduce.main(["--quick", "--jobs", "2", "--out", str(out), "--results", str(results_dir)])
    records = json.loads((results_dir / "results.json").read_text())["records"]
    names = [name for name, _, _ in reproduce.run_specs(reproduce.QUICK["tasks"].split(","), 0)]
    assert sorted(records) == sorted(f"seed0/{name}" for name in names)
    assert all(r["settings"]["steps"] == reproduce.QUICK["steps"] for r in records.values())
    assert not (out / "scenes").exists()  # 30 steps read 240 of the 8192 scenes: nothing worth sharing
    markdown = (results_dir / "results.md").read_text()
    assert "over 1 seed" in markdown and "| single-task |" in markdown
    assert all(f"| {t} |" in markdown for t in reproduce.QUICK["tasks"].split(","))
    # a second call has nothing left to train: every run is reused from the records
    reproduce.main(["--quick", "--jobs", "2", "--out", str(out), "--results", str(results_dir)])
    assert json.loads((results_dir / "results.json").read_text())["records"] == records
