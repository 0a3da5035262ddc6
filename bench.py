"""
Benchmarks of Mod-Squad, printed as ratios measured in one run. On a shared machine absolute times drift with the
load; ratios of interleaved repetitions (baseline and candidate take turns; medians of per-repetition ratios) do not.

    python bench.py                                   # everything, CPU (about 2 minutes on one free core)
    python bench.py --quick                           # fewer repetitions, smaller batches (under a minute)
    python bench.py --threads 1                       # on a CPU that other jobs also use (see --threads)
    python bench.py --only layers --device cuda --json out/bench.json

1. layers: MoE MLP and MoE attention, forward and forward+backward, against the dense layer of equal active FLOPs (the routers' aside) and
   against the official sort-and-loop dispatch (ParallelExperts), at the tiny default and at ViT-S scale.
2. model: a Mod-Squad training step (13 task passes, MI loss, one backward, AdamW) against the dense multi-task
   baseline's; an extracted single-task model against the full model (inference time, parameters, peak memory).
3. one-call: the training step with all tasks in one backbone call against one call per task, at several batches.
4. data: synthetic samples generated per second against the images per second the training step consumes.
5. loader: one loader worker's real-format Taskonomy samples per second (a 512 px tree written from the synthetic
   scenes, or --loader-root) and the workers that the default, ViT-S and ViT-B training steps need.

On Linux, glibc serves each block over its mmap threshold (at most 32 MB by default) with a fresh mmap, whose pages
fault in again on first touch; the MoE layers allocate more such temporaries than the dense ones (ViT-S, batch 32).
To measure without that tax: MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 python bench.py
"""

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

import data
import evaluate
from modsquad import (Attention, MLP, ModSquad, ModSquadConfig, MoEAttention, MoEMLP, count_params_flops,
                      expert_usage, extract, mi_loss)

# Targets (PASS/MISS next to the measured ratio)
LAYER_VS_DENSE = 1.3  # MoE layer fwd+bwd <= 1.3x its dense twin (equal active FLOPs but the routers'), and faster than the loop dispatch
STEP_VS_DENSE = 1.4  # Mod-Squad training step <= 1.4x the dense multi-task step
DATA_VS_STEP = 5.0  # synthetic data generated >= 5x faster than the training step consumes it
EXTRACT_PARAMS = 0.40  # an extracted model has >= 40 % fewer parameters, same FLOPs per image

# -----------------------------------------------------------------------------
# Timing: callables take turns, so that a burst of load from elsewhere hits all of them alike


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns, reps, device, warmup=1):
    """Seconds per call of each callable of fns (name -> fn): lists of `reps` paired repetitions. Each repetition
    runs every callable once, in an order rotated by one each time."""
    names = list(fns)
    times = {name: [] for name in names}
    for r in range(warmup + reps):
        for name in names[r % len(names):] + names[: r % len(names)]:
            sync(device)
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def ratio(times, a, b):
    """Median over repetitions of t_a / t_b, each pair measured back to back."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def ms(seconds):
    return statistics.median(seconds) * 1e3


def verdict(ok):
    return "PASS" if ok else "MISS"


def print_table(title, header, rows):
    lines = [f"\n### {title}\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    print("\n".join(lines), flush=True)


# -----------------------------------------------------------------------------
# The official dispatch (moe.py compute_gating + ParallelExperts), the baseline of the fast path. I keep what defines
# it, a Python loop over experts with split sizes synced to the host, and take its best plain form: its own
# hand-written backward (so `w[e]` costs no (E, in, out) zero gradient per expert) and index_select, not x[idx].


class ParallelLinear(torch.autograd.Function):
    """Rows sorted by expert times that expert's weight, one torch.mm per expert (parallel_experts.py)."""

    @staticmethod
    def forward(ctx, x, sizes, w, b=None):
        ctx.save_for_backward(x, w, b)
        ctx.sizes = sizes
        out = x.new_empty(x.shape[0], w.shape[2])  # (P, out)
        for e, (xe, oe) in enumerate(zip(x.split(sizes), out.split(sizes))):
            torch.mm(xe, w[e], out=oe)
            if b is not None:
                oe.add_(b[e])
        return out

    @staticmethod
    def backward(ctx, grad):
        x, w, b = ctx.saved_tensors
        dx, dw = torch.empty_like(x), torch.empty_like(w)
        db = torch.empty_like(b) if b is not None else None
        for e, (xe, ge, dxe) in enumerate(zip(x.split(ctx.sizes), grad.split(ctx.sizes), dx.split(ctx.sizes))):
            torch.mm(ge, w[e].t(), out=dxe)
            torch.mm(xe.t(), ge, out=dw[e])
            if db is not None:
                torch.sum(ge, dim=0, out=db[e])
        return dx, None, dw, db


def official_gating(routing, num_experts):
    """compute_gating (moe.py:22-35): the (token, slot) pairs sorted by expert, and each expert's count as a list."""
    flat = routing.topk_idx.flatten()  # (P,)
    order = flat.sort().indices
    sizes = torch.bincount(flat, minlength=num_experts).tolist()  # the host sync of every layer
    return order, order // routing.topk_idx.shape[1], routing.gates.flatten()[order], sizes


def loop_moe_mlp(layer, x, task):
    """modsquad.MoEMLP's function, dispatched the official way (TaskMoE.forward, moe.py:506-527)."""
    B, N, D = x.shape
    x = x.reshape(B * N, D)
    order, token, gates, sizes = official_gating(layer.router(x, task), layer.num_experts)
    h = F.gelu(ParallelLinear.apply(x.index_select(0, token), sizes, layer.w_in, layer.b_in))  # (P, Dm)
    y = ParallelLinear.apply(h, sizes, layer.w_out, layer.b_out) * gates[:, None]  # (P, D)
    return x.new_zeros(B * N, D).index_add(0, token, y).view(B, N, D)


def loop_moe_attention(layer, x, task):
    """modsquad.MoEAttention's function the official way: q_proj.map, einsum attention, q_proj.reduce
    (MoETaskAttention, models_moe.py:282-349; moe.py:554-596)."""
    B, N, D = x.shape
    K = layer.top_k
    xf = x.reshape(B * N, D)
    order, token, gates, sizes = official_gating(layer.router(xf, task), layer.num_experts)
    q = ParallelLinear.apply(xf.index_select(0, token), sizes, layer.w_q)  # (P, Dh), sorted by expert
    q = q.new_zeros(B * N * K, q.shape[1]).index_add(0, order, q).view(B, N, K, -1)  # (B, N, K, Dh)
    k, v = layer.kv(x).chunk(2, dim=-1)  # (B, N, Dh) each
    att = torch.einsum("bihd,bjd->bhij", q, k) * q.shape[-1] ** -0.5  # (B, K, N, N)
    a = torch.einsum("bhij,bjd->bihd", att.softmax(dim=-1), v)  # (B, N, K, Dh)
    y = ParallelLinear.apply(a.reshape(B * N * K, -1).index_select(0, order), sizes, layer.w_o) * gates[:, None]
    return xf.new_zeros(B * N, D).index_add(0, token, y).view(B, N, D)


# -----------------------------------------------------------------------------
# 1. Layers


def layer_cases(quick):
    """(label, config, batch, repetitions): the tiny default and ViT-S (the small preset: D 384, 197 tokens)."""
    tiny = ModSquadConfig()
    small = ModSquadConfig.from_preset("mtvit_taskgate_att_mlp_small_MI_twice")
    if quick:
        return [("tiny B8", tiny, 8, 6), ("ViT-S B2", small, 2, 4)]
    return [("tiny B32", tiny, 32, 40), ("ViT-S B8", small, 8, 16), ("ViT-S B32", small, 32, 6)]


def layer_candidates(kind, cfg, device):
    """The MoE layer and its comparisons, as name -> (module, forward(x) -> y)."""
    D, K, Dh, task = cfg.embed_dim, cfg.num_heads, cfg.head_dim, 0
    if kind == "MoE MLP":
        moe = MoEMLP(cfg).to(device)
        dense = MLP(D, cfg.mlp_top_k * cfg.mlp_dim).to(device)  # hidden K*Dm: the active FLOPs of the K experts (no router)
        return {"fast": (moe, lambda x: moe(x, task)[0]), "dense": (dense, lambda x: dense(x)[0]),
                "loop": (moe, lambda x: loop_moe_mlp(moe, x, task))}
    moe = MoEAttention(cfg).to(device)
    mqa = Attention(D, K, Dh, num_kv_heads=1, qkv_bias=cfg.qkv_bias).to(device)  # K heads of Dh on one k/v head
    mha = Attention(D, K, Dh, num_kv_heads=K, qkv_bias=cfg.qkv_bias).to(device)  # the model's dense attention
    return {"fast": (moe, lambda x: moe(x, task)[0]), "dense": (mqa, lambda x: mqa(x)[0]),
            "loop": (moe, lambda x: loop_moe_attention(moe, x, task)), "MHA": (mha, lambda x: mha(x)[0])}


def forward_only(fn, x):
    def run():
        with torch.no_grad():
            fn(x)
    return run


def forward_backward(module, fn, x, grad):
    def run():
        module.zero_grad(set_to_none=True)
        x.grad = None
        fn(x).backward(grad)
    return run


def bench_layers(device, cases):
    rows, results = [], []
    for label, cfg, B, reps in cases:
        N = (cfg.img_size // cfg.patch_size) ** 2 + 1
        torch.manual_seed(0)
        x = torch.randn(B, N, cfg.embed_dim, device=device, requires_grad=True)
        grad = torch.randn(B, N, cfg.embed_dim, device=device)
        for kind in ("MoE MLP", "MoE attention"):
            cands = layer_candidates(kind, cfg, device)
            for mode in ("fwd", "fwd+bwd"):
                fns = {name: forward_only(fn, x) if mode == "fwd" else forward_backward(m, fn, x, grad)
                       for name, (m, fn) in cands.items()}
                t = interleaved(fns, reps, device)
                vs_dense, vs_loop = ratio(t, "fast", "dense"), ratio(t, "fast", "loop")
                target = ""
                if mode == "fwd+bwd":
                    target = verdict(vs_dense <= LAYER_VS_DENSE and vs_loop < 1)
                mha = f"{ms(t['MHA']):.2f}" if "MHA" in t else ""
                vs_mha = f"{ratio(t, 'fast', 'MHA'):.2f}x" if "MHA" in t else ""
                rows.append([kind, label, mode, f"{ms(t['fast']):.2f}", f"{ms(t['dense']):.2f}", f"{ms(t['loop']):.2f}",
                             mha, f"{vs_dense:.2f}x", f"{vs_loop:.2f}x", vs_mha, target])
                results.append(dict(layer=kind, size=label, mode=mode, ms={k: ms(v) for k, v in t.items()},
                                    fast_vs_dense=vs_dense, fast_vs_loop=vs_loop, target=target or None))
    header = ["layer", "size", "pass", "fast ms", "dense ms", "loop ms", "MHA ms", "fast/dense", "fast/loop",
              "fast/MHA", f"target (fwd+bwd <= {LAYER_VS_DENSE}x dense, < loop)"]
    print_table("MoE layers: fast path vs the dense twin of equal active FLOPs less the router's (MLP hidden K*Dm; "
                "multi-query attention) and the official sort-and-loop dispatch", header, rows)
    return results


# -----------------------------------------------------------------------------
# 2. Whole model


def random_batch(cfg, B, device):
    """Images and targets of the right shapes and ranges (the timing does not depend on their content)."""
    images, targets = next(iter(torch.utils.data.DataLoader(data.RandomTargets(cfg.tasks, cfg.img_size, B), B)))
    return images.to(device), {k: v.to(device) for k, v in targets.items()}


def make_step(model, images, targets, one_call=True):
    """One training step as train.py takes it: every task's pass on the same images (all in one model call, or one
    call per task), Σ task losses + w_MI * L_MI, one backward, one AdamW step."""
    cfg = model.cfg
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, eps=1e-4, weight_decay=0.05)

    def step():
        optimizer.zero_grad(set_to_none=True)
        if one_call:
            preds, routings = model(images, list(range(len(cfg.tasks))))
        else:
            preds, routings = map(list, zip(*(model(images, t) for t in range(len(cfg.tasks)))))
        losses = [evaluate.task_loss(name, pred, targets[name]) for (name, _, _), pred in zip(cfg.tasks, preds)]
        loss = torch.stack(losses).sum() + cfg.mi_weight * mi_loss(routings).to(images.device)
        loss.backward()
        optimizer.step()

    return step, optimizer


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def peak_bytes(fn, resident, device):
    """Peak bytes of live tensors while fn runs: on CUDA the allocator's peak; on CPU the bytes already resident
    plus the peak of the running sum of allocations and frees recorded by the profiler (per op: temporaries freed
    inside one op are missed)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device)
    # the legacy profiler records the same memory events and starts in 0.1 s, not kineto's 3 s
    with torch.autograd.profiler.profile(profile_memory=True, use_kineto=False) as prof:
        fn()
    current = peak = 0
    for e in sorted(prof.function_events, key=lambda e: e.time_range.start):
        current += e.self_cpu_memory_usage
        peak = max(peak, current)
    return resident + peak


def optimizer_state(optimizer):
    return [v for s in optimizer.state.values() for v in s.values()]


def bench_model(device, cfg, B, reps, task=2):
    """Training step of Mod-Squad vs the dense baseline; extracted single-task model vs the full model."""
    torch.manual_seed(0)
    models = {"Mod-Squad": ModSquad(cfg).to(device), "dense": ModSquad(replace(cfg, moe=False)).to(device)}
    images, targets = random_batch(cfg, B, device)
    steps, optimizers = {}, {}
    for name, model in models.items():
        steps[name], optimizers[name] = make_step(model.train(), images, targets)
    t = interleaved(steps, reps, device)
    step_ratio = ratio(t, "Mod-Squad", "dense")
    rows = []
    for name, model in models.items():
        optimizers[name].zero_grad(set_to_none=True)  # the step frees no tensor it did not allocate
        resident = tensor_bytes(model.parameters()) + tensor_bytes(optimizer_state(optimizers[name]))
        rows.append([name, f"{ms(t[name]):.1f}", f"{sum(p.numel() for p in model.parameters()) / 1e6:.3f}",
                     f"{count_params_flops(model)['macs'] / 1e6:.2f}",
                     f"{peak_bytes(steps[name], resident, device) / 2**20:.1f}", ""])
    rows.append(["Mod-Squad/dense", f"{step_ratio:.2f}x", "", "", "",
                 f"{verdict(step_ratio <= STEP_VS_DENSE)} (<= {STEP_VS_DENSE}x)"])
    print_table(f"Training step, {len(cfg.tasks)} tasks, batch {B}: Mod-Squad vs the dense baseline of equal active "
                "FLOPs less the routers'", ["model", "step ms", "params (M)", "MMACs/image/task", "peak MiB", "target"], rows)
    results = dict(batch=B, step_ms={k: ms(v) for k, v in t.items()}, step_ratio=step_ratio,
                   images_per_s=B / statistics.median(t["Mod-Squad"]))

    # extraction: the task's expert usage on a few batches, then keep the experts used by > 3 % of its tokens
    full = models["Mod-Squad"].eval()
    usage = expert_usage(full, [random_batch(cfg, B, device)[0] for _ in range(3)], task)
    models = {"full": full, "extracted": extract(full, task, usage, threshold=0.03).eval()}
    tasks = {"full": task, "extracted": 0}
    fns = {name: (lambda m=m, i=tasks[name]: m(images, i)) for name, m in models.items()}
    with torch.no_grad():
        t = interleaved(fns, 2 * reps, device)
        peaks = {name: peak_bytes(fns[name], tensor_bytes(m.state_dict().values()), device)
                 for name, m in models.items()}
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    counts = {name: count_params_flops(m, tasks[name]) for name, m in models.items()}
    flops = {name: c["macs"] + c["head_macs"] for name, c in counts.items()}  # per image: backbone, routers, head
    fewer = 1 - params["extracted"] / params["full"]
    extract_ratio = ratio(t, "extracted", "full")
    rows = [[name, f"{ms(t[name]):.2f}", f"{params[name] / 1e6:.3f}", f"{flops[name] / 1e6:.2f}",
             f"{peaks[name] / 2**20:.1f}", ""] for name in models]
    rows.append(["extracted/full", f"{extract_ratio:.2f}x", f"{1 - fewer:.2f}x ({fewer:.0%} fewer)",
                 "equal" if flops["full"] == flops["extracted"] else "DIFFERENT",
                 f"{peaks['extracted'] / peaks['full']:.2f}x",
                 f"{verdict(fewer >= EXTRACT_PARAMS and flops['full'] == flops['extracted'])} "
                 f"(>= {EXTRACT_PARAMS:.0%} fewer params, same FLOPs)"])
    kept = [len(ids) for ids in models["extracted"].cfg.kept_experts]
    total = [m.num_experts for m in full.moe_layers]
    print_table(f"Extracted model vs full model: task {cfg.tasks[task][0]}, inference batch {B}, experts kept per MoE "
                f"layer {', '.join(f'{k}/{e}' for k, e in zip(kept, total))} (usage on 3 random batches, threshold "
                f"0.03)", ["model", "forward ms", "params (M)", "MMACs/image", "peak MiB", "target"], rows)
    results.update(extract_ratio=extract_ratio, params=params, fewer_params=fewer, flops=flops, kept=kept)
    return results


def one_call_cases(device, quick):
    """(label, config, per-task batches, repetitions) of the one-call vs per-task-loop step. CPU: the tiny default
    and a ViT-S-shaped model (ViT-S width and experts, 4 blocks, 112 px = 50 tokens, to keep a step in seconds);
    CUDA: the real ViT-B preset at the paper's per-GPU batch 6, and ViT-S."""
    tiny = ModSquadConfig()
    small = ModSquadConfig.from_preset("mtvit_taskgate_att_mlp_small_MI_twice")
    if device.type == "cuda":
        base = ModSquadConfig.from_preset("mtvit_taskgate_att_mlp_base_MI_twice")
        return [("ViT-B", base, [6], 3 if quick else 10), ("ViT-S", small, [14], 3 if quick else 10)]
    small_shaped = replace(small, depth=4, img_size=112)
    if quick:
        return [("tiny", tiny, [4, 8], 3), ("ViT-S-shaped", small_shaped, [2], 2)]
    return [("tiny", tiny, [4, 8, 32], 10), ("ViT-S-shaped", small_shaped, [4], 4)]


def bench_one_call(device, cases):
    """The training step with all T tasks in one backbone call (T*B rows) against one call per task (B rows each):
    same computation, same activations kept for the one backward."""
    rows, results = [], []
    for label, cfg, batches, reps in cases:
        torch.manual_seed(0)
        model = ModSquad(cfg).to(device).train()
        for B in batches:
            images, targets = random_batch(cfg, B, device)
            steps, optimizers = {}, {}
            for name, one_call in (("loop", False), ("one call", True)):
                steps[name], optimizers[name] = make_step(model, images, targets, one_call)
            t = interleaved(steps, reps, device)
            speedup = ratio(t, "loop", "one call")
            peaks = {}
            for name in steps:
                optimizers[name].zero_grad(set_to_none=True)
                resident = tensor_bytes(model.parameters()) + tensor_bytes(optimizer_state(optimizers[name]))
                peaks[name] = peak_bytes(steps[name], resident, device)
            target = ""
            if label == "tiny" and B in (8, 32) and device.type == "cpu":
                need = 1.4 if B == 8 else 1.0
                target = f"{verdict(speedup >= need)} (>= {need}x)"
            elif label == "ViT-B" and device.type == "cuda":
                target = f"{verdict(speedup >= 2.0)} (>= 2x)"
            rows.append([label, len(cfg.tasks), B, f"{ms(t['loop']):.1f}", f"{ms(t['one call']):.1f}",
                         f"{speedup:.2f}x", f"{peaks['loop'] / 2**20:.1f}", f"{peaks['one call'] / 2**20:.1f}",
                         target])
            results.append(dict(model=label, batch=B, ms={k: ms(v) for k, v in t.items()}, speedup=speedup,
                                peak_mib={k: v / 2**20 for k, v in peaks.items()}))
        del model
    print_table("Training step: all tasks in one backbone call vs one call per task (fwd + MI + bwd + AdamW)",
                ["model", "tasks", "per-task batch", "loop ms", "one call ms", "loop/one call", "loop peak MiB",
                 "one call peak MiB", "target"], rows)
    return results


# -----------------------------------------------------------------------------
# 3. Data


def bench_data(device, samples, images_per_s):
    """Samples per second of the synthetic dataset (one process, all 13 tasks) against the training step's appetite."""
    ds = data.SyntheticScenes(split="train", img_size=32)
    ds[0]
    t0 = time.perf_counter()
    for i in range(1, samples + 1):
        ds[i]
    made_per_s = samples / (time.perf_counter() - t0)
    r = made_per_s / images_per_s
    rows = [[f"{made_per_s:.1f}", f"{images_per_s:.1f}", f"{r:.1f}x",
             f"{verdict(r >= DATA_VS_STEP)} (>= {DATA_VS_STEP}x)"]]
    print_table("Synthetic data (13 tasks, 32 px, one process) vs the Mod-Squad training step's consumption",
                ["samples/s generated", "images/s consumed", "generated/consumed", "target"], rows)
    return dict(samples_per_s=made_per_s, images_per_s=images_per_s, ratio=r)


# -----------------------------------------------------------------------------
# 5. Loader: one worker's real-format Taskonomy samples against a training step's appetite


def loader_cases(device, quick):
    """(label, config, batch, repetitions) of the training steps a loader must feed: the default model and the
    ViT-S / ViT-B presets. CUDA: the recipes' per-GPU batches (ViT-S 14, ViT-B 6), bf16 autocast as train.py;
    CPU: batch 2 for the presets (a CPU step stands in for the GPU's, so its images/s is no GPU's)."""
    default = ModSquadConfig()
    small = ModSquadConfig.from_preset("mtvit_taskgate_att_mlp_small_MI_twice")
    base = ModSquadConfig.from_preset("mtvit_taskgate_att_mlp_base_MI_twice")
    if device.type == "cuda":
        return [("default", default, 32, 10), ("ViT-S", small, 14, 3 if quick else 10),
                ("ViT-B", base, 6, 3 if quick else 10)]
    return [("default", default, 8 if quick else 32, 3 if quick else 10), ("ViT-S", small, 2, 1 if quick else 3),
            ("ViT-B", base, 2, 1 if quick else 2)]


def worker_samples_per_s(root, img_size, samples):
    """Samples per second of one DataLoader worker (one thread, as a worker runs) reading all 13 tasks of the
    Taskonomy tree at root with the training augmentation (random crop and flip): decode, resize, crop, targets."""
    buildings = sorted(os.listdir(os.path.join(root, "rgb", "taskonomy")))
    ds = data.TaskonomyDataset(root, split="train", buildings=buildings, img_size=img_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ds[(0, 0)]
        t = []
        for i in range(samples):
            t0 = time.perf_counter()
            ds[(i % len(ds), i)]
            t.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return 1 / statistics.median(t), len(ds)


def bench_loader(device, cases, root=None, samples=40, views=4):
    """Images per second of each case's training step, and the loader workers it needs: step images/s divided by one
    worker's samples/s, both measured in this run. The tree: root, else a freshly written 512 px tree of `views`
    synthetic views (its flat-coloured images make PNGs ~6x smaller than real views, so real files decode slower:
    read a real download with --loader-root)."""
    source = root or "a freshly written tree"
    with tempfile.TemporaryDirectory() as tmp:
        if root is None:
            import data_trees  # the tree writer; written here, read back like a download
            root = os.path.join(tmp, "taskonomy")
            data_trees.write_taskonomy(root, buildings=1, views=views)
        per_worker = {}
        for _, cfg, _, _ in cases:
            if cfg.img_size not in per_worker:
                per_worker[cfg.img_size] = worker_samples_per_s(root, cfg.img_size, samples)
    rows, results = [], []
    for label, cfg, B, reps in cases:
        torch.manual_seed(0)
        model = ModSquad(cfg).to(device).train()
        images, targets = random_batch(cfg, B, device)
        step, _ = make_step(model, images, targets)
        if device.type == "cuda":  # as train.py: bf16 autocast (the router stays fp32 inside the model)
            fp32_step = step

            def step():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    fp32_step()
        step_images_per_s = B / statistics.median(interleaved({"step": step}, reps, device)["step"])
        worker, n_views = per_worker[cfg.img_size]
        need = step_images_per_s / worker
        on = "CUDA step, bf16" if device.type == "cuda" else "CPU step" if label == "default" else \
            "CPU step (stands in for a GPU's)"
        rows.append([label, on, B, cfg.img_size, f"{B / step_images_per_s:.3g}", f"{step_images_per_s:.3g}",
                     f"{worker:.1f}", f"{1000 / worker:.0f}", f"{need:.3g}", math.ceil(need)])
        results.append(dict(model=label, device=device.type, batch=B, img_size=cfg.img_size,
                            step_images_per_s=step_images_per_s, worker_samples_per_s=worker, workers_needed=need))
        del model, step
    print_table(f"Taskonomy loader: one worker (1 thread, 13 tasks + rgb from 512 px files, train augmentation, "
                f"{n_views} views of {source}) vs the training step; workers needed = step images/s / worker "
                f"samples/s",
                ["model", "step on", "batch", "px", "step s", "step images/s", "worker samples/s", "ms/sample",
                 "workers needed", "workers (ceil)"], rows)
    return results


# -----------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--quick", action="store_true", help="fewer repetitions and smaller batches")
    p.add_argument("--only", choices=["layers", "model", "one-call", "data", "loader"], default=None,
                   help="run one section")
    p.add_argument("--loader-root", default=None, help="loader: a Taskonomy tree to read (default: write a 512 px "
                   "tree of synthetic views to a temporary folder)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's); 1 on a machine whose cores other jobs also use, where "
                        "threads that wait for each other stall")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to torch")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads"
          f"{', quick' if args.quick else ''}; times are medians, ratios medians of paired repetitions")
    B, reps = (8, 3) if args.quick else (32, 10)
    results = {}
    if args.only in (None, "layers"):
        results["layers"] = bench_layers(device, layer_cases(args.quick))
    if args.only in (None, "model"):
        results["model"] = bench_model(device, ModSquadConfig(), B, reps)
    if args.only in (None, "one-call"):
        results["one_call"] = bench_one_call(device, one_call_cases(device, args.quick))
    if args.only in (None, "data"):
        if "model" in results:
            images_per_s = results["model"]["images_per_s"]
        else:
            images, targets = random_batch(ModSquadConfig(), B, device)
            step, _ = make_step(ModSquad(ModSquadConfig()).to(device).train(), images, targets)
            images_per_s = B / statistics.median(interleaved({"step": step}, reps, device)["step"])
        results["data"] = bench_data(device, 16 if args.quick else 150, images_per_s)
    if args.only in (None, "loader"):
        results["loader"] = bench_loader(device, loader_cases(device, args.quick), args.loader_root,
                                         samples=10 if args.quick else 40)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
