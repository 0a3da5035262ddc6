"""train.py and evaluate.py as a user runs them: smoke runs, learning, baselines, resume, DDP, bad input."""
import json
import os
import runpy
import signal
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = {"--batch-size": "4", "--train-length": "64", "--val-length": "8", "--log-interval": "1", "--eval-batches": "1",
         "--tasks": "class_object,depth_euclidean,normal"}  # an image task, a masked dense task, the cosine loss


def flags(**overrides):
    """SMALL with overrides (--no-moe style names as no_moe=True, value None removes a flag)."""
    merged = {**SMALL, **{"--" + k.replace("_", "-"): v for k, v in overrides.items()}}
    return [x for k, v in merged.items() if v is not None and v is not False for x in ([k] if v is True else [k, v])]


FAST = flags()


def run(*args, env=None, check=True):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def params(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)["model"]


def test_train_smoke_run_writes_run_dir_and_evaluate_reads_it(tmp_path):
    out = str(tmp_path / "run")
    proc = run("train.py", "--steps", "2", "--out-dir", out, *flags(tasks=None))  # all 13 tasks
    for name in ("config.json", "log.jsonl", "ckpt.pt", "metrics_val.json", "extraction.json", "expert_usage.png"):
        assert os.path.exists(os.path.join(out, name)), name
    assert "kept experts" in proc.stdout and "depth_euclidean" in proc.stdout
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)  # plain data only
    assert ckpt["step"] == 2 and ckpt["config"]["moe"] is True
    proc = run("evaluate.py", out, "--max-batches", "1")
    assert "normal" in proc.stdout


def test_default_configuration_learns(tmp_path):
    """A short run of the default model on the synthetic scenes lowers the task losses clearly."""
    out = str(tmp_path / "run")
    run("train.py", "--steps", "40", "--warmup-steps", "4", "--blr", "0.064", "--out-dir", out, "--no-final-eval",
        *flags(tasks="depth_euclidean,normal,segment_unsup25d"))
    log = [r for r in map(json.loads, open(os.path.join(out, "log.jsonl"))) if "task_losses" in r]
    first = sum(sum(r["task_losses"].values()) for r in log[:5])
    last = sum(sum(r["task_losses"].values()) for r in log[-5:])
    assert last < 0.8 * first, (first, last)


@pytest.mark.slow
def test_default_run_beats_the_mean_predictor_on_every_task(tmp_path):
    """`python train.py` as a user runs it (the default recipe), on a seed no README table comes from: the primary
    metric (normal: mean angle) beats the mean predictor on every one of the 13 tasks, by >= 10 % relative on all but
    class_object. class_object misses that 10 % target on this seed (+4.3 %; README, issue 13): its gain is the least
    stable of the 13, so here it only has to beat the mean predictor. About 17 minutes on 2 free cores."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "train.py", "--out-dir", str(out), "--seed", "123"], cwd=ROOT,
                          capture_output=True, text=True, timeout=3600, env={**os.environ, "TQDM_DISABLE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((out / "metrics_val.json").read_text())
    mean = json.loads((out / "mean_predictor_val.json").read_text())
    assert len(saved["metrics"]) == 13
    gains = {}
    for task, metrics in saved["metrics"].items():
        metric = "mean_angle_deg" if task == "normal" else saved["primary"][task]
        sign = 1 if saved["directions"][metric] == "↑" else -1
        gains[task] = sign * (metrics[metric] - mean[task][metric]) / mean[task][metric] * 100
    assert min(gains.values()) > 0, gains
    assert min(g for task, g in gains.items() if task != "class_object") >= 10, gains


# each case starts a train.py process (~10 s on a 2-core machine, most of it importing torch and torchvision): the
# dense baseline in the default suite, the rest slow
@pytest.mark.parametrize("overrides", [dict(no_moe=True)] + [
    pytest.param(o, marks=pytest.mark.slow) for o in (dict(tasks="normal"), dict(mi_weight="0"),
                                                      dict(dataset="synthetic-pascal", tasks=None))])
def test_baselines_and_ablations_run(tmp_path, overrides):
    out = str(tmp_path / "run")
    run("train.py", "--steps", "2", "--out-dir", out, "--no-final-eval", *flags(**overrides))
    cfg = json.load(open(os.path.join(out, "config.json")))["model"]
    assert cfg["moe"] == (not overrides.get("no_moe"))
    assert cfg["mi_weight"] == float(overrides.get("mi_weight", 0.005))
    assert len(cfg["tasks"]) == {"normal": 1, None: 5}.get(overrides.get("tasks", ""), 3)


def test_resume_is_exact(tmp_path):
    """Stopped at step 3 and resumed, a run ends bit-identical to an uninterrupted one (model, optimizer, schedule,
    data order, RNG with drop-path active, loss weights). The resumed run trains on scenes it shares through
    --scene-cache (its first half renders them into the folder, its second half reads them): the same tensors."""
    common = ["--steps", "6", "--no-final-eval", "--drop-path", "0.2", *FAST]
    cached = ["--scene-cache", str(tmp_path / "scenes")]
    run("train.py", "--out-dir", str(tmp_path / "a"), *common)
    run("train.py", "--out-dir", str(tmp_path / "b"), "--stop-at", "3", *common, *cached)
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["step"] == 3
    assert os.listdir(tmp_path / "scenes") == ["taskonomy_train_seed0_64x32px.pt"]
    run("train.py", "--out-dir", str(tmp_path / "b"), "--resume", *common, *cached)
    a, b = params(tmp_path / "a"), params(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # the layer-level equalities (outputs, every gradient) are in tests/test_model_onepass.py
def test_one_call_training_equals_the_per_task_loop(tmp_path):
    """A few training steps with all tasks in one backbone call reach the parameters of the per-task loop
    (train.py --task-loop), up to fp32 summation order."""
    common = ["--steps", "3", "--no-final-eval", "--mi-weight", "1.0", *FAST]
    run("train.py", "--out-dir", str(tmp_path / "loop"), "--task-loop", *common)
    run("train.py", "--out-dir", str(tmp_path / "one"), *common)
    a, b = params(tmp_path / "loop"), params(tmp_path / "one")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_resume_refuses_a_different_config(tmp_path):
    out = str(tmp_path / "run")
    run("train.py", "--steps", "1", "--out-dir", out, "--no-final-eval", *FAST)
    proc = run("train.py", "--steps", "2", "--out-dir", out, "--resume", "--no-moe", "--no-final-eval", *FAST,
               check=False)
    assert proc.returncode != 0 and "moe" in proc.stderr and "different config" in proc.stderr


@pytest.mark.parametrize("overrides,message", [
    (dict(tasks="depth,normal"), "unknown task 'depth'"),
    pytest.param(dict(img_size="30"), "not a multiple of patch_size", marks=pytest.mark.slow),
    pytest.param(dict(batch_size="100"), "lower --batch-size", marks=pytest.mark.slow),
    (dict(dataset="taskonomy", data_root="/nonexistent/taskonomy", tasks=None), "/nonexistent/taskonomy"),
])
def test_bad_input_gives_one_clear_error_and_no_output(tmp_path, overrides, message):
    out = tmp_path / "run"
    proc = run("train.py", "--out-dir", str(out), "--steps", "1", *flags(**overrides), check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not out.exists()


def test_nan_loss_stops_naming_step_and_task_and_keeps_last_checkpoint(tmp_path, monkeypatch, capsys):
    import evaluate

    calls = {"n": 0}
    real_loss = evaluate.task_loss

    def poisoned(name, *a, **k):
        calls["n"] += 1
        loss = real_loss(name, *a, **k)
        return loss * float("nan") if name == "normal" and calls["n"] > 3 else loss  # 3 tasks: step 1

    monkeypatch.setattr(evaluate, "task_loss", poisoned)
    out = tmp_path / "run"
    with pytest.raises(SystemExit):
        run_in_process(monkeypatch, out, "--steps", "3", "--ckpt-interval", "1")
    err = capsys.readouterr().err
    assert "non-finite loss at step 1 in normal" in err
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 1


@pytest.mark.slow
def test_dry_run_of_the_vit_b_preset(tmp_path):
    proc = run("train.py", "--recipe", "taskonomy-base", "--dry-run", "--out-dir", str(tmp_path / "run"))
    assert "206.96M parameters" in proc.stdout


@pytest.mark.slow
def test_dry_run_of_the_vit_s_pascal_recipe(tmp_path):
    proc = run("train.py", "--recipe", "pascal-small", "--dry-run", "--img-size", "64", "--out-dir",
               str(tmp_path / "run"))
    assert "5 tasks" in proc.stdout


def run_in_process(monkeypatch, out, *extra):
    monkeypatch.setattr(sys, "argv", ["train.py", "--out-dir", str(out), "--no-final-eval", *FAST, *extra])
    monkeypatch.chdir(ROOT)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        runpy.run_path(os.path.join(ROOT, "train.py"), run_name="__main__")
    finally:  # a run stopped by an error leaves its save-on-signal handlers installed: give pytest its own back
        for s, handler in handlers.items():
            signal.signal(s, handler)


def test_out_of_memory_suggests_the_batch_size_flag(tmp_path, monkeypatch, capsys):
    import evaluate

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(evaluate, "task_loss", oom)
    with pytest.raises(SystemExit):
        run_in_process(monkeypatch, tmp_path / "run", "--steps", "1")
    assert "out of GPU memory with --batch-size 4; lower it" in capsys.readouterr().err


def test_a_kill_while_saving_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """Checkpoints are written to a temporary file and renamed: dying inside torch.save keeps the last one whole."""
    saves = {"n": 0}
    real_save = torch.save

    def dying_save(obj, path, *a, **k):
        saves["n"] += 1
        if saves["n"] == 2:  # the second checkpoint: write half a file, then die
            open(path, "wb").write(b"PK\x03\x04 half a checkpoint")
            raise KeyboardInterrupt
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        run_in_process(monkeypatch, tmp_path / "run", "--steps", "3", "--ckpt-interval", "1")
    from tqdm import tqdm

    for bar in list(tqdm._instances):  # the killed run's progress bar, closed here rather than at exit
        bar.close()
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 1


def test_a_corrupt_file_met_during_training_stops_with_its_path(tmp_path, monkeypatch, capsys):
    import data

    def corrupt(self, i):
        raise ValueError(f"cannot decode /data/rgb/point_{i}.png: the file is truncated or corrupt; re-download it")

    monkeypatch.setattr(data.SyntheticScenes, "__getitem__", corrupt)
    with pytest.raises(SystemExit):
        run_in_process(monkeypatch, tmp_path / "run", "--steps", "1")
    assert "error: cannot decode /data/rgb/point_" in capsys.readouterr().err
