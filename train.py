"""
Train Mod-Squad: every task's backbone pass on the same images (all in one call), the task losses plus w_MI * L_MI,
one backward.

    python train.py                                    # the default: 13 synthetic Taskonomy-like tasks, CPU, minutes
    python train.py --tasks depth_euclidean            # a single-task baseline
    python train.py --no-moe                           # the dense multi-task baseline (same active FLOPs)
    python train.py --mi-weight 0                      # Mod-Squad without the MI loss
    python train.py --recipe taskonomy-base --data-root /data/taskonomy   # the paper's ViT-B run (GPUs)
    torchrun --standalone --nproc_per_node=8 train.py --recipe taskonomy-base --data-root /data/taskonomy
    python train.py --recipe taskonomy-base --dry-run  # build the full-size model, one step on random data (CPU)

Writes <out-dir>/config.json, log.jsonl, ckpt.pt (atomically), then evaluates and extracts (evaluate.py).
"""

import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import evaluate
import pretrained
from modsquad import ModSquad, ModSquadConfig, PRESETS, mi_loss

# The paper's runs (modsquad_spec.md §3.3); per-GPU batch as launched. Flags given on the command line win.
RECIPES = {
    "synthetic": dict(),
    "taskonomy-base": dict(dataset="taskonomy", preset="mtvit_taskgate_att_mlp_base_MI_twice", blr=4e-4, epochs=100,
                           warmup_epochs=10, drop_path=0.1, batch_size=6, img_size=224),
    "taskonomy-small": dict(dataset="taskonomy", preset="mtvit_taskgate_att_mlp_small_MI_twice", blr=6e-4, epochs=100,
                            warmup_epochs=10, drop_path=0.1, batch_size=14, img_size=224),
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

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--recipe", choices=RECIPES, default="synthetic", help="defaults of one of the paper's runs")
g = p.add_argument_group("I/O")
g.add_argument("--out-dir", default="out", help="run directory (config.json, log.jsonl, ckpt.pt, figures)")
g.add_argument("--resume", action="store_true", help="continue from <out-dir>/ckpt.pt")
g.add_argument("--log-interval", type=int, default=10, help="steps between log lines")
g.add_argument("--ckpt-interval", type=int, default=100, help="steps between checkpoints (and one at the end)")
g.add_argument("--stop-at", type=int, default=None, help="save and stop after this step (to test resuming)")
g.add_argument("--no-final-eval", action="store_true", help="skip the evaluation and extraction at the end")
g.add_argument("--eval-batches", type=int, default=8, help="validation batches for the final evaluation")
g = p.add_argument_group("data")
g.add_argument("--dataset", choices=["synthetic", "synthetic-pascal", "taskonomy", "pascal"], default="synthetic")
g.add_argument("--data-root", default=None, help="dataset root (taskonomy: omnitools layout; pascal: PASCAL_MT)")
g.add_argument("--tasks", default=None, help="comma-separated task names (default: all; one = single-task baseline)")
g.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model preset's)")
g.add_argument("--train-length", type=int, default=8192, help="synthetic scenes in the training split")
g.add_argument("--val-length", type=int, default=256, help="synthetic scenes in the validation split")
g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
g = p.add_argument_group("model")
g.add_argument("--preset", choices=PRESETS, default="tiny", help="model size (modsquad.PRESETS)")
g.add_argument("--no-moe", action="store_true", help="dense multi-task baseline with the same active FLOPs")
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
g.add_argument("--steps", type=int, default=400, help="training steps (ignored if --epochs is given)")
g.add_argument("--epochs", type=float, default=None, help="training epochs")
g.add_argument("--warmup-steps", type=int, default=20, help="linear warmup steps (ignored if --warmup-epochs)")
g.add_argument("--warmup-epochs", type=float, default=None, help="linear warmup epochs")
g.add_argument("--batch-size", type=int, default=32, help="images per GPU/process per step")
g.add_argument("--blr", type=float, default=0.024, help="base lr: lr = blr * global batch / 256 (official rule)")
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
p.set_defaults(**RECIPES[pre.recipe])
args = p.parse_args()


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
        args.batch_size, args.steps, args.epochs, args.no_final_eval = 2, 1, None, True
    else:
        train_set = data.build_dataset(args.dataset, "train", root=args.data_root, tasks=task_names, img_size=img_size,
                                       length=args.train_length, seed=args.seed, augment=True)
    cfg = ModSquadConfig.from_dict({**asdict(model_defaults), "img_size": img_size, "tasks": train_set.tasks,
                                    "moe": not args.no_moe,
                                    **({"mi_weight": args.mi_weight} if args.mi_weight is not None else {}),
                                    **({"drop_path": args.drop_path} if args.drop_path is not None else {}),
                                    **({"head_dim": args.head_dim} if args.head_dim is not None else {})})
except (ValueError, FileNotFoundError) as e:
    fail(e)
tasks = [name for name, _, _ in cfg.tasks]
global_batch = args.batch_size * world
steps_per_epoch = len(train_set) // global_batch
if steps_per_epoch == 0:
    fail(f"the training set has {len(train_set)} samples, fewer than one global batch of {global_batch}; "
         f"lower --batch-size")
max_steps = round(args.epochs * steps_per_epoch) if args.epochs else args.steps
warmup = round(args.warmup_epochs * steps_per_epoch) if args.warmup_epochs is not None else args.warmup_steps
lr = args.blr * global_batch / 256  # main_mt.py:298-301


def batches(epoch, start=0):
    """Global batches of one epoch: a permutation seeded by (seed, epoch), so resuming at any step reproduces the
    data order; each rank takes its slice of every global batch (same samples as one process with the global batch)."""
    perm = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(args.seed * 100003 + epoch))
    out = perm[: steps_per_epoch * global_batch].view(steps_per_epoch, world, args.batch_size)[:, rank]
    return out[start:].tolist()


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
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if weighting is not None:
        weighting.load_state_dict(ckpt["loss_weights"])
    step = ckpt["step"]
    torch.set_rng_state(ckpt["rng"]["torch"][rank].cpu())
    if device_type == "cuda" and ckpt["rng"]["cuda"]:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"][rank].cpu())
raw_model = model
if args.compile:
    model = torch.compile(model)
if ddp:  # every parameter is used by every step (stacked experts), so no find_unused_parameters
    model = DDP(model, device_ids=[int(os.environ["LOCAL_RANK"])] if device_type == "cuda" else None)


def all_reduce_mean(p_te):
    """Differentiable average over ranks: the MI loss sees the task-expert joint of the global batch."""
    return dist.nn.functional.all_reduce(p_te) / world


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


def save_checkpoint():
    rng = gather_rng()
    if not master:
        return
    ckpt = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": {"step": step},
            "step": step, "config": asdict(cfg), "args": vars(args), "rng": rng,
            "loss_weights": weighting.state_dict() if weighting is not None else None}
    torch.save(ckpt, ckpt_path + ".tmp")
    os.replace(ckpt_path + ".tmp", ckpt_path)  # atomic: a kill while saving leaves the previous checkpoint


if master:
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "config.json"), "w") as f:
        json.dump({"model": asdict(cfg), "args": vars(args)}, f, indent=2)
    n_params = sum(p.numel() for p in raw_model.parameters())
    print(f"{len(tasks)} tasks, {n_params / 1e6:.2f}M parameters, {max_steps} steps of {global_batch} images, "
          f"lr {lr:.2e}, device {args.device}, {world} process(es)")

# -----------------------------------------------------------------------------
# training loop
log = open(os.path.join(args.out_dir, "log.jsonl"), "a") if master else None
bar = tqdm(total=max_steps, initial=step, disable=not master, desc="train")
model.train()
epoch, start = divmod(step, steps_per_epoch)
t0 = time.time()
while step < max_steps:
    # the loader gets its own generator: drawing worker seeds from the global one would shift the drop-path RNG
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=batches(epoch, start), num_workers=args.workers,
                                         generator=torch.Generator().manual_seed(args.seed + epoch))
    for images, targets in checked(loader):
        for group in optimizer.param_groups:
            group["lr"] = get_lr(step)
        images = images.to(args.device)
        targets = {k: v.to(args.device) for k, v in targets.items()}
        try:
            with autocast:
                if args.task_loop:  # one backbone call per task, as the official code
                    preds, routings = map(list, zip(*(model(images, t) for t in range(len(tasks)))))
                else:  # all tasks in one backbone call on T*B rows: the same computation, taller GEMMs
                    preds, routings = model(images, list(range(len(tasks))))
                task_losses = [evaluate.task_loss(name, pred, targets[name], targets.get(f"{name}_mask"))
                               for name, pred in zip(tasks, preds)]
                losses = torch.stack(task_losses)  # (T,)
                # L_MI from the router probabilities of all T passes, summed over MoE layers
                mi = mi_loss(routings, all_reduce_mean if ddp else None).to(losses.device)
                task_term = weighting(losses) if weighting is not None else (fixed_weights * losses).sum()
                loss = task_term + cfg.mi_weight * mi
            if not torch.isfinite(loss):  # no silent clamp (the official code clamps to ±1000)
                bad = [n for n, l in zip(tasks, task_losses) if not torch.isfinite(l)] or ["the MI loss"]
                fail(f"non-finite loss at step {step} in {', '.join(bad)}; the last good checkpoint is {ckpt_path}. "
                     f"Lower --blr or check that task's targets")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        except torch.OutOfMemoryError:
            fail(f"out of GPU memory with --batch-size {args.batch_size}; lower it (lr follows the global batch)")
        if args.clip_grad:
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.clip_grad)
        optimizer.step()
        step += 1
        bar.update()
        if master and (step % args.log_interval == 0 or step == max_steps):
            dt, t0 = time.time() - t0, time.time()
            record = {"step": step, "lr": get_lr(step - 1), "loss": loss.item(), "mi": mi.item(),
                      "task_losses": dict(zip(tasks, losses.tolist())),
                      "images_per_s": args.log_interval * global_batch / dt}
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{record['loss']:.3f}", mi=f"{record['mi']:.3f}")
        if step % args.ckpt_interval == 0 or step == max_steps or step == args.stop_at:
            save_checkpoint()
        if step == max_steps or step == args.stop_at:
            break
    if step == args.stop_at:
        break
    epoch, start = epoch + 1, 0
bar.close()

if master and not args.no_final_eval and step == max_steps:
    evaluate.main([args.out_dir, "--extract", "all", "--max-batches", str(args.eval_batches),
                   "--mean-baseline", str(args.eval_batches), "--device", args.device])
if ddp:
    dist.destroy_process_group()
