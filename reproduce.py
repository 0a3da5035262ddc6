"""
The paper in miniature: single-task baselines, a dense multi-task baseline, Mod-Squad without and with the MI loss,
and the extracted per-task models, trained with the same budget on the synthetic 13-task scenes and compared in
one table. One command, re-runnable: finished runs are reused and an interrupted training resumes.

    python reproduce.py                  # 13 tasks, 400 steps of 32 images per model: about 40 min on 2 free cores
    python reproduce.py --quick          # 3 tasks, 30 steps of 8 images: a few minutes
    python reproduce.py --force          # redo every run

Runs under --out, each `train.py --no-final-eval` then `evaluate.py --max-batches` (subprocesses, logs in the run dir):
    single_<task>    the default model trained on one task (T = 1): the single-task baseline of that task
    dense            the dense multi-task baseline (train.py --no-moe: the same active MACs per task pass)
    modsquad_nomi    Mod-Squad without the MI loss (--mi-weight 0), experts extracted (evaluate.py --extract all)
    modsquad         Mod-Squad (defaults), experts extracted
Every run gets the same steps, batch size, lr, seed and image size; nothing is tuned per model. Writes results.md,
results.json and the task x expert usage heatmaps of the two Mod-Squad runs into --out, and prints the table. A
mean-predictor column (each task predicts its mean training target) shows the floor every model must beat.
"""

import argparse
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import time

import torch

import evaluate
from modsquad import ModSquad, ModSquadConfig, count_params_flops, mutual_information_loss, task_expert_joint

HERE = os.path.dirname(os.path.abspath(__file__))
QUICK = dict(steps=30, batch_size=8, tasks="class_object,depth_euclidean,normal")
MEAN_BATCHES = 8  # training batches whose mean target the mean predictor (the floor) predicts
# table columns: key, heading. The mean predictor and the two extracted columns come from the evaluations of
# modsquad and modsquad_nomi (mean_predictor_val.json, extraction.json)
COLUMNS = {"mean": "mean predictor", "single": "single-task", "dense": "dense MTL",
           "modsquad_nomi": "Mod-Squad w/o MI", "modsquad": "Mod-Squad", "extracted": "extracted Mod-Squad",
           "extracted_nomi": "extracted w/o MI"}
EXTRACTED_FROM = {"extracted": "modsquad", "extracted_nomi": "modsquad_nomi"}
MOE_RUNS = ("modsquad_nomi", "modsquad")


def run_specs(tasks):
    """(run name, its own train.py settings, its extra evaluate.py flags) of every run, the single-task runs first.
    Experts are extracted (and I(T;E) measured) for the two Mod-Squad runs; the mean predictor is scored once."""
    mtl, extract = ",".join(tasks), ["--extract", "all"]
    return [(f"single_{t}", dict(tasks=t), []) for t in tasks] + [
        ("dense", dict(tasks=mtl, no_moe=True), []), ("modsquad_nomi", dict(tasks=mtl, mi_weight=0.0), extract),
        ("modsquad", dict(tasks=mtl), extract + ["--mean-baseline", str(MEAN_BATCHES)])]


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


# -----------------------------------------------------------------------------
# Running train.py and evaluate.py

def run_logged(cmd, log_path):
    """Run cmd (a list, in this folder) with its output in log_path; on failure print the log's tail and stop."""
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=HERE, stdout=log, stderr=subprocess.STDOUT)
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


def train_and_evaluate(out, name, settings, eval_flags, args):
    """Train one run (or resume, or reuse it) and evaluate it; bookkeeping in <run>/reproduce.json."""
    run_dir = os.path.join(out, name)
    if args.force and os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    expected = {"steps": args.steps, "batch_size": args.batch_size, "seed": args.seed, "no_moe": False,
                "mi_weight": None, **settings}
    # --name value per setting, a bare --name for True, nothing for None or False (but --mi-weight 0 is passed)
    flags = [x for k, v in expected.items() if v is not None and v is not False
             for x in (["--" + k.replace("_", "-")] + ([] if v is True else [str(v)]))]
    step = trained_step(run_dir, expected)
    if step is None and os.path.isdir(run_dir):  # killed before its first checkpoint: start clean (log.jsonl appends)
        shutil.rmtree(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    stamp_path = os.path.join(run_dir, "reproduce.json")
    stamp = read_json(stamp_path) if os.path.exists(stamp_path) else {}
    if step != args.steps:
        print(f"{name}: training{f' (resuming at step {step})' if step else ''} ...", end=" ", flush=True)
        t0 = time.time()
        run_logged([sys.executable, "train.py", "--out-dir", run_dir, "--no-final-eval", *flags,
                    *(["--resume"] if step else [])], os.path.join(run_dir, "train.log"))
        stamp = {"train_s": time.time() - t0, "resumed_at": step}
        write_json(stamp, stamp_path)
        print(f"{stamp['train_s']:.0f} s", flush=True)
    evaluated = {"step": args.steps, "eval_batches": args.eval_batches, "flags": eval_flags}
    if stamp.get("evaluated") != evaluated:
        print(f"{name}: evaluating ...", end=" ", flush=True)
        t0 = time.time()
        run_logged([sys.executable, "evaluate.py", run_dir, "--max-batches", str(args.eval_batches), *eval_flags],
                   os.path.join(run_dir, "evaluate.log"))
        if "--extract" in eval_flags:
            stamp["mi"] = measure_mi(run_dir, args.eval_batches)
        stamp.update(eval_s=time.time() - t0, evaluated=evaluated)
        write_json(stamp, stamp_path)
        print(f"{stamp['eval_s']:.0f} s", flush=True)
    else:
        print(f"{name}: done before, reused", flush=True)


# -----------------------------------------------------------------------------
# The table, from the run directories' JSON files only

def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs)


def build_results(out, tasks):
    """Everything results.md shows, as plain data: per-task primary metrics of every column, Δm against the
    single-task models, parameters, active MACs, kept experts and I(T;E)."""
    runs = {name: os.path.join(out, name) for name, _, _ in run_specs(tasks)}
    metrics = lambda run: read_json(os.path.join(runs[run], "metrics_val.json"))["metrics"]
    config = lambda run: ModSquadConfig.from_dict(read_json(os.path.join(runs[run], "config.json"))["model"])
    primary = {t: evaluate.PRIMARY_METRIC[t] for t in tasks}
    directions = {t: evaluate.direction(primary[t]) for t in tasks}
    extraction = {col: read_json(os.path.join(runs[run], "extraction.json")) for col, run in EXTRACTED_FROM.items()}

    mean_predictor = read_json(os.path.join(runs["modsquad"], "mean_predictor_val.json"))

    def column_values(metric):  # metric[t]: the metric that judges task t
        values = {"mean": {t: mean_predictor[t][metric[t]] for t in tasks},
                  "single": {t: metrics(f"single_{t}")[t][metric[t]] for t in tasks}}
        for run in ("dense", *MOE_RUNS):
            values[run] = {t: metrics(run)[t][metric[t]] for t in tasks}
        for col in EXTRACTED_FROM:
            values[col] = {t: extraction[col][t]["extracted"]["metrics"][metric[t]] for t in tasks}
        # Δm is a relative change: undefined when a single-task metric is 0 (top-1 of a barely trained classifier)
        defined = all(values["single"][t] != 0 for t in tasks)
        dirs = {t: evaluate.direction(metric[t]) for t in tasks}
        delta = {col: evaluate.delta_m(values[col], values["single"], dirs) if col != "single" and defined else None
                 for col in COLUMNS}
        return values, delta

    values, delta = column_values(primary)
    # the official normal metric (L1 of the raw output) scores a length the cosine loss never trains: Δm again with
    # normal judged by its mean angular error
    delta_angle = column_values({**primary, "normal": "mean_angle_deg"})[1] if "normal" in tasks else None

    # parameters to serve all T tasks and to serve one; active MACs per task pass (heads excluded, as counted there)
    single = [count_params_flops(config(f"single_{t}"), 0) for t in tasks]
    params_all = {"single": sum(c["params"] for c in single)}
    params_one = {"single": mean(c["params"] for c in single)}
    macs = {"single": mean(c["macs"] for c in single)}
    for run in ("dense", *MOE_RUNS):
        counts = [count_params_flops(config(run), i) for i in range(len(tasks))]
        params_all[run] = params_one[run] = counts[0]["params"]  # one task needs the whole model
        macs[run] = mean(c["macs"] for c in counts)
    kept = {}
    for col in EXTRACTED_FROM:
        small = [extraction[col][t]["extracted"] for t in tasks]
        params_all[col], params_one[col] = sum(s["params"] for s in small), mean(s["params"] for s in small)
        macs[col] = mean(s["macs"] for s in small)
        kept[col] = mean(mean(extraction[col][t]["kept_experts"]) for t in tasks)
    cfg = config("modsquad")
    experts = [cfg.num_attn_experts if kind == "attn" else cfg.num_mlp_experts for kind in cfg.moe_layer_kinds()]

    stamps = {run: read_json(os.path.join(path, "reproduce.json")) for run, path in runs.items()}
    mi = {run: {**stamps[run]["mi"], "mean": mean(stamps[run]["mi"]["per_layer"]),
                "bound_mean": mean(stamps[run]["mi"]["bound"])} for run in MOE_RUNS}
    train_args = read_json(os.path.join(runs["modsquad"], "config.json"))["args"]
    budget = {k: train_args[k] for k in ("steps", "batch_size", "blr", "seed", "warmup_steps", "preset")}
    budget.update(lr=train_args["blr"] * train_args["batch_size"] / 256, img_size=cfg.img_size)
    return {"tasks": list(tasks), "columns": COLUMNS, "primary": primary, "directions": directions, "values": values,
            "delta_m": delta, "delta_m_normal_by_angle": delta_angle, "params_all_tasks": params_all, "params_one_task": params_one, "macs": macs,
            "kept_experts_mean": kept, "experts_mean": mean(experts), "mi": mi, "budget": budget,
            "seconds": {run: {k: s.get(k) for k in ("train_s", "eval_s")} for run, s in stamps.items()}}


def format_markdown(results):
    """results.md: the comparison table, its summary rows and what each row means."""
    cols, b, mi = list(results["columns"]), results["budget"], results["mi"]
    cell = lambda v, spec: "—" if v is None else format(v, spec)
    row = lambda label, metric, cells: f"| {label} | {metric} | " + " | ".join(cells) + " |"
    lines = ["# Mod-Squad in miniature (synthetic Taskonomy-style scenes)", "",
             f"Every model: {b['steps']} steps of {b['batch_size']} images, lr {b['lr']:.2e} (blr {b['blr']} x "
             f"{b['batch_size']}/256, {b['warmup_steps']} warm-up steps, then cosine), seed {b['seed']}, "
             f"{b['img_size']} px, preset `{b['preset']}`; all scored on the same validation images. "
             "Nothing is tuned per model.", "",
             "Wall time of the runs (the last time each was trained or evaluated): training "
             f"{sum(s['train_s'] or 0 for s in results['seconds'].values()) / 60:.1f} min, evaluation "
             f"{sum(s['eval_s'] or 0 for s in results['seconds'].values()) / 60:.1f} min.", "",
             row("task", "metric", [results["columns"][c] for c in cols]), "|" + "---|" * (len(cols) + 2)]
    for t in results["tasks"]:
        lines.append(row(t, f"{results['primary'][t]} {results['directions'][t]}",
                         [cell(results["values"][c][t], ".4f") for c in cols]))
    summary = [
        ("**Δm (%)** vs single-task", "↑", results["delta_m"], "+.2f"),
        *([("Δm (%), normal by mean angle", "↑", results["delta_m_normal_by_angle"], "+.2f")]
          if results.get("delta_m_normal_by_angle") else []),
        ("params (M), serving all tasks", "", {c: v / 1e6 for c, v in results["params_all_tasks"].items()}, ".3f"),
        ("params (M), serving one task", "", {c: v / 1e6 for c, v in results["params_one_task"].items()}, ".3f"),
        ("active MACs per task pass (M)", "", {c: v / 1e6 for c, v in results["macs"].items()}, ".2f"),
        (f"kept experts per MoE layer (of {results['experts_mean']:g})", "", results["kept_experts_mean"], ".2f"),
        ("I(T;E) per MoE layer, mean (nats)", "", {c: m["mean"] for c, m in mi.items()}, ".4f"),
        ("its bound log min(T,E), mean (nats)", "", {c: m["bound_mean"] for c, m in mi.items()}, ".4f"),
    ]
    for label, metric, values, spec in summary:
        lines.append(row(label, metric, [cell(values.get(c), spec) for c in cols]))
    lines += [
        "",
        "- Δm = (1/T) Σ_t ±(M_t − M_t,single) / M_t,single × 100, + when higher is better (evaluate.delta_m); "
        "undefined (—) if a single-task metric is 0.",
        "- mean predictor: every task predicts its mean training target whatever the image (evaluate.MeanPredictor, "
        f"means over {MEAN_BATCHES} training batches), the floor any model must beat; its Δm is how far the "
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
        "Task × expert usage (the fraction of a task's validation tokens that chose each expert, per MoE layer):",
        "", "![Mod-Squad](expert_usage_modsquad.png)", "", "![Mod-Squad w/o MI](expert_usage_modsquad_nomi.png)", ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"a tiny budget: {QUICK['steps']} steps, batch "
                   f"{QUICK['batch_size']}, tasks {QUICK['tasks']} (flags given here win)")
    p.add_argument("--out", default=None, help="folder of the runs and the table (default runs/reproduce, "
                                               "runs/reproduce_quick with --quick)")
    p.add_argument("--steps", type=int, default=None, help="training steps of every run (default 400, train.py's)")
    p.add_argument("--batch-size", type=int, default=None, help="images per step of every run (default 32)")
    p.add_argument("--tasks", default=None, help="comma-separated tasks (default: all 13)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches (of --batch-size) per evaluation")
    p.add_argument("--force", action="store_true", help="redo every run instead of reusing finished ones")
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else dict(steps=400, batch_size=32, tasks=",".join(evaluate.TASKONOMY_TASKS))
    for k, v in defaults.items():
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    # absolute: the subprocesses run in this file's folder
    out = os.path.abspath(args.out or os.path.join("runs", "reproduce_quick" if args.quick else "reproduce"))
    tasks = [t for t in evaluate.TASKONOMY_TASKS if t in args.tasks.split(",")]  # the official order
    unknown = set(args.tasks.split(",")) - set(tasks)
    if unknown or len(tasks) < 2:
        p.error(f"--tasks: need at least 2 of {', '.join(evaluate.TASKONOMY_TASKS)} (unknown: {sorted(unknown)})")

    t0 = time.time()
    specs = run_specs(tasks)
    for i, (name, settings, eval_flags) in enumerate(specs):
        print(f"[{i + 1}/{len(specs)}] ", end="")
        train_and_evaluate(out, name, settings, eval_flags, args)
    for run in MOE_RUNS:
        shutil.copyfile(os.path.join(out, run, "expert_usage.png"), os.path.join(out, f"expert_usage_{run}.png"))
    results = build_results(out, tasks)
    markdown = format_markdown(results)
    write_json(results, os.path.join(out, "results.json"))
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown)
    print(f"\n{markdown}\nwrote {out}/results.md and results.json in {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
