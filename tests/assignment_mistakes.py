"""Plausible wrong answers to the README's six assignments, each a drop-in replacement for a function the assignment
rewrites, and the machinery to grade them with the README's own grading commands.

tests/test_model_assignments.py (slow) checks that each assignment's grading command rejects every wrong answer
here (some selected test fails) and the blank (every selected test fails); tests/test_readme.py checks that the
README's Assignments section lists exactly these, and that each command selects the number of tests it states.
By hand:  python tests/assignment_mistakes.py mi_xlogy     (grades that wrong answer, prints the outcomes)
"""
import functools
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import modsquad as ms  # noqa: E402

MISTAKES = {}  # name -> (assignment, what is wrong, {"function" or "Class.method": (implementation, how)})
CONTROLS = {}  # the same for other correct answers, written unlike modsquad.py's: the grading must accept them
BLANKS = {  # assignment -> what its blank replaces, as handed out (raise NotImplementedError)
    1: ("task_expert_joint", "mutual_information_loss"), 2: ("TaskRouter.forward",), 3: ("MoEMLP.forward",),
    4: ("count_params_flops",), 5: ("expert_usage", "extract"), 6: ("MoEAttention.forward",)}


def wrong(prefix, assignment, target, fn, variants):
    """Register fn(..., how=h) as the wrong answer prefix_h for each (h, what) of variants."""
    for how, what in variants:
        MISTAKES[f"{prefix}_{how}"] = (assignment, what, {target: (fn, how)})


# -----------------------------------------------------------------------------
# 1: task_expert_joint, mutual_information_loss

def _mi(p_te, how):
    p_t, p_e = p_te.sum(1, keepdim=True), p_te.sum(0, keepdim=True)
    if how == "uniform_p_t":
        p_t = torch.full_like(p_t, 1 / p_te.shape[0])
    if how == "xlogy":
        return -torch.special.xlogy(p_te, p_te / (p_t * p_e)).sum()
    if how == "where":
        return -torch.where(p_te > 0, p_te * torch.log(p_te / (p_t * p_e)), 0.0).sum()
    if how == "official_epsilons":  # moe.py:427-430
        p_t, p_e = p_t + 1e-4, p_e + 1e-4
        return -(p_te * torch.log(p_te / p_t / p_e + 1e-4)).sum()
    if how == "masked":  # correct: only the P(t,e) > 0 terms, which gives a zero gradient where P(t,e) = 0
        nz = p_te > 0
        return -(p_te[nz] * torch.log(p_te[nz] / (p_t * p_e).expand_as(p_te)[nz])).sum()
    terms = p_te * (p_te / (p_t * p_e)).clamp_min(1e-20).log()
    return terms.mean() * -1 if how == "mean" else (terms.sum() if how == "plus_mi" else -terms.sum())


wrong("mi", 1, "mutual_information_loss", _mi, [
    ("xlogy", "0 log 0 by torch.special.xlogy: NaN gradients where P(t,e) = 0"),
    ("where", "0 log 0 by torch.where(P > 0, ...): NaN gradients where P(t,e) = 0"),
    ("official_epsilons", "the official 1e-4s (moe.py:427-430): not 0 at independence, not -log T at one-to-one"),
    ("uniform_p_t", "P(t) = 1/T assumed instead of the joint's marginal"),
    ("plus_mi", "returns +I(T;E) instead of -I(T;E)"),
    ("mean", "mean over (t, e) instead of the sum"),
])


def _joint(probs_per_task, how):
    if how == "not_divided_by_T":
        return torch.stack([p.float().mean(0) for p in probs_per_task])
    if how == "hard_counts":  # top-1 choices: no gradient reaches the routers
        return torch.stack([F.one_hot(p.argmax(-1), p.shape[-1]).float().mean(0) for p in probs_per_task]) / len(
            probs_per_task)


wrong("joint", 1, "task_expert_joint", _joint, [
    ("not_divided_by_T", "P(t, e) without the 1/T: the joint sums to T"),
    ("hard_counts", "P(t, e) from hard top-1 choices: no gradient to the routers"),
])


# -----------------------------------------------------------------------------
# 2: TaskRouter.forward

def _router(self, x, task, how):
    tasks = [task] if isinstance(task, int) else list(task)
    if how == "first_task_for_all":
        tasks = [tasks[0]] * len(tasks)
    dtype = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=how == "autocast_on"):
        if how == "interleaved_blocks":  # rows t, t+T, t+2T, ... taken as task t's
            x = x.to(dtype).view(-1, len(tasks), x.shape[-1]).transpose(0, 1)
        else:
            x = x.to(dtype).view(len(tasks), -1, x.shape[-1])
        logits = torch.bmm(x, self.w_gate[tasks].to(dtype).transpose(1, 2))
        if self.w_noise is not None and (self.training or how == "noise_in_eval"):
            noise_std = F.softplus(torch.bmm(x, self.w_noise[tasks].transpose(1, 2))) + 1e-2
            logits = logits + torch.randn_like(logits) * noise_std
        if how == "interleaved_blocks":
            logits = logits.transpose(0, 1)
        logits = logits.flatten(0, 1)
        if how == "softmax_over_kept":  # the official extraction's re-softmax
            probs = logits.index_select(1, self.expert_ids).softmax(-1)
            top_p, topk_idx = probs.topk(self.top_k, dim=-1)
        else:
            probs = logits.softmax(dim=-1)
            candidates = probs if how == "topk_over_all_experts" else probs.index_select(1, self.expert_ids)
            top_p, topk_idx = candidates.topk(self.top_k, dim=-1)
        gates = top_p + 1e-4
        if how == "renormalised":
            gates = top_p / top_p.sum(-1, keepdim=True)
        if how == "no_epsilon":
            gates = top_p
    if how == "autocast_on":
        probs, gates = probs.float(), gates.float()
    return ms.Routing(probs, topk_idx, gates)


wrong("router", 2, "TaskRouter.forward", _router, [
    ("renormalised", "gates renormalised over the K chosen experts"),
    ("no_epsilon", "gates without the official + 1e-4"),
    ("topk_over_all_experts", "top-k over all experts, ignoring expert_ids (extracted models)"),
    ("softmax_over_kept", "softmax over the kept experts only (the official extraction's)"),
    ("first_task_for_all", "the first task's router for every row block"),
    ("interleaved_blocks", "row blocks taken as interleaved (row r is task r % T's)"),
    ("noise_in_eval", "gating noise in eval too (as the official)"),
    ("autocast_on", "router left under autocast: bf16 logits"),
])


# -----------------------------------------------------------------------------
# 3: MoEMLP.forward

def _moe_mlp(self, x, task, how):
    if how == "dense_reference":  # correct values, but every expert on every token
        return self.forward_reference(x, task)
    B, N, D = x.shape
    x = x.reshape(B * N, D)
    routing = self.router(x, task)
    d = ms.sort_by_expert(routing.topk_idx, self.num_experts)
    gelu = (lambda h: F.gelu(h, approximate="tanh")) if how == "tanh_gelu" else F.gelu
    h = gelu(ms.expert_matmul(x[d.token], self.w_in, d) + self.b_in[d.expert])
    y = ms.expert_matmul(h, self.w_out, d)
    gates = routing.gates.flatten() if how == "gates_unsorted" else routing.gates.flatten()[d.order]
    if how == "detached_gates":
        gates = gates.detach()
    if how == "gate_before_bias":
        y = y * gates[:, None] + self.b_out[d.expert]
    else:
        y = (y + self.b_out[d.expert]) * gates[:, None]
    return torch.zeros_like(x).index_add(0, d.token, y).view(B, N, D), routing


wrong("mlp", 3, "MoEMLP.forward", _moe_mlp, [
    ("gate_before_bias", "g (h W_out) + b_out: the gate leaves the output bias out"),
    ("gates_unsorted", "gates in pair order applied to rows sorted by expert"),
    ("detached_gates", "gates detached: the task loss never reaches the router"),
    ("tanh_gelu", "GELU's tanh approximation"),
    ("dense_reference", "forward_reference's values, every expert on every token (not sparse)"),
])


# -----------------------------------------------------------------------------
# 4: count_params_flops

def _counts(cfg_or_model, task=0, *, how):
    cfg = cfg_or_model.cfg if isinstance(cfg_or_model, nn.Module) else cfg_or_model
    D, Dh, Dm, T = cfg.embed_dim, cfg.head_dim, cfg.mlp_dim, len(cfg.tasks)
    H, Km = cfg.num_heads, cfg.mlp_top_k
    p, L = cfg.patch_size, (cfg.img_size // cfg.patch_size) ** 2
    N = L if how == "patches_not_tokens" else L + 1
    gate = 2 if cfg.noisy_gating else 1
    kept = list(cfg.kept_experts or [])
    params = cfg.in_chans * p * p * D + D + D + (L + 1) * D + (0 if how == "no_task_embeddings" else T * D)
    macs, router_macs = L * cfg.in_chans * p * p * D, 0
    T_r = 1 if how == "one_router_when_kept" and cfg.kept_experts else T
    kv_bias = cfg.qkv_bias if how == "kv_bias_follows_qkv_bias" else 1
    for i in range(cfg.depth):
        attn, mlp = cfg.block_kinds(i)
        params += 4 * D
        if attn == "dense" or not cfg.moe:
            Hkv = H if attn == "dense" and how != "dense_attention_one_kv_head" else 1
            params += (D + cfg.qkv_bias) * (H + 2 * Hkv) * Dh + H * Dh * D + D
            macs += N * D * (H + 2 * Hkv) * Dh + 2 * N * N * H * Dh + N * H * Dh * D
        else:
            E = len(kept.pop(0)) if cfg.kept_experts and how != "ignores_kept_experts" else cfg.num_attn_experts
            if cfg.kept_experts and how == "ignores_kept_experts":
                kept.pop(0)
            params += gate * T_r * cfg.num_attn_experts * D + 2 * E * D * Dh + D * 2 * Dh + kv_bias * 2 * Dh
            router_macs += N * D * cfg.num_attn_experts
            Ka = cfg.num_attn_experts if how == "all_experts_macs" else H
            macs += N * Ka * D * Dh + N * D * 2 * Dh + 2 * N * N * H * Dh + N * Ka * Dh * D
        if mlp == "dense" or not cfg.moe:
            hidden = int(D * cfg.mlp_ratio) if mlp == "dense" else Km * Dm
            params += 2 * D * hidden + hidden + D
            macs += 2 * N * D * hidden
        else:
            E = len(kept.pop(0)) if cfg.kept_experts and how != "ignores_kept_experts" else cfg.num_mlp_experts
            if cfg.kept_experts and how == "ignores_kept_experts":
                kept.pop(0)
            params += gate * T_r * cfg.num_mlp_experts * D + E * (2 * D * Dm + Dm + D)
            router_macs += N * D * cfg.num_mlp_experts
            macs += 2 * N * (cfg.num_mlp_experts if how == "all_experts_macs" else Km) * D * Dm
    kinds = [kind for _, _, kind in cfg.tasks]
    params += 2 * D * ("dense" in kinds) + 2 * D * ("image" in kinds)
    for _, C, kind in cfg.tasks:
        params += (D + 1) * p * p * C if kind == "dense" else 2 * D + (D + 1) * C
    _, C, kind = cfg.tasks[task]
    head_macs = L * D * p * p * C if kind == "dense" else D * C
    if how != "routers_left_out_of_macs":
        macs += router_macs
    return dict(params=int(params), macs=int(macs), router_macs=int(router_macs), head_macs=int(head_macs))


wrong("counts", 4, "count_params_flops", _counts, [
    ("all_experts_macs", "MACs of all E experts, not the K chosen"),
    ("routers_left_out_of_macs", "router MACs reported apart but left out of macs"),
    ("no_task_embeddings", "the task embeddings' T*D parameters left out"),
    ("kv_bias_follows_qkv_bias", "MoE attention's k/v bias counted only with qkv_bias"),
    ("ignores_kept_experts", "all E experts' parameters after extraction"),
    ("one_router_when_kept", "one task's routers whenever kept_experts is set"),
    ("dense_attention_one_kv_head", "dense attention blocks counted with one k/v head"),
    ("patches_not_tokens", "N = patches, without the cls token"),
])


# -----------------------------------------------------------------------------
# 5: expert_usage, extract

@torch.no_grad()
def _usage(model, batches, task, how):
    was_training = model.training
    if how != "train_mode":
        model.eval()
    fractions, counts, tokens = [], [torch.zeros(m.num_experts) for m in model.moe_layers], 0
    for batch in batches:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        _, routings = model(images, task)
        batch_counts = [torch.bincount(r.topk_idx.flatten(), minlength=len(c)).float() for c, r in zip(counts, routings)]
        fractions.append([c / routings[0].topk_idx.shape[0] for c in batch_counts])
        counts = [c + b for c, b in zip(counts, batch_counts)]
        tokens += routings[0].topk_idx.shape[0]
    if how != "mode_not_restored":
        model.train(was_training)
    if how == "mean_of_batch_fractions":
        return [torch.stack(f).mean(0) for f in zip(*fractions)]
    if how == "sums_to_one":
        return [c / (tokens * m.top_k) for c, m in zip(counts, model.moe_layers)]
    return [c / tokens for c in counts]


wrong("usage", 5, "expert_usage", _usage, [
    ("sums_to_one", "fractions of the token-slot pairs (sum to 1, not K)"),
    ("mean_of_batch_fractions", "the mean of per-batch fractions: batches of unequal size"),
    ("train_mode", "measured in training mode (drop-path, gating noise)"),
    ("mode_not_restored", "leaves the model in eval mode"),
])


def _extract(model, task, usage, threshold=0.03, *, how):
    keeps = []
    for u, layer in zip(usage, model.moe_layers):
        keep = (u >= threshold if how == "at_least_threshold" else u > threshold).nonzero().flatten()
        if keep.numel() < layer.top_k and how != "no_at_least_k":
            keep = torch.arange(layer.top_k) if how == "first_k_ids" else u.topk(layer.top_k).indices
        keeps.append(keep.sort().values)
    name, _, kind = model.cfg.tasks[task]
    if how == "local_ids":
        kept_ids = tuple(tuple(k.tolist()) for k in keeps)
    else:
        kept_ids = tuple(tuple(layer.router.expert_ids[k].tolist()) for layer, k in zip(model.moe_layers, keeps))
    small = ms.copy.deepcopy(model)
    small.cfg = replace(model.cfg, tasks=(model.cfg.tasks[task],), kept_experts=kept_ids)
    row = 0 if how == "first_task_embedding" else task
    small.task_embed = nn.Parameter(model.task_embed.data[row : row + 1].clone())
    small.heads = nn.ModuleDict({name: small.heads[name]})
    if kind == "dense":
        small.fc_norm = None
    else:
        small.norm = None
    for layer, keep in zip(small.moe_layers, keeps):
        layer.keep_(task, keep)
        if how == "router_pruned":  # the official: the router keeps only the kept experts' rows (re-softmax)
            r = layer.router
            r.w_gate = nn.Parameter(r.w_gate.data[:, r.expert_ids].clone())
            r.expert_ids = torch.arange(len(keep))
    return small


wrong("extract", 5, "extract", _extract, [
    ("at_least_threshold", "keeps usage >= threshold instead of >"),
    ("no_at_least_k", "no fallback to the K most used when fewer pass"),
    ("first_k_ids", "the fallback keeps the first K ids, not the K most used"),
    ("local_ids", "kept_experts as positions in an extracted model, not original ids"),
    ("first_task_embedding", "the first task's embedding, not `task`'s"),
    ("router_pruned", "the router cut to the kept experts (the official re-softmax)"),
])


# -----------------------------------------------------------------------------
# 6: MoEAttention.forward

def _moe_attention(self, x, task, how):
    if how == "dense_reference":  # correct values, but every expert on every token
        return self.forward_reference(x, task)
    B, N, D = x.shape
    K = self.top_k
    routing = self.router(x.reshape(B * N, D), task)
    idx = routing.topk_idx.view(B, N, K)
    q = torch.einsum("bnd,bnkdc->bknc", x, self.w_q[idx])  # (B, K, N, Dh): slot j's queries as head j
    k, v = self.kv(x).chunk(2, dim=-1)  # (B, N, Dh)
    if how == "keys_across_images":
        k, v = k.reshape(1, B * N, -1).expand(B, -1, -1), v.reshape(1, B * N, -1).expand(B, -1, -1)
    scale = 1 / math.sqrt(D if how == "scale_by_D" else q.shape[-1])
    att = q @ k[:, None].transpose(-1, -2) * scale  # (B, K, N, N or B*N)
    if how == "causal":
        att = att.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))
    att = att.softmax(dim=-2 if how == "softmax_over_queries" else -1)
    a = att @ v[:, None]  # (B, K, N, Dh)
    y = torch.einsum("bknc,bnkcd->bnkd", a, self.w_o[idx])  # (B, N, K, D)
    gates = routing.gates.view(B, N, K, 1).to(y.dtype)
    return (y if how == "no_gates" else y * gates).sum(2), routing


wrong("attention", 6, "MoEAttention.forward", _moe_attention, [
    ("scale_by_D", "scores scaled by 1/sqrt(D) instead of 1/sqrt(Dh)"),
    ("no_gates", "the K experts' outputs summed without their gates"),
    ("keys_across_images", "keys and values of all B*N tokens: images attend to each other"),
    ("softmax_over_queries", "attention softmax over the query axis"),
    ("causal", "a causal mask (a ViT attends both ways)"),
    ("dense_reference", "forward_reference's values, every expert on every token (not sparse)"),
])


# Correct answers written unlike modsquad.py's (the implementations above without a mistake)
CONTROLS.update({
    "mi_masked": (1, "L_MI over the P(t,e) > 0 entries only", {"mutual_information_loss": (_mi, "masked")}),
    "router_as_written": (2, "a second copy of the router", {"TaskRouter.forward": (_router, "")}),
    "mlp_gathered_bias": (3, "sorted dispatch, biases gathered per pair, out of place",
                          {"MoEMLP.forward": (_moe_mlp, "")}),
    "counts_as_written": (4, "a second copy of the counts", {"count_params_flops": (_counts, "")}),
    "usage_and_extract_as_written": (5, "second copies of both",
                                     {"expert_usage": (_usage, ""), "extract": (_extract, "")}),
    "attention_gathered_weights": (6, "each token's K expert weights gathered, K heads of explicit attention",
                                   {"MoEAttention.forward": (_moe_attention, "")}),
})


# -----------------------------------------------------------------------------
# Grading machinery

def apply(name):
    """Put wrong answer `name` (or "blank_<assignment>") in place in modsquad, before the tests import it."""
    if name.startswith("blank_"):
        def blank(*args, **kwargs):
            raise NotImplementedError
        patches = {target: blank for target in BLANKS[int(name[len("blank_"):])]}
    else:
        patches = {target: (functools.partialmethod if "." in target else functools.partial)(fn, how=how)
                   for target, (fn, how) in {**MISTAKES, **CONTROLS}[name][2].items()}
    for target, fn in patches.items():
        owner, attr = (getattr(ms, target.split(".")[0]), target.split(".")[1]) if "." in target else (ms, target)
        setattr(owner, attr, fn)


def grading_commands(readme):
    """{assignment: (-k expression, stated number of tests)} from the README's Assignments table."""
    rows = re.findall(r"^\| (\d) \|.*`python -m pytest -q -k \"([^\"]+)\"` \((\d+) tests\) \|$", readme, flags=re.M)
    return {int(n): (expr, int(count)) for n, expr, count in rows}


def collect(exprs):
    """{expr: [nodeids]} as the README's grading commands select them (one pytest collection in a subprocess)."""
    out = subprocess.run([sys.executable, __file__, "--collect", *exprs], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def grade(name, nodeids):
    """{nodeid: outcome} of the given tests with wrong answer `name` in place (a subprocess each)."""
    out = subprocess.run([sys.executable, __file__, name, *nodeids], cwd=ROOT, capture_output=True, text=True)
    lines = out.stdout.strip().splitlines()
    assert lines and lines[-1].startswith("{"), out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(lines[-1])


class _Recorder:
    """pytest plugin (public hooks only): the outcome of each test run, and the tests a collection selected."""

    def __init__(self):
        self.outcomes, self.selected = {}, []

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            self.outcomes[report.nodeid] = report.outcome

    def pytest_collection_finish(self, session):  # after the -k and -m "not slow" deselections
        self.selected = [item.nodeid for item in session.items]


def _main(argv):
    if argv[0] == "--collect":  # as the README's commands collect: the whole suite, with the pytest.ini addopts
        selected = {}
        for expr in argv[1:]:  # one collection per expression: pytest itself applies -k
            recorder = _Recorder()
            code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "-k", expr,
                                os.path.join(ROOT, "tests")], plugins=[recorder])
            if code not in (0, 5):  # 5: nothing selected
                return code
            selected[expr] = recorder.selected
        print(json.dumps(selected))
        return 0
    name, recorder = argv[0], _Recorder()
    assignment = int(name[len("blank_"):]) if name.startswith("blank_") else {**MISTAKES, **CONTROLS}[name][0]
    nodeids = argv[1:] or collect([grading_commands(open(os.path.join(ROOT, "README.md")).read())[assignment][0]])
    nodeids = nodeids if argv[1:] else list(nodeids.values())[0]
    apply(name)
    pytest.main(["-q", "-p", "no:cacheprovider", "-o", "addopts=", *nodeids], plugins=[recorder])
    print(json.dumps(recorder.outcomes))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
