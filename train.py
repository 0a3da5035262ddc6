"""
Train Mod-Squad: every task's backbone pass on the same images (all in one call), the task losses plus w_MI * L_MI,
one backward.

    python train.py                                    # the default: 13 synthetic Taskonomy-like tasks, CPU, minutes
    python train.py --tasks depth_euclidean            # a single-task baseline
    python train.py --no-moe                           # the dense multi-task twin (same active FLOPs, no routers)
    python train.py --mi-weight 0                      # Mod-Squad without the MI loss
    python train.py --recipe taskonomy-base --data-root /data/taskonomy   # the paper's ViT-B run (GPUs)
    torchrun --standalone --nproc_per_node=8 train.py --recipe taskonomy-base --data-root /data/taskonomy \
        --accum-steps 30 --out-dir runs/base       # 8 GPUs x 6 images x 30 micro-steps = the authors' batch of 1440
    torchrun ... (the same command) --resume       # a preempted run continues (SIGTERM/SIGUSR1 save a checkpoint)
    python train.py --recipe taskonomy-base --dry-run  # build the full-size model, one step on random data (CPU)

Writes <out-dir>/config.json, log.jsonl, ckpt.pt (atomically), then evaluates and extracts (evaluate.py).
"""

import argparse
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  (dist.nn.functional.all_reduce; torch < 2.5 does not import it for you)
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import evaluate
import pretrained
from modsquad import ModSquad, ModSquadConfig, PRESETS, mi_loss

# The paper's runs (modsquad_spec.md §3.3); per-GPU batch as launched. Flags given on the command line win.
# authors_batch: the authors' effective batch (GPUs x batch per GPU), which --accum-steps reaches on fewer GPUs.
RECIPES = {
    # the CPU default (README, "What the default run shows"; docs/recipe.md): 2000 steps of 8 images, 256 validation
    # scenes (32 batches) in the final evaluation
    "synthetic": dict(eval_batches=32),
    "taskonomy-base": dict(dataset="taskonomy", preset="mtvit_taskgate_att_mlp_base_MI_twice", blr=4e-4, epochs=100,
                           warmup_epochs=10, drop_path=0.1, batch_size=6, img_size=224, authors_batch=1440),
    "taskonomy-small": dict(dataset="taskonomy", preset="mtvit_taskgate_att_mlp_small_MI_twice", blr=6e-4, epochs=100,
                            warmup_epochs=10, drop_path=0.1, batch_size=14, img_size=224, authors_batch=2688),
    # the authors' baselines of Δm: dense multi-task ViT-B / ViT-S (scaleup_base_gg, scaleup_small_ggg) and a dense
    # single-task ViT-B per task (scaleup_mt_base_<task>_2e-4: train.py --recipe taskonomy-single-base --tasks <task>)
    "taskonomy-dense-base": dict(dataset="taskonomy", preset="mtvit_base", blr=2e-4, clip_grad=3.0, epochs=100,
                                 warmup_epochs=10, batch_size=14, img_size=224, authors_batch=1008),
    "taskonomy-dense-small": dict(dataset="taskonomy", preset="mtvit_small", blr=5e-4, clip_grad=3.0, epochs=100,
                                  warmup_epochs=10, batch_size=16, img_size=224, authors_batch=384),
    "taskonomy-single-base": dict(dataset="taskonomy", preset="mtvit_base", blr=2e-4, epochs=100, warmup_epochs=10,
                                  batch_size=64, img_size=224, authors_batch=1536),
    "pascal-small": dict(dataset="pascal", preset="mtvit_taskgate_att_mlp_small_MI_twice", blr=6e-4, epochs=100,
                         warmup_epochs=10, drop_path=0.1, batch_size=8, img_size=512, loss_weighting="fixed"),
    # pascal-small with ImageNet ViT heads (head_dim 64, not the presets' 128), so that --init DeiT-S / ViT-B weights
    # load every attention head (pretrained.py; README, PASCAL-Context); without --init: the same model from scratch
    "pascal-small-in1k": dict(dataset="pascal", preset="mtvit_taskgate_att_mlp_small_MI_twice", head_dim=64, blr=6e-4,
                              epochs=100, warmup_epochs=10, drop_path=0.1, batch_size=8, img_size=512,
                              loss_weighting="fixed"),
    "pascal-base-in1k": dict(dataset="pascal", preset="mtvit_taskgate_att_mlp_base_MI_twice", head_dim=64, blr=4e-4,
                             epochs=100, warmup_epochs=10, drop_path=0.1, batch_size=8, img_size=512,
                             loss_weighting="fixed"),
}
# every real-data recipe runs for days: checkpoints by epoch and wall time instead of steps, a bounded validation
LONG_RUN = dict(ckpt_interval=0, ckpt_epochs=1, ckpt_minutes=30, eval_interval=500)

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--recipe", choices=RECIPES, default="synthetic", help="defaults of one of the paper's runs")
g = p.add_argument_group("I/O")
g.add_argument("--out-dir", default="out", help="run directory (config.json, log.jsonl, ckpt.pt, figures)")
g.add_argument("--resume", action="store_true", help="continue from <out-dir>/ckpt.pt")
g.add_argument("--log-interval", type=int, default=10, help="steps between log lines")
g.add_argument("--ckpt-interval", type=int, default=100, help="steps between checkpoints (0: off; one at the end)")
g.add_argument("--ckpt-epochs", type=float, default=None, help="epochs between checkpoints")
g.add_argument("--ckpt-minutes", type=float, default=None, help="minutes of wall time between checkpoints")
g.add_argument("--stop-at", type=int, default=None, help="save and stop after this step (to test resuming)")
g.add_argument("--no-final-eval", action="store_true", help="skip the evaluation and extraction at the end")
g.add_argument("--eval-interval", type=int, default=0, help="steps between validations (0: off) of --eval-batches "
               "batches, logged to log.jsonl and drawn in training_curves.png")
g.add_argument("--eval-batches", type=int, default=8, help="validation batches, in-loop and for the final evaluation")
g = p.add_argument_group("data")
g.add_argument("--dataset", choices=["synthetic", "synthetic-pascal", "taskonomy", "pascal"], default="synthetic")
g.add_argument("--data-root", default=None, help="dataset root (taskonomy: omnitools layout; pascal: PASCAL_MT)")
g.add_argument("--split-csv", default=None, help="taskonomy: the buildings' split file (default: <data-root>/"
               "splits_taskonomy/train_val_test_fullplus.csv, the paper's runs)")
g.add_argument("--require-all-buildings", action="store_true", help="taskonomy: stop if a building of the split is "
               "absent or lacks a domain (default: skip those with one warning line, as a partial download needs)")
g.add_argument("--tasks", default=None, help="comma-separated task names (default: all; one = single-task baseline)")
g.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model preset's)")
g.add_argument("--train-length", type=int, default=8192, help="synthetic scenes in the training split")
g.add_argument("--val-length", type=int, default=256, help="synthetic scenes in the validation split")
g.add_argument("--scene-cache", default=None, metavar="DIR", help="synthetic: keep the rendered training scenes in "
               "DIR, for later runs of the same seed (reproduce.py)")
g.add_argument("--workers", type=int, default=None, help="DataLoader worker processes per GPU/process (default: 0 "
               "for synthetic data, else this process's share of the CPU cores less one, at most 16)")
g = p.add_argument_group("model")
g.add_argument("--preset", choices=PRESETS, default="tiny", help="model size (modsquad.PRESETS)")
g.add_argument("--no-moe", action="store_true", help="dense multi-task twin: the same active FLOPs, less the routers'")
g.add_argument("--mi-weight", type=float, default=None, help="weight of the MI loss (0 = no-MI ablation)")
g.add_argument("--drop-path", type=float, default=None, help="stochastic depth rate")
g.add_argument("--head-dim", type=int, default=None, help="attention head width (64 loads ImageNet ViT heads; the "
               "paper's MoE presets use 128)")
g.add_argument("--init", default=None, metavar="PATH", help="start from a dense ViT checkpoint: timm/DeiT/MAE or "
               "torchvision state dict (pretrained.py); ignored with --resume")
g.add_argument("--loss-weighting", choices=["uncertainty", "fixed"], default=None,
               help="uncertainty (Taskonomy default): official learnable weights; fixed (PASCAL default): M3ViT's "
                    "weights semseg 1, parts 2, saliency 5, normals 10, edge 50 (1 for other tasks)")
g = p.add_argument_group("optim")
g.add_argument("--steps", type=int, default=2000, help="training steps (on the command line, it replaces a recipe's "
               "--epochs and --warmup-epochs)")
g.add_argument("--epochs", type=float, default=None, help="training epochs")
g.add_argument("--warmup-steps", type=int, default=100, help="linear warmup steps (ignored if --warmup-epochs)")
g.add_argument("--warmup-epochs", type=float, default=None, help="linear warmup epochs")
g.add_argument("--batch-size", type=int, default=8, help="images per GPU/process per micro-step")
g.add_argument("--accum-steps", type=int, default=1, help="micro-steps per optimizer step (gradient accumulation): "
               "effective batch = batch size x processes x accum steps")
g.add_argument("--blr", type=float, default=0.064, help="base lr: lr = blr * global batch / 256 (official rule)")
g.add_argument("--min-lr", type=float, default=1e-6, help="end of the cosine schedule")
g.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay on >= 2-D weights")
g.add_argument("--clip-grad", type=float, default=None, help="clip the gradient norm (official: off for MoE runs)")
g = p.add_argument_group("system")
g.add_argument("--seed", type=int, default=0)
g.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
g.add_argument("--compile", action="store_true", help="torch.compile the model (off: top-k routing graph-breaks)")
g.add_argument("--task-loop", action="store_true",
               help="run the backbone once per task (the official structure) instead of all tasks in one call")
g.add_argument("--dry-run", action="store_true", help="one step of the full-size model on random data, on CPU")
pre, _ = p.parse_known_args()
p.set_defaults(**{**(LONG_RUN if pre.recipe != "synthetic" else {}), **RECIPES[pre.recipe]})
args = p.parse_args()
given = {a.split("=")[0] for a in sys.argv[1:]}
if "--steps" in given and "--epochs" not in given:  # e.g. --recipe taskonomy-base --steps 2: a short run of a recipe
    args.epochs = args.warmup_epochs = None


if args.loss_weighting is None:
    args.loss_weighting = "fixed" if args.dataset in ("pascal", "synthetic-pascal") else "uncertainty"


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# -----------------------------------------------------------------------------
# setup: DDP (torchrun sets RANK), device, precision
ddp = int(os.environ.get("RANK", -1)) != -1
rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
master = rank == 0
if args.device == "auto":
    args.device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
if args.dry_run:
    args.device = "cpu"
if ddp:
    if args.device.startswith("cuda"):
        args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
device_type = args.device.split(":")[0]
autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device_type == "cuda" else nullcontext()
torch.manual_seed(args.seed)

# -----------------------------------------------------------------------------
# data, model, optimizer
task_names = args.tasks.split(",") if args.tasks else None
try:
    model_defaults = ModSquadConfig.from_preset(args.preset)
    img_size = args.img_size or model_defaults.img_size
    if args.dry_run:  # random images and targets of the right shapes stand in for the dataset
        train_set = data.RandomTargets(data.DATASET_TASKS[args.dataset], img_size, length=2, names=task_names)
        args.batch_size, args.steps, args.epochs, args.no_final_eval, args.eval_interval = 2, 1, None, True, 0
        args.accum_steps = 1
    else:
        train_set = data.build_dataset(args.dataset, "train", root=args.data_root, tasks=task_names, img_size=img_size,
                                       length=args.train_length, seed=args.seed, augment=True,
                                       split_csv=args.split_csv, require_all_buildings=args.require_all_buildings,
                                       cache=not args.workers,  # synthetic: each scene rendered once, in this process
                                       cache_dir=args.scene_cache)
    cfg = ModSquadConfig.from_dict({**asdict(model_defaults), "img_size": img_size, "tasks": train_set.tasks,
                                    "moe": not args.no_moe,
                                    **({"mi_weight": args.mi_weight} if args.mi_weight is not None else {}),
                                    **({"drop_path": args.drop_path} if args.drop_path is not None else {}),
                                    **({"head_dim": args.head_dim} if args.head_dim is not None else {})})
except (ValueError, FileNotFoundError) as e:
    fail(e)
tasks = [name for name, _, _ in cfg.tasks]
if args.recipe == "taskonomy-single-base" and len(tasks) != 1:
    fail("--recipe taskonomy-single-base trains one task: add --tasks <one of "
         f"{', '.join(n for n, _, _ in data.TASKONOMY_TASKS)}>")
if min(args.batch_size, args.accum_steps) < 1:
    fail(f"--batch-size and --accum-steps must be >= 1 (got {args.batch_size}, {args.accum_steps})")
if args.workers is None:
    args.workers = 0 if args.dry_run else data.default_workers(args.dataset)
# the samples of each rank's micro-batches, and their augmentation seeds (data.EpochBatches)
sampler = data.EpochBatches(len(train_set), args.batch_size, args.accum_steps, world, rank, args.seed)
global_batch, steps_per_epoch = sampler.global_batch, sampler.steps_per_epoch  # the effective batch of one step
if steps_per_epoch == 0:
    fail(f"the training set has {len(train_set)} samples, fewer than one effective batch of {global_batch}; "
         f"lower --batch-size or --accum-steps")
max_steps = round(args.epochs * steps_per_epoch) if args.epochs else args.steps
warmup = round(args.warmup_epochs * steps_per_epoch) if args.warmup_epochs is not None else args.warmup_steps
lr = args.blr * global_batch / 256  # main_mt.py:298-301 (batch per GPU x GPUs x accum_iter)


class UncertaintyWeighting(nn.Module):
    """Official AutomaticWeightedLoss: Σ_i 0.5/σ_i² L_i + log(1 + σ_i²), σ_i learnable, init 1."""

    def __init__(self, n):
        super().__init__()
        self.sigma = nn.Parameter(torch.ones(n))

    def forward(self, losses):  # losses: (T,)
        return (0.5 / self.sigma**2 * losses + torch.log1p(self.sigma**2)).sum()


model = ModSquad(cfg).to(args.device)
if args.init and not args.resume:  # a dense ViT checkpoint into the fresh model, before the optimizer and DDP
    try:
        init_report = pretrained.load_dense_checkpoint(model, args.init)
    except (ValueError, FileNotFoundError) as e:
        fail(e)
    if master:
        print(init_report)
weighting = UncertaintyWeighting(len(tasks)).to(args.device) if args.loss_weighting == "uncertainty" else None
fixed_weights = torch.tensor([evaluate.PASCAL_LOSS_WEIGHTS.get(t, 1.0) for t in tasks], device=args.device)
# AdamW (eps 1e-4, main_mt.py:339); weight decay on >= 2-D weights except pos/cls (timm no_weight_decay); the
# official code also decays the uncertainty weights' σ (util/lr_decay.py)
decay, no_decay = [], []
for n, p in model.named_parameters():
    (decay if p.ndim >= 2 and n not in ("pos_embed", "cls_token") else no_decay).append(p)
groups = [dict(params=decay, weight_decay=args.weight_decay), dict(params=no_decay, weight_decay=0.0)]
if weighting is not None:
    groups.append(dict(params=list(weighting.parameters()), weight_decay=args.weight_decay))
optimizer = torch.optim.AdamW(groups, lr=lr, eps=1e-4)
# the weights come from args.seed on every rank (DDP also broadcasts rank 0's); from here on each rank draws its own
# drop-path masks and gating noise, as the official seed + rank (main_mt.py)
torch.manual_seed(args.seed + rank)

step = 0
ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
if args.resume:
    if not os.path.exists(ckpt_path):
        fail(f"--resume: no checkpoint at {ckpt_path}; start without --resume or point --out-dir at a run")
    ckpt = torch.load(ckpt_path, map_location=args.device, weights_only=True)
    plain = lambda v: json.loads(json.dumps(v))  # tuples and lists compare equal
    mismatch = [k for k, v in asdict(cfg).items() if plain(v) != plain(ckpt["config"].get(k))]
    if mismatch:
        fail(f"{ckpt_path} was trained with a different config ({', '.join(mismatch)}); use the same flags or "
             f"another --out-dir")
    saved_batch = ckpt.get("global_batch", global_batch)
    if saved_batch != global_batch:  # the lr, the schedule and the data order are functions of it
        fail(f"{ckpt_path} was trained with an effective batch of {saved_batch}, this run has {global_batch} = "
             f"{args.batch_size} x {world} processes x {args.accum_steps} accum steps; keep the product "
             f"(--batch-size, --accum-steps)")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if weighting is not None:
        weighting.load_state_dict(ckpt["loss_weights"])
    step = ckpt["step"]
    if len(ckpt["rng"]["torch"]) == world:  # every rank continues its own stream: bit-identical
        torch.set_rng_state(ckpt["rng"]["torch"][rank].cpu())
        if device_type == "cuda" and ckpt["rng"]["cuda"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"][rank].cpu())
    else:  # the same samples per step, but new drop-path streams
        torch.manual_seed(args.seed + rank + world * step)
        if master:
            print(f"resuming {len(ckpt['rng']['torch'])} processes' run on {world}: drop-path and gating noise "
                  f"streams are reseeded, so the run is not bit-identical to an uninterrupted one")
raw_model = model
if args.compile:
    model = torch.compile(model)
if ddp:  # every parameter is used by every step (stacked experts), so no find_unused_parameters
    model = DDP(model, device_ids=[int(os.environ["LOCAL_RANK"])] if device_type == "cuda" else None)


def all_reduce_mean(p_te):
    """Differentiable average over ranks: the MI loss sees the task-expert joint of the global micro-batch."""
    return dist.nn.functional.all_reduce(p_te) / world


def any_rank(*flags):
    """The flags OR-ed over ranks, so that every rank takes the same branch (saving a checkpoint is collective)."""
    if not ddp:
        return flags
    t = torch.tensor(flags, dtype=torch.float32, device=args.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def checked(loader):
    """The loader's batches; a file found missing or corrupt mid-run stops the run with its message (no traceback)."""
    try:
        yield from loader
    except (ValueError, FileNotFoundError) as e:
        fail(e)


def get_lr(step):  # linear warmup, then half-cosine to min_lr (util/lr_sched.py), per step
    if step < warmup:
        return lr * step / warmup
    progress = (step - warmup) / max(1, max_steps - warmup)
    return args.min_lr + (lr - args.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def gather_rng():
    state = {"torch": [torch.get_rng_state()], "cuda": [torch.cuda.get_rng_state()] if device_type == "cuda" else []}
    if ddp:  # every rank's generator (drop-path, router noise), stored by rank 0
        for key in state:
            out = [None] * world
            dist.all_gather_object(out, state[key])
            state[key] = [s for r in out for s in r]
    return state


def save_checkpoint(reason):
    rng = gather_rng()
    if not master:
        return
    ckpt = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": {"step": step},
            "step": step, "config": asdict(cfg), "args": vars(args), "rng": rng, "world": world,
            "global_batch": global_batch, "loss_weights": weighting.state_dict() if weighting is not None else None}
    torch.save(ckpt, ckpt_path + ".tmp")
    os.replace(ckpt_path + ".tmp", ckpt_path)  # atomic: a kill while saving leaves the previous checkpoint
    log.write(json.dumps({"step": step, "checkpoint": reason}) + "\n")
    log.flush()


stop_signal = None


def on_signal(signum, frame):  # preemption (SIGTERM, also as torchrun forwards it) or a scheduler's warning (SIGUSR1)
    global stop_signal
    stop_signal = signum  # acted on after the current step: save, then exit


if master:
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "config.json"), "w") as f:
        json.dump({"model": asdict(cfg), "args": vars(args)}, f, indent=2)
    n_params = sum(p.numel() for p in raw_model.parameters())
    print(f"{len(tasks)} tasks, {n_params / 1e6:.2f}M parameters, {max_steps} steps of {global_batch} images "
          f"({args.batch_size} x {world} process(es) x {args.accum_steps} accum steps), lr {lr:.2e}, device "
          f"{args.device}, {args.workers} loader workers per process")
    if getattr(args, "authors_batch", None) and args.authors_batch != global_batch:
        print(f"the authors' effective batch is {args.authors_batch}: --accum-steps "
              f"{max(1, round(args.authors_batch / (args.batch_size * world)))} reaches it on {world} process(es) "
              f"of --batch-size {args.batch_size}")

# -----------------------------------------------------------------------------
# training loop
log = open(os.path.join(args.out_dir, "log.jsonl"), "a") if master else None
bar = tqdm(total=max_steps, initial=step, disable=not master, desc="train")
# one loader for the run (its workers persist across epochs), with its own generator: drawing its seed from the global
# RNG would shift the drop-path stream
loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=args.workers,
                                     pin_memory=device_type == "cuda", persistent_workers=args.workers > 0,
                                     worker_init_fn=data.ignore_stop_signals,
                                     generator=torch.Generator().manual_seed(args.seed))
if master and args.eval_interval:  # the same first --eval-batches validation batches every time
    try:
        val_set = evaluate.run_loader(vars(args), "val", cfg, length=args.val_length).dataset
    except (ValueError, FileNotFoundError) as e:
        fail(f"{e} (the val split, for --eval-interval {args.eval_interval}; --eval-interval 0 trains without it)")
    val_set = torch.utils.data.Subset(val_set, range(min(len(val_set), args.eval_batches * args.batch_size)))
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=args.batch_size, pin_memory=device_type == "cuda",
                                             num_workers=min(args.workers, args.eval_batches),
                                             persistent_workers=args.workers > 0,
                                             worker_init_fn=data.ignore_stop_signals)
ckpt_every = [args.ckpt_interval, round(args.ckpt_epochs * steps_per_epoch) if args.ckpt_epochs else 0]
for s in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(s, on_signal)
model.train()
epoch, done = step // steps_per_epoch, step >= max_steps
t0 = last_save = time.time()
signalled = False
while not done:
    sampler.set_epoch(epoch, step % steps_per_epoch)
    for micro, (images, targets) in enumerate(checked(loader)):
        last_micro = micro % args.accum_steps == args.accum_steps - 1
        images = images.to(args.device, non_blocking=True)
        targets = {k: v.to(args.device, non_blocking=True) for k, v in targets.items()}
        try:
            # gradients accumulate over the micro-steps; DDP all-reduces them in the last micro-step's backward only
            with autocast, (model.no_sync() if ddp and not last_micro else nullcontext()):
                if args.task_loop:  # one backbone call per task, as the official code
                    preds, routings = map(list, zip(*(model(images, t) for t in range(len(tasks)))))
                else:  # all tasks in one backbone call on T*B rows: the same computation, taller GEMMs
                    preds, routings = model(images, list(range(len(tasks))))
                task_losses = [evaluate.task_loss(name, pred, targets[name], targets.get(f"{name}_mask"))
                               for name, pred in zip(tasks, preds)]
                losses = torch.stack(task_losses)  # (T,)
                # L_MI from the router probabilities of all T passes, summed over MoE layers, per micro-batch: its
                # joint over the micro-batch of every rank (official: per GPU); not over the effective batch, whose
                # graphs would all have to stay in memory until the last micro-step
                mi = mi_loss(routings, all_reduce_mean if ddp else None).to(losses.device)
                task_term = weighting(losses) if weighting is not None else (fixed_weights * losses).sum()
                loss = task_term + cfg.mi_weight * mi
            if not torch.isfinite(loss):  # no silent clamp (the official code clamps to ±1000)
                bad = [n for n, l in zip(tasks, task_losses) if not torch.isfinite(l)] or ["the MI loss"]
                fail(f"non-finite loss at step {step} in {', '.join(bad)}; the last good checkpoint is {ckpt_path}. "
                     f"Lower --blr or check that task's targets")
            (loss / args.accum_steps).backward()  # the gradient of the mean over micro-batches
        except torch.OutOfMemoryError:
            fail(f"out of GPU memory with --batch-size {args.batch_size}; lower it and raise --accum-steps to keep "
                 f"the effective batch of {global_batch} (lr follows it)")
        if micro % args.accum_steps == 0:
            stats = 0
        stats = stats + torch.stack([loss, mi, *losses]).detach() / args.accum_steps  # the step's means, for the log
        if not last_micro:
            continue
        if ddp and weighting is not None:  # σ is outside the DDP module: average its gradient as DDP does the model's
            dist.all_reduce(weighting.sigma.grad)
            weighting.sigma.grad /= world
        for group in optimizer.param_groups:
            group["lr"] = get_lr(step)
        if args.clip_grad:
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update()
        if master and (step % args.log_interval == 0 or step == max_steps):
            dt, t0 = time.time() - t0, time.time()
            step_loss, step_mi, *step_losses = stats.tolist()  # means over the step's micro-batches
            record = {"step": step, "lr": get_lr(step - 1), "loss": step_loss, "mi": step_mi,
                      "task_losses": dict(zip(tasks, step_losses)),
                      "images_per_s": args.log_interval * global_batch / dt}
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{step_loss:.3f}", mi=f"{step_mi:.3f}")
        if master and args.eval_interval and step % args.eval_interval == 0:
            with autocast:
                val = evaluate.evaluate_model(raw_model, val_loader, args.device)
            log.write(json.dumps({"step": step, "val": val}) + "\n")
            log.flush()
        # SIGTERM/SIGUSR1 or the wall-time interval on any rank: every rank saves (and stops) at this step
        signalled, time_due = any_rank(stop_signal is not None,
                                       bool(args.ckpt_minutes) and time.time() - last_save >= 60 * args.ckpt_minutes)
        done = signalled or step == max_steps or step == args.stop_at
        reason = ("signal" if signalled else "end" if done else
                  "interval" if any(n and step % n == 0 for n in ckpt_every) else "time" if time_due else None)
        if reason:
            save_checkpoint(reason)
            last_save = time.time()
        if done:
            break
    epoch += 1
bar.close()
for s in (signal.SIGTERM, signal.SIGUSR1):  # the final evaluation can be killed as usual
    signal.signal(s, signal.SIG_DFL)
del loader  # its workers
if ddp:  # all ranks leave together, once rank 0 has written the checkpoint; the final evaluation needs no group
    dist.barrier()
    dist.destroy_process_group()

if signalled:
    if master:
        print(f"stopped by a signal at step {step} of {max_steps}: saved {ckpt_path}; run the same command with "
              f"--resume to continue", file=sys.stderr)
    sys.exit(128 + (stop_signal or signal.SIGTERM))  # the status of a process ended by that signal: not finished
if master and not args.no_final_eval and step == max_steps:
    evaluate.main([args.out_dir, "--extract", "all", "--max-batches", str(args.eval_batches),
                   "--mean-baseline", str(args.eval_batches), "--device", args.device])
