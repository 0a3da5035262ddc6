"""train.py and evaluate.py as a cluster run uses them: DDP, gradient accumulation, preemption, long-run checkpoints
and validation, evaluation with the usage counted in the same pass."""
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

import evaluate
from modsquad import SYNTHETIC_TASKS, ModSquad, expert_usage
from test_evaluate import fake_loader, make_run
from test_train import FAST, ROOT, SMALL, flags, run, run_in_process

# tasks without validity masks: a masked mean over a batch is not the mean of its halves' masked means, so masked
# tasks make 2 x 4 images differ from 8 (on purpose: each micro-batch's loss is its own masked mean)
UNMASKED = "class_object,principal_curvature,reshading"


def checkpoint(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)


def assert_same_training_state(a, b, rtol):
    """Model parameters, uncertainty weights σ and every AdamW state tensor of checkpoints a and b agree to rtol
    (relative to each tensor's norm, so that the tiny second moments count as much as the weights)."""
    pairs = [(f"model.{k}", a["model"][k], b["model"][k]) for k in a["model"]]
    pairs.append(("sigma", a["loss_weights"]["sigma"], b["loss_weights"]["sigma"]))
    for i, state in a["optimizer"]["state"].items():
        pairs += [(f"optimizer.{i}.{k}", v, b["optimizer"]["state"][i][k]) for k, v in state.items()]
    for name, x, y in pairs:
        x, y = x.double(), y.double()
        assert torch.linalg.norm(x - y) <= rtol * torch.linalg.norm(x) + 1e-30, name


def test_ddp_two_processes_match_one_process(tmp_path):
    """2 gloo processes of 2 images x 2 micro-steps reach the model, σ and AdamW state of 1 process of 4 images x 2
    micro-steps at the default lr, no warmup: σ's gradient is averaged over ranks, the MI loss sees the micro-batch
    of both ranks. Each rank draws its own drop-path stream; the run dir is written once."""
    common = ["--steps", "3", "--warmup-steps", "0", "--no-final-eval", "--mi-weight", "1.0", "--accum-steps", "2"]
    run("train.py", "--out-dir", str(tmp_path / "one"), *common, *flags(batch_size="4", tasks=UNMASKED))
    run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
        "--out-dir", str(tmp_path / "two"), *common, *flags(batch_size="2", tasks=UNMASKED))
    one, two = checkpoint(tmp_path / "one"), checkpoint(tmp_path / "two")
    assert one["loss_weights"]["sigma"].sub(1).abs().min() > 1e-3  # σ moved: a drift between ranks would show
    assert_same_training_state(one, two, rtol=1e-4)
    rng = two["rng"]["torch"]
    assert len(rng) == 2 and not torch.equal(rng[0], rng[1])  # per-rank drop-path and gating-noise streams
    log = [json.loads(line) for line in open(tmp_path / "two" / "log.jsonl")]
    assert [r["step"] for r in log if "task_losses" in r] == [1, 2, 3]


def test_accumulation_equals_one_large_batch(tmp_path, monkeypatch):
    """--accum-steps 2 of 4 images makes the optimizer steps of 8 images (model, σ, AdamW state, logged losses).
    The MI loss is estimated per micro-batch, so it is left out here."""
    common = ["--steps", "3", "--mi-weight", "0", "--tasks", UNMASKED]
    run_in_process(monkeypatch, tmp_path / "big", *common, "--batch-size", "8")
    run_in_process(monkeypatch, tmp_path / "acc", *common, "--batch-size", "4", "--accum-steps", "2")
    big, acc = checkpoint(tmp_path / "big"), checkpoint(tmp_path / "acc")
    assert_same_training_state(big, acc, rtol=1e-5)
    logs = [[r for r in map(json.loads, open(tmp_path / d / "log.jsonl")) if "loss" in r] for d in ("big", "acc")]
    for a, b in zip(*logs):
        assert a["lr"] == b["lr"] and abs(a["loss"] - b["loss"]) < 1e-5 * abs(a["loss"])


@pytest.mark.slow  # ~35 s on a 2-core machine: three train.py runs; SIGUSR1's save-and-exit stays in the default suite
def test_sigterm_mid_run_saves_and_the_resumed_run_is_bit_identical(tmp_path):
    """SIGTERM (a preemption) to the run's process group mid-run, loader workers included: the run saves at the end
    of the current step and exits with 143; resumed with --resume, and with another number of loader workers, it
    ends bit-identical to an uninterrupted run (drop-path active, validations in between)."""
    common = ["--steps", "10", "--no-final-eval", "--drop-path", "0.2", "--ckpt-interval", "0", "--eval-interval",
              "3", *FAST]
    run("train.py", "--out-dir", str(tmp_path / "a"), *common)
    status, err = launch_and_signal(tmp_path / "b", ["--workers", "2", *common])
    assert status == 128 + signal.SIGTERM, err[-2000:]
    saved = checkpoint(tmp_path / "b")["step"]
    assert 2 <= saved < 10 and "--resume" in err
    last = json.loads((tmp_path / "b" / "log.jsonl").read_text().splitlines()[-1])
    assert last == {"step": saved, "checkpoint": "signal"}
    run("train.py", "--out-dir", str(tmp_path / "b"), "--resume", "--workers", "0", *common)
    a, b = checkpoint(tmp_path / "a"), checkpoint(tmp_path / "b")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(v, b["optimizer"]["state"][i][k]) for i, s in a["optimizer"]["state"].items()
               for k, v in s.items())


def test_sigusr1_saves_and_exits_with_its_status(tmp_path, monkeypatch, capsys):
    """SIGUSR1 (a scheduler's warning before the time limit) does what SIGTERM does; the exit status is 128 + 10."""
    calls = {"n": 0}
    real_loss = evaluate.task_loss

    def signalling(name, *a, **k):  # the signal arrives during step 3's forward (2 task losses a step)
        calls["n"] += 1
        if calls["n"] == 2 * 2 + 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_loss(name, *a, **k)

    monkeypatch.setattr(evaluate, "task_loss", signalling)
    with pytest.raises(SystemExit) as stop:
        run_in_process(monkeypatch, tmp_path / "run", "--steps", "10", "--tasks", "class_object,normal")
    assert stop.value.code == 128 + signal.SIGUSR1
    assert checkpoint(tmp_path / "run")["step"] == 3
    assert "stopped by a signal at step 3 of 10" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # handlers restored


def test_checkpoints_by_epoch_and_wall_time_and_validations_in_the_log(tmp_path, monkeypatch):
    """--ckpt-epochs and --ckpt-minutes save at their intervals (log.jsonl says why); --eval-interval logs a bounded
    validation, which evaluate.plot_training_curves draws."""
    out = tmp_path / "run"
    run_in_process(monkeypatch, out, "--steps", "6", "--train-length", "16", "--ckpt-interval", "0",
                   "--ckpt-epochs", "1", "--ckpt-minutes", "1e-9", "--eval-interval", "3", "--eval-batches", "2")
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    saves = {r["step"]: r["checkpoint"] for r in records if "checkpoint" in r}
    assert saves == {1: "time", 2: "time", 3: "time", 4: "interval", 5: "time", 6: "end"}  # 4 steps per epoch
    vals = [r for r in records if "val" in r]
    assert [r["step"] for r in vals] == [3, 6] and set(vals[0]["val"]) == set(SMALL["--tasks"].split(","))
    assert all(v["val"]["normal"]["loss"] > 0 for v in vals)
    evaluate.plot_training_curves(out / "log.jsonl", out / "curves.png")
    assert (out / "curves.png").stat().st_size > 0


def test_usage_counted_in_the_evaluation_pass_equals_expert_usage(tiny_cfg):
    """CountingUsage counts, in evaluate_model's one call per batch, what modsquad.expert_usage measures per task."""
    model = ModSquad(tiny_cfg)
    loader = fake_loader(tiny_cfg, num_batches=3)
    counted = evaluate.CountingUsage(model)
    results = evaluate.evaluate_model(counted, loader, "cpu")
    assert results == evaluate.evaluate_model(model, loader, "cpu")
    for t, (name, _, _) in enumerate(tiny_cfg.tasks):
        for got, want in zip(counted.usage(name), expert_usage(model, loader, t)):
            torch.testing.assert_close(got, want)


def test_extract_all_costs_one_pass_of_the_full_model_plus_one_per_extracted_model(tiny_cfg, tmp_path, monkeypatch):
    """evaluate.py --extract all: the full model's pass also counts the usage; each extracted model gets one pass."""
    cfg = replace(tiny_cfg, tasks=SYNTHETIC_TASKS[:3])
    make_run(cfg, tmp_path)
    calls = []
    real_forward = ModSquad.forward
    monkeypatch.setattr(ModSquad, "forward", lambda self, images, task: calls.append(len(self.cfg.tasks))
                        or real_forward(self, images, task))
    evaluate.main([str(tmp_path), "--max-batches", "2", "--extract", "all", "--device", "cpu", "--batch-size", "1"])
    # 2 batches through the full model (3 tasks), 1 for predictions.png, then 2 per extracted model (1 task)
    assert calls == [3, 3, 3] + [1, 1] * 3
    assert json.loads((tmp_path / "metrics_val.json").read_text())["metrics"]


def launch_and_signal(out_dir, args, sig=signal.SIGTERM, torchrun=False, after_lines=2):
    """Start train.py (under torchrun if asked) in a process group of its own, send `sig` to that group (as a terminal
    or a scheduler does) once log.jsonl has `after_lines` lines, wait for the end. Returns (exit status, stderr)."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun else []
    proc = subprocess.Popen([sys.executable, *launcher, "train.py", "--out-dir", str(out_dir), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    log, deadline = out_dir / "log.jsonl", time.time() + 120
    while not (log.exists() and len(log.read_text().splitlines()) >= after_lines) and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.mark.slow
def test_sigterm_to_torchrun_saves_every_rank_and_the_resumed_run_is_bit_identical(tmp_path):
    """torchrun forwards SIGTERM to its workers (and their loader workers, which ignore it): both ranks save at the
    same step, and the resumed 2-process run ends bit-identical to an uninterrupted one."""
    common = ["--steps", "14", "--no-final-eval", "--drop-path", "0.2", "--ckpt-interval", "0", "--workers", "1",
              *flags(batch_size="2")]
    run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
        "--out-dir", str(tmp_path / "a"), *common)
    status, err = launch_and_signal(tmp_path / "b", common, torchrun=True)
    saved = checkpoint(tmp_path / "b")["step"]
    assert 2 <= saved < 14 and "stopped by a signal" in err, err[-3000:]
    run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
        "--out-dir", str(tmp_path / "b"), "--resume", *common)
    a, b = checkpoint(tmp_path / "a"), checkpoint(tmp_path / "b")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(x, y) for x, y in zip(a["rng"]["torch"], b["rng"]["torch"]))


@pytest.mark.slow
def test_taskonomy_recipe_on_a_partial_tree_with_workers_one_and_two_processes(tmp_path):
    """The ViT-S recipe (its full-size model, at 64 px) on a Taskonomy tree in the exact on-disk formats whose split
    file names absent buildings: 1 process with a loader worker and 2 processes under torchrun train, skipping the
    absent buildings with one warning; evaluate.py reads the run."""
    import data_trees

    data_trees.write_taskonomy(str(tmp_path / "taskonomy"), buildings=3, views=2)
    common = ["--recipe", "taskonomy-small", "--data-root", str(tmp_path / "taskonomy"), "--steps", "2",
              "--batch-size", "1", "--img-size", "64", "--workers", "1", "--no-final-eval", "--log-interval", "1"]
    one = run("train.py", "--out-dir", str(tmp_path / "one"), *common)
    assert "skipping them" in one.stderr and "1 loader workers per process" in one.stdout
    two = run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
              "--out-dir", str(tmp_path / "two"), *common)
    assert "2 steps of 2 images (1 x 2 process(es) x 1 accum steps)" in two.stdout
    ckpt = checkpoint(tmp_path / "two")
    assert ckpt["step"] == 2 and ckpt["world"] == 2 and len(ckpt["config"]["tasks"]) == 13
    run("evaluate.py", str(tmp_path / "two"), "--split", "test", "--max-batches", "1", "--workers", "1")
    metrics = json.loads((tmp_path / "two" / "metrics_test.json").read_text())["metrics"]
    assert len(metrics) == 13
