"""
The paper in miniature: single-task baselines, a dense multi-task baseline, Mod-Squad without and with the MI loss,
and the extracted per-task models, trained with the same budget on the synthetic 13-task scenes over several seeds,
and compared in one table of mean ± std. One command, re-runnable: finished runs are reused, an interrupted training
resumes, and every finished run is recorded in results.json, so a long study can be completed over several sittings
(the records are enough: the run directories may be gone).

    python reproduce.py                  # 13 tasks, train.py's default budget, seeds 0, 1, 2: hours on 2 cores
    python reproduce.py --jobs 2         # two runs at a time, one core each: sooner on 2 cores
    python reproduce.py --seeds 5        # seeds 0-4 (the recorded runs of seeds 0-2 are reused)
    python reproduce.py --first-seed 10  # seeds 10, 11, 12: the same study on scenes nobody has used
    python reproduce.py --table-only     # the table from the recorded runs alone, training nothing
    python reproduce.py --quick          # 3 tasks, 30 steps of 8 images, one seed: a few minutes
    python reproduce.py --force          # redo every run

Runs under --out/seed<S>/, each `train.py --no-final-eval` then `evaluate.py` (subprocesses, logs in the run dir):
    single_<task>    the default model trained on one task (T = 1): the single-task baseline of that task
    dense            the dense multi-task baseline (train.py --no-moe: the same active MACs per task pass)
    modsquad_nomi    Mod-Squad without the MI loss (--mi-weight 0), experts extracted (evaluate.py --extract all)
    modsquad         Mod-Squad (defaults), experts extracted, and the mean predictor scored
Every run gets the same steps, batch size, lr and image size; nothing is tuned per model. The seed sets the scenes,
the initialisation and the data order of every run of its study. Writes into --results (default results/reproduce,
kept under version control): results.json (the record of every finished run, and the table as data), results.md
(each cell mean ± std over the seeds, and which differences exceed the seed-to-seed spread), and the task x expert
usage heatmaps of the first seed's two Mod-Squad runs. A mean-predictor column (each task predicts its mean training
target) shows the floor every model must beat.
"""

import argparse
import concurrent.futures
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

import torch

import evaluate
from modsquad import ModSquad, ModSquadConfig, count_params_flops, mutual_information_loss, task_expert_joint

HERE = os.path.dirname(os.path.abspath(__file__))
# train.py's default budget (tests/test_reproduce.py checks that they agree), passed to every run explicitly so that
# a recorded run stays comparable when train.py's defaults change
BUDGET = dict(steps=2000, batch_size=8, blr=0.064, warmup_steps=100)
QUICK = dict(steps=30, batch_size=8, warmup_steps=3, tasks="class_object,depth_euclidean,normal", seeds=1,
             eval_images=64)
TRAIN_SCENES = 8192  # train.py's --train-length: the synthetic training split of every run
EVAL_IMAGES = 256  # validation scenes every run is scored on; the mean predictor averages as many training scenes
# table columns: key, heading. The mean predictor and the two extracted columns come from the evaluations of
# modsquad and modsquad_nomi (mean_predictor_val.json, extraction.json)
COLUMNS = {"mean": "mean predictor", "single": "single-task", "dense": "dense MTL",
           "modsquad_nomi": "Mod-Squad w/o MI", "modsquad": "Mod-Squad", "extracted": "extracted Mod-Squad",
           "extracted_nomi": "extracted w/o MI"}
EXTRACTED_FROM = {"extracted": "modsquad", "extracted_nomi": "modsquad_nomi"}
MOE_RUNS = ("modsquad_nomi", "modsquad")
TARGET_GAIN = 10.0  # %: the default run should beat the mean predictor by this much on every task (README)


def run_specs(tasks, eval_batches):
    """(run name, its own train.py settings, its extra evaluate.py flags) of every run of one seed, the single-task
    runs first. Experts are extracted (and I(T;E) measured) for the two Mod-Squad runs; the mean predictor is scored
    once, over as many training batches as the evaluation has validation batches."""
    mtl, extract = ",".join(tasks), ["--extract", "all"]
    return [(f"single_{t}", dict(tasks=t), []) for t in tasks] + [
        ("dense", dict(tasks=mtl, no_moe=True), []), ("modsquad_nomi", dict(tasks=mtl, mi_weight=0.0), extract),
        ("modsquad", dict(tasks=mtl), extract + ["--mean-baseline", str(eval_batches)])]


def run_settings(budget, seed, settings):
    """The train.py settings of one run: the study's budget and seed, then the run's own (tasks, --no-moe, ...)."""
    return {**budget, "seed": seed, "no_moe": False, "mi_weight": None, **settings}


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_json(obj, path):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)  # atomic: a kill while writing leaves the previous file


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs)


# -----------------------------------------------------------------------------
# Running train.py and evaluate.py

def run_logged(cmd, log_path, threads=None):
    """Run cmd (a list, in this folder) with its output in log_path, on `threads` torch threads (None: torch's
    default); on failure print the log's tail and stop."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=HERE, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = f.readlines()[-25:]
        sys.exit(f"{' '.join(cmd)} failed (exit {proc.returncode}); end of {log_path}:\n{''.join(tail)}")


def trained_step(run_dir, expected):
    """The step of run_dir's checkpoint (None when there is none). Stops if it was trained with other settings, since
    resuming or reusing it would break the equal budget."""
    path = os.path.join(run_dir, "ckpt.pt")
    if not os.path.exists(path):
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    differ = [f"{k} {ckpt['args'].get(k)!r} (want {v!r})" for k, v in expected.items() if ckpt["args"].get(k) != v]
    if differ:
        sys.exit(f"{path} was trained with other settings: {', '.join(differ)}. Rerun with --force or another --out")
    return ckpt["step"]


@torch.no_grad()
def measure_mi(run_dir, max_batches):
    """I(T;E) per MoE layer of a run's final model, from its soft router probabilities on the validation images: the
    joint P(t, e) over every token of every task pass (modsquad.task_expert_joint), and I(T;E) = -L_MI."""
    ckpt = torch.load(os.path.join(run_dir, "ckpt.pt"), map_location="cpu", weights_only=True)
    model = ModSquad(ModSquadConfig.from_dict(ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    names, train_args = [name for name, _, _ in model.cfg.tasks], ckpt["args"]
    # the validation images evaluate.py scores the run on
    loader = evaluate.run_loader(train_args, "val", model.cfg, length=train_args["val_length"])
    probs = [[[] for _ in model.moe_layers] for _ in names]  # probs[t][l]: (B*N, E) router probabilities per batch
    for images, _ in itertools.islice(loader, max_batches):
        for t in range(len(names)):
            _, routings = model(images, t)
            for layer, r in enumerate(routings):
                probs[t][layer].append(r.probs)
    per_layer = [-mutual_information_loss(task_expert_joint([torch.cat(p[layer]) for p in probs])).item()
                 for layer in range(len(model.moe_layers))]
    # I(T;E) <= min(H(T), H(E)) <= log min(T, E)
    bounds = [math.log(min(len(names), m.num_experts)) for m in model.moe_layers]
    return {"layers": model.moe_layer_names, "per_layer": per_layer, "bound": bounds}


def train_and_evaluate(run_dir, name, expected, eval_flags, eval_batches, force, scene_cache=None, threads=None):
    """Train one run (or resume, or reuse it) with the train.py settings `expected`, and evaluate it on eval_batches
    validation batches; bookkeeping in <run>/reproduce.json. scene_cache: train.py's --scene-cache, the folder where
    the runs of a seed share their rendered training scenes (the same tensors, rendered once); threads: torch threads
    of the subprocesses. Prints a line as each step starts and ends (several runs may share the terminal)."""
    if force and os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    # --name value per setting, a bare --name for True, nothing for None or False (but --mi-weight 0 is passed)
    flags = [x for k, v in expected.items() if v is not None and v is not False
             for x in (["--" + k.replace("_", "-")] + ([] if v is True else [str(v)]))]
    step = trained_step(run_dir, expected)
    if step is None and os.path.isdir(run_dir):  # killed before its first checkpoint: start clean (log.jsonl appends)
        shutil.rmtree(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    stamp_path = os.path.join(run_dir, "reproduce.json")
    stamp = read_json(stamp_path) if os.path.exists(stamp_path) else {}
    key = f"seed{expected['seed']}/{name}"
    if step != expected["steps"]:
        print(f"{key}: training{f' (resuming at step {step})' if step else ''} ...", flush=True)
        t0 = time.time()
        run_logged([sys.executable, "train.py", "--out-dir", run_dir, "--no-final-eval", *flags,
                    *(["--scene-cache", scene_cache] if scene_cache else []), *(["--resume"] if step else [])],
                   os.path.join(run_dir, "train.log"), threads)
        stamp = {"train_s": time.time() - t0, "resumed_at": step}
        write_json(stamp, stamp_path)
        print(f"{key}: trained in {stamp['train_s']:.0f} s", flush=True)
    evaluated = {"step": expected["steps"], "eval_batches": eval_batches, "flags": eval_flags}
    if stamp.get("evaluated") != evaluated:
        t0 = time.time()
        run_logged([sys.executable, "evaluate.py", run_dir, "--max-batches", str(eval_batches), *eval_flags],
                   os.path.join(run_dir, "evaluate.log"), threads)
        if "--extract" in eval_flags:
            stamp["mi"] = measure_mi(run_dir, eval_batches)
        stamp.update(eval_s=time.time() - t0, evaluated=evaluated)
        write_json(stamp, stamp_path)
        print(f"{key}: evaluated in {stamp['eval_s']:.0f} s", flush=True)
    else:
        print(f"{key}: done before, reused", flush=True)


def git_commit():
    """The commit the code was at (None outside a git checkout), kept in each record as provenance."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_record(run_dir, expected, eval_batches):
    """What the table needs from one finished run, as plain data: results.json keeps it, so that the study can be
    completed in a later sitting without the run directory."""
    cfg = ModSquadConfig.from_dict(read_json(os.path.join(run_dir, "config.json"))["model"])
    counts = [count_params_flops(cfg, i) for i in range(len(cfg.tasks))]
    stamp = read_json(os.path.join(run_dir, "reproduce.json"))
    record = {"settings": expected, "eval_batches": eval_batches,
              "metrics": read_json(os.path.join(run_dir, "metrics_val.json"))["metrics"],
              "params": counts[0]["params"], "macs": mean(c["macs"] for c in counts),  # one task needs the whole model
              "seconds": {k: stamp.get(k) for k in ("train_s", "eval_s")}, "commit": git_commit()}
    if "mi" in stamp:  # the Mod-Squad runs: extracted models and I(T;E)
        extraction = read_json(os.path.join(run_dir, "extraction.json"))
        record["extracted"] = {t: {"metrics": e["extracted"]["metrics"], "params": e["extracted"]["params"],
                                   "macs": e["extracted"]["macs"], "kept_experts": e["kept_experts"]}
                               for t, e in extraction.items()}
        record["mi"] = stamp["mi"]
    if os.path.exists(os.path.join(run_dir, "mean_predictor_val.json")):
        record["mean_predictor"] = read_json(os.path.join(run_dir, "mean_predictor_val.json"))
    return record


# -----------------------------------------------------------------------------
# The table, from the records only: per seed, then mean ± std over the seeds

def table_rows(tasks):
    """(task, metric) of every row: each task's primary metric, and normal once more by its mean angle (its official
    L1 of the raw output scores the output's length, which the cosine loss never trains)."""
    return [(t, evaluate.PRIMARY_METRIC[t]) for t in tasks] + ([("normal", "mean_angle_deg")] if "normal" in tasks
                                                                else [])


def seed_results(runs, tasks):
    """One seed's table as plain data, from its runs' records (run name -> record): every column's metric per row,
    its gain over the mean predictor (%), Δm against the single-task models (by the primary metrics, and with normal
    by mean angle), parameters, active MACs, kept experts and I(T;E)."""
    rows = table_rows(tasks)
    key = lambda t, m: f"{t} {m}"  # noqa: E731
    values = {"mean": {key(t, m): runs["modsquad"]["mean_predictor"][t][m] for t, m in rows},
              "single": {key(t, m): runs[f"single_{t}"]["metrics"][t][m] for t, m in rows}}
    for run in ("dense", *MOE_RUNS):
        values[run] = {key(t, m): runs[run]["metrics"][t][m] for t, m in rows}
    for col, run in EXTRACTED_FROM.items():
        values[col] = {key(t, m): runs[run]["extracted"][t]["metrics"][m] for t, m in rows}
    sign = {key(t, m): 1 if evaluate.direction(m) == "↑" else -1 for t, m in rows}
    # gain over the mean predictor: +(M - M_mean) / M_mean × 100 when higher is better, - when lower is
    gain = {col: {k: sign[k] * (v[k] - values["mean"][k]) / values["mean"][k] * 100 for k in v}
            for col, v in values.items() if col != "mean"}

    def delta(metric):  # Δm of every column, each task judged by metric[t]; undefined if a single-task metric is 0
        ks = [key(t, metric[t]) for t in tasks]
        if any(values["single"][k] == 0 for k in ks):
            return {col: None for col in COLUMNS}
        dirs = {k: "↑" if sign[k] > 0 else "↓" for k in ks}
        return {col: None if col == "single" else
                evaluate.delta_m({k: values[col][k] for k in ks}, {k: values["single"][k] for k in ks}, dirs)
                for col in COLUMNS}

    primary = {t: evaluate.PRIMARY_METRIC[t] for t in tasks}
    single = [runs[f"single_{t}"] for t in tasks]
    params_all = {"single": sum(r["params"] for r in single)}
    params_one = {"single": mean(r["params"] for r in single)}
    macs = {"single": mean(r["macs"] for r in single)}
    for run in ("dense", *MOE_RUNS):
        params_all[run] = params_one[run] = runs[run]["params"]
        macs[run] = runs[run]["macs"]
    kept = {}
    for col, run in EXTRACTED_FROM.items():
        small = [runs[run]["extracted"][t] for t in tasks]
        params_all[col], params_one[col] = sum(s["params"] for s in small), mean(s["params"] for s in small)
        macs[col] = mean(s["macs"] for s in small)
        kept[col] = mean(mean(s["kept_experts"]) for s in small)
    mi = {run: mean(runs[run]["mi"]["per_layer"]) for run in MOE_RUNS}
    mi_bound = {run: mean(runs[run]["mi"]["bound"]) for run in MOE_RUNS}
    return {"values": values, "gain_over_mean": gain, "delta_m": delta(primary),
            "delta_m_normal_by_angle": delta({**primary, "normal": "mean_angle_deg"}) if "normal" in tasks else None,
            "params_all_tasks": params_all, "params_one_task": params_one, "macs": macs, "kept_experts_mean": kept,
            "mi": mi, "mi_bound": mi_bound}


def spread(xs):
    """mean, sample standard deviation (None for one value) and the values of one quantity over the seeds."""
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else None, "per_seed": list(xs)}


def over_seeds(per_seed):
    """The per-seed results (a list of equally shaped nested dicts of numbers) as one such dict of spreads."""
    first = per_seed[0]
    if isinstance(first, dict):
        return {k: over_seeds([s[k] for s in per_seed]) for k in first}
    return None if first is None else spread(per_seed)


def verdict(diffs):
    """Whether a difference measured on every seed (paired: the same seed's runs) is claimed: its sign is the same on
    every seed and its mean exceeds its seed-to-seed standard deviation."""
    if len(diffs) < 2:
        return "one seed: no claim"
    s = spread(diffs)
    same_sign = all(d > 0 for d in diffs) or all(d < 0 for d in diffs)
    return "exceeds the spread" if same_sign and abs(s["mean"]) > s["std"] else "within the spread: no claim"


def differences(per_seed, tasks):
    """The comparisons results.md states, each as (what, per-seed values, spread, verdict): Δm of every model against
    the single-task ones, Mod-Squad against its ablations, I(T;E) and kept experts with and without the MI loss, and
    every model's worst task against the mean predictor."""
    by = "delta_m_normal_by_angle" if "normal" in tasks else "delta_m"
    label = " (normal by mean angle)" if "normal" in tasks else ""
    out = []

    def add(what, diffs):
        if all(d is not None for d in diffs):
            out.append({"what": what, "per_seed": diffs, **spread(diffs), "verdict": verdict(diffs)})

    for col in ("dense", "modsquad_nomi", "modsquad", "extracted"):
        add(f"Δm{label} of {COLUMNS[col]} vs single-task", [s[by][col] for s in per_seed])
    for a, b in (("modsquad", "modsquad_nomi"), ("modsquad", "dense"), ("modsquad_nomi", "dense")):
        add(f"Δm{label}: {COLUMNS[a]} − {COLUMNS[b]}", [s[by][a] - s[by][b] for s in per_seed])
    add("I(T;E) per MoE layer (nats): Mod-Squad − w/o MI", [s["mi"]["modsquad"] - s["mi"]["modsquad_nomi"]
                                                           for s in per_seed])
    add("kept experts per MoE layer: extracted Mod-Squad − extracted w/o MI",
        [s["kept_experts_mean"]["extracted"] - s["kept_experts_mean"]["extracted_nomi"] for s in per_seed])
    # normal is judged by its mean angle (table_rows), not by its official L1 of the raw output
    unjudged = {f"normal {evaluate.PRIMARY_METRIC['normal']}"} if "normal" in tasks else set()
    for col in ("single", "dense", "modsquad_nomi", "modsquad"):
        gains = [{k: g for k, g in s["gain_over_mean"][col].items() if k not in unjudged} for s in per_seed]
        worst = [min(g.values()) for g in gains]
        missed = sorted({k.split()[0] for g in gains for k, v in g.items() if v < TARGET_GAIN})
        out.append({"what": f"{COLUMNS[col]}: gain over the mean predictor on its worst task (%), target "
                            f">= {TARGET_GAIN:g}", "per_seed": worst, **spread(worst),
                    "verdict": "meets the target on every seed" if not missed else
                    f"misses the target on some seed: {', '.join(missed)}"})
    return out


def build_results(records, tasks, seeds):
    """Everything results.md shows, as plain data, from the records (key "seed<S>/<run>") of the given seeds."""
    per_seed = [seed_results({name: records[f"seed{s}/{name}"] for name, _, _ in run_specs(tasks, 0)}, tasks)
                for s in seeds]
    first = records[f"seed{seeds[0]}/modsquad"]
    budget = {k: first["settings"][k] for k in BUDGET}
    budget.update(lr=budget["blr"] * budget["batch_size"] / 256, eval_images=first["eval_batches"] *
                  budget["batch_size"])
    used = [records[f"seed{s}/{name}"] for s in seeds for name, _, _ in run_specs(tasks, 0)]
    seconds = {k: sum(r["seconds"][k] or 0 for r in used) / len(seeds) for k in ("train_s", "eval_s")}
    return {"tasks": list(tasks), "seeds": list(seeds), "columns": COLUMNS, "rows": table_rows(tasks),
            "directions": {m: evaluate.direction(m) for _, m in table_rows(tasks)}, "budget": budget,
            "seconds_per_seed": seconds, "table": over_seeds(per_seed), "differences": differences(per_seed, tasks),
            "per_seed": per_seed}


def cell(s, spec):
    """A spread of spread() as the text "mean ± std" (the mean alone for one seed; "—" for none)."""
    if s is None:
        return "—"
    return format(s["mean"], spec) + ("" if s["std"] is None else " ± " + format(s["std"], spec.lstrip("+")))


def default_run_results(records, tasks, seeds):
    """The default run (the Mod-Squad run of each seed: train.py's defaults) over the given seeds, from its records
    alone, so that it is known as soon as those runs are, before the rest of the study: per row its metric, the mean
    predictor's and the gain over it (mean ± std, and the worst seed's), the extracted models' parameters and kept
    experts, and how far an extracted model's metric is from the full model's; I(T;E) per MoE layer."""
    runs = [records[f"seed{s}/modsquad"] for s in seeds]
    rows = []
    official_normal = ("normal", evaluate.PRIMARY_METRIC["normal"])  # judged by its mean angle instead (table_rows)
    for t, m in table_rows(tasks):
        sign = 1 if evaluate.direction(m) == "↑" else -1
        model = [r["metrics"][t][m] for r in runs]
        floor = [r["mean_predictor"][t][m] for r in runs]
        gain = [sign * (a - b) / b * 100 for a, b in zip(model, floor)]  # as seed_results' gain_over_mean
        small = [r["extracted"][t] for r in runs]
        rows.append({"task": t, "metric": m, "judged": (t, m) != official_normal, "model": spread(model),
                     "mean": spread(floor), "gain": spread(gain), "worst_gain": min(gain),
                     "extracted_params_m": spread([x["params"] / 1e6 for x in small]),
                     "kept_experts": spread([mean(x["kept_experts"]) for x in small]),
                     "extracted_vs_full": max(abs(x["metrics"][m] - a) / max(abs(a), 1e-12)
                                              for x, a in zip(small, model))})
    return {"seeds": list(seeds), "params": runs[0]["params"], "rows": rows,
            "misses": [f"{r['task']} {r['metric']}" for r in rows if r["judged"] and r["worst_gain"] < TARGET_GAIN],
            "mi": spread([mean(r["mi"]["per_layer"]) for r in runs]), "mi_bound": mean(runs[0]["mi"]["bound"])}


def format_default_run(d):
    """The default run's section of results.md."""
    seeds = ", ".join(map(str, d["seeds"]))
    lines = [f"## The default run over seeds {seeds}", "",
             f"`python train.py` (the runs seed<S>/modsquad, {d['params'] / 1e6:.3f} M parameters), scored on the "
             "validation scenes of its seed; mean ± standard deviation over the seeds. Gain: the relative "
             "improvement over the mean predictor (+ = better); worst seed: the smallest gain of any seed.", "",
             "| task | metric | Mod-Squad | mean predictor | gain over the mean (%) | worst seed (%) | "
             "extracted params (M) | experts kept per MoE layer, mean |", "|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        lines.append(f"| {r['task']} | {r['metric']} {evaluate.direction(r['metric'])} | {cell(r['model'], '.4f')} | "
                     f"{cell(r['mean'], '.4f')} | {cell(r['gain'], '+.1f')} | {r['worst_gain']:+.1f} | "
                     f"{cell(r['extracted_params_m'], '.3f')} | "
                     f"{cell(r['kept_experts'], '.1f')} |")
    worst = min((r for r in d["rows"] if r["judged"]), key=lambda r: r["worst_gain"])
    lines += ["",
              f"- Target (every task >= {TARGET_GAIN:g} % better than the mean predictor on every seed, normal by "
              f"its mean angle): " + ("met" if not d["misses"] else "missed by " + ", ".join(d["misses"])) +
              f"; the smallest margin is {worst['task']}'s, {worst['worst_gain']:+.1f} % on its worst seed.",
              f"- Extracted models against the full model: the largest relative difference of a metric, over every "
              f"task and seed, is {max(r['extracted_vs_full'] for r in d['rows']):.1e}.",
              f"- I(T;E) per MoE layer: {cell(d['mi'], '.3f')} nats, against its bound log min(T, E) = "
              f"{d['mi_bound']:.3f}.", ""]
    return "\n".join(lines)


def format_markdown(results):
    """results.md: the comparison table (mean ± std over seeds), the gains over the mean predictor, the differences
    and whether each exceeds the spread, and what each row means."""
    cols, b, table, n = list(results["columns"]), results["budget"], results["table"], len(results["seeds"])

    row = lambda label, metric, cells: f"| {label} | {metric} | " + " | ".join(cells) + " |"  # noqa: E731
    seeds = ", ".join(map(str, results["seeds"]))
    lines = ["# Mod-Squad in miniature (synthetic Taskonomy-style scenes)", "",
             f"Every model: {b['steps']} steps of {b['batch_size']} images, lr {b['lr']:.2e} (blr {b['blr']} x "
             f"{b['batch_size']}/256, {b['warmup_steps']} warm-up steps, then cosine); all scored on the same "
             f"{b['eval_images']} validation scenes of their seed. Nothing is tuned per model. Each cell: mean ± "
             f"standard deviation over {n} seed{'s' if n > 1 else ''} ({seeds}); a seed sets the scenes, the "
             "initialisation and the data order.", "",
             f"Wall time per seed (all {len(run_specs(results['tasks'], 0))} runs, the last time each was trained "
             f"or evaluated): training {results['seconds_per_seed']['train_s'] / 60:.1f} min, evaluation "
             f"{results['seconds_per_seed']['eval_s'] / 60:.1f} min.", "",
             row("task", "metric", [results["columns"][c] for c in cols]), "|" + "---|" * (len(cols) + 2)]
    for t, m in results["rows"]:
        lines.append(row(t, f"{m} {results['directions'][m]}", [cell(table["values"][c][f"{t} {m}"], ".4f")
                                                                for c in cols]))
    summary = [("**Δm (%)** vs single-task", "↑", table["delta_m"], "+.2f", 1),
               *([("**Δm (%)**, normal by mean angle", "↑", table["delta_m_normal_by_angle"], "+.2f", 1)]
                 if table.get("delta_m_normal_by_angle") else []),
               ("params (M), serving all tasks", "", table["params_all_tasks"], ".3f", 1e-6),
               ("params (M), serving one task", "", table["params_one_task"], ".3f", 1e-6),
               ("active MACs per task pass (M)", "", table["macs"], ".2f", 1e-6),
               ("kept experts per MoE layer", "", table["kept_experts_mean"], ".2f", 1),
               ("I(T;E) per MoE layer, mean (nats)", "", table["mi"], ".4f", 1),
               ("its bound log min(T,E), mean (nats)", "", table["mi_bound"], ".4f", 1)]
    scaled = lambda s, f: None if s is None else {  # noqa: E731
        "mean": s["mean"] * f, "std": None if s["std"] is None else s["std"] * f}
    for label, metric, values, spec, factor in summary:
        lines.append(row(label, metric, [cell(scaled(values.get(c), factor), spec) for c in cols]))
    gain_cols = [c for c in cols if c in table["gain_over_mean"]]
    lines += ["", f"Gain over the mean predictor (%; + = better; target >= {TARGET_GAIN:g} on every task):", "",
              row("task", "metric", [results["columns"][c] for c in gain_cols]), "|" + "---|" * (len(gain_cols) + 2)]
    for t, m in results["rows"]:
        lines.append(row(t, m, [cell(table["gain_over_mean"][c][f"{t} {m}"], "+.1f") for c in gain_cols]))
    lines += ["", "Differences, paired by seed (claimed only when every seed has the same sign and the mean exceeds "
              "the standard deviation):", "", "| difference | per seed | mean ± std | verdict |", "|---|---|---|---|"]
    for d in results["differences"]:
        lines.append(f"| {d['what']} | {', '.join(f'{x:+.2f}' for x in d['per_seed'])} | {cell(d, '+.2f')} | "
                     f"{d['verdict']} |")
    lines += [
        "",
        "- Δm = (1/T) Σ_t ±(M_t − M_t,single) / M_t,single × 100, + when higher is better (evaluate.delta_m), per "
        "seed against that seed's single-task models; undefined (—) if a single-task metric is 0.",
        "- mean predictor: every task predicts its mean training target whatever the image (evaluate.MeanPredictor, "
        f"means over {b['eval_images']} training scenes), the floor any model must beat; its Δm is how far the "
        "single-task models are above it (negative: they beat it).",
        "- params, heads included: single-task = the sum (all tasks) or the mean (one task) of the T single-task "
        "models; a multi-task model needs all of its parameters even for one task; extracted = the sum or the mean "
        "of the T extracted models.",
        "- active MACs: backbone and routers of one task pass per image, heads excluded "
        "(modsquad.count_params_flops), mean over tasks.",
        "- kept experts: the experts chosen by more than 3 % of a task's validation tokens "
        "(evaluate.py --extract all), mean over tasks and MoE layers.",
        "- I(T;E): mutual information between task and expert in the final model, from the soft router "
        "probabilities on the validation images (P(t) uniform), averaged over the MoE layers.",
        "",
        f"Task × expert usage of seed {results['seeds'][0]} (the fraction of a task's validation tokens that chose "
        "each expert, per MoE layer):",
        "", "![Mod-Squad](expert_usage_modsquad.png)", "", "![Mod-Squad w/o MI](expert_usage_modsquad_nomi.png)", ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"a tiny budget: {QUICK['steps']} steps of "
                   f"{QUICK['batch_size']} images, tasks {QUICK['tasks']}, {QUICK['seeds']} seed, "
                   f"{QUICK['eval_images']} validation scenes (flags given here win)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3)")
    p.add_argument("--first-seed", type=int, default=0, help="the seeds are first-seed, first-seed + 1, ...")
    p.add_argument("--out", default=None, help="folder of the run directories (default runs/reproduce, "
                                               "runs/reproduce_quick with --quick)")
    p.add_argument("--results", default=None, help="folder of results.json and results.md (default "
                                                   "results/reproduce; with --quick the --out folder)")
    p.add_argument("--steps", type=int, default=None, help=f"training steps of every run (default {BUDGET['steps']}, "
                                                           "train.py's)")
    p.add_argument("--batch-size", type=int, default=None, help=f"images per step of every run (default "
                                                                f"{BUDGET['batch_size']})")
    p.add_argument("--blr", type=float, default=None, help=f"base lr of every run (default {BUDGET['blr']})")
    p.add_argument("--warmup-steps", type=int, default=None, help=f"warm-up steps (default {BUDGET['warmup_steps']})")
    p.add_argument("--tasks", default=None, help="comma-separated tasks (default: all 13)")
    p.add_argument("--eval-images", type=int, default=None, help=f"validation scenes per evaluation (default "
                                                                 f"{EVAL_IMAGES}), a multiple of the batch size")
    p.add_argument("--table-only", action="store_true", help="write the table from the recorded runs, train nothing")
    p.add_argument("--force", action="store_true", help="redo every run instead of reusing finished ones")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at the same time, the cores shared out between "
                   "them (default 1: one run on every core)")
    args = p.parse_args(argv)
    defaults = {**BUDGET, "tasks": ",".join(evaluate.TASKONOMY_TASKS), "seeds": 3, "eval_images": EVAL_IMAGES,
                **(QUICK if args.quick else {})}
    for k, v in defaults.items():
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    # absolute: the subprocesses run in this file's folder
    out = os.path.abspath(args.out or os.path.join("runs", "reproduce_quick" if args.quick else "reproduce"))
    results_dir = os.path.abspath(args.results or (out if args.quick else os.path.join("results", "reproduce")))
    tasks = [t for t in evaluate.TASKONOMY_TASKS if t in args.tasks.split(",")]  # the official order
    unknown = set(args.tasks.split(",")) - set(tasks)
    if unknown or len(tasks) < 2:
        p.error(f"--tasks: need at least 2 of {', '.join(evaluate.TASKONOMY_TASKS)} (unknown: {sorted(unknown)})")
    if args.seeds < 1 or args.eval_images % args.batch_size or args.eval_images < args.batch_size:
        p.error(f"need --seeds >= 1 and --eval-images a multiple of --batch-size {args.batch_size}")
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1 (got {args.jobs})")
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    eval_batches = args.eval_images // args.batch_size
    os.makedirs(results_dir, exist_ok=True)
    results_path = os.path.join(results_dir, "results.json")
    records = {} if args.force or not os.path.exists(results_path) else read_json(results_path)["records"]

    def save(**extra):
        write_json({"records": dict(sorted(records.items())), **extra}, results_path)

    t0 = time.time()
    specs = run_specs(tasks, eval_batches)
    budget = {k: getattr(args, k) for k in BUDGET}
    # Mod-Squad first, on every seed, then its ablations, then the single-task runs: a study stopped early has the
    # default run's spread over the seeds first
    runs = [(f"seed{s}/{name}", run_settings(budget, s, settings), eval_flags)
            for name, settings, eval_flags in specs[::-1] for s in seeds]
    recorded = lambda key, expected: (key in records and records[key]["settings"] == expected  # noqa: E731
                                      and records[key]["eval_batches"] == eval_batches)
    todo = [] if args.table_only else [r for r in runs if not recorded(*r[:2])]
    # --jobs N: N runs at once, each subprocess on its share of the cores (on 2 cores two one-thread runs finish
    # sooner than one after the other on two threads: a small model keeps two threads waiting on each other)
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    if threads:
        torch.set_num_threads(threads)  # measure_mi runs here, beside the other jobs
    # runs that read every training scene share them (train.py --scene-cache: the split rendered once per seed, the
    # same tensors); shorter runs render the few they read
    scene_cache = os.path.join(out, "scenes") if args.steps * args.batch_size >= TRAIN_SCENES else None
    lock = threading.Lock()

    def train_one(i, key, expected, eval_flags):
        run_dir = os.path.join(out, key)
        print(f"run {i + 1} of {len(todo)}: {key}", flush=True)
        train_and_evaluate(run_dir, key.split("/")[1], expected, eval_flags, eval_batches, args.force,
                           scene_cache=scene_cache, threads=threads)
        with lock:
            records[key] = run_record(run_dir, expected, eval_batches)
            save()

    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:  # threads: each waits on its subprocesses
        futures = [pool.submit(train_one, i, *job) for i, job in enumerate(todo)]
        try:
            for future in futures:
                future.result()
        except BaseException:  # a failed run (or Ctrl-C) stops the study; the running ones finish and are recorded
            for future in futures:
                future.cancel()
            raise
    for run in MOE_RUNS:  # the heatmaps of the first seed
        usage = os.path.join(out, f"seed{seeds[0]}", run, "expert_usage.png")
        if os.path.exists(usage):
            shutil.copyfile(usage, os.path.join(results_dir, f"expert_usage_{run}.png"))
    complete = [s for s in seeds if all(f"seed{s}/{name}" in records for name, _, _ in specs)]
    default_seeds = [s for s in seeds if f"seed{s}/modsquad" in records]
    if not default_seeds:
        sys.exit(f"no seed of {seeds} has its Mod-Squad run recorded in {results_path}; run without --table-only")
    default_run = default_run_results(records, tasks, default_seeds)
    if complete:
        if complete != seeds:
            print(f"seeds {sorted(set(seeds) - set(complete))} are incomplete: the table has seeds {complete}")
        results = build_results(records, tasks, complete)
        markdown = format_markdown(results) + "\n" + format_default_run(default_run)
        save(results={k: v for k, v in results.items() if k != "per_seed"}, per_seed=results["per_seed"],
             default_run=default_run)
    else:  # a study under way: the default run's spread is known first (its runs go first)
        done = sum(k.split("/")[0] in {f"seed{s}" for s in seeds} for k in records)
        markdown = (f"# Mod-Squad in miniature (synthetic Taskonomy-style scenes)\n\nThe study is under way: runs "
                    f"recorded {done} of {len(specs) * len(seeds)}, and no seed has all {len(specs)} yet; the "
                    "comparison table follows when one has.\n\n" + format_default_run(default_run))
        save(default_run=default_run)
    with open(os.path.join(results_dir, "results.md"), "w") as f:
        f.write(markdown)
    print(f"\n{markdown}\nwrote {results_dir}/results.md and results.json in {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
