"""The fast MoE layers (sort by expert + grouped matmul) against slow, obviously-correct loop references."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from modsquad import ModSquad, ModSquadConfig, MoEAttention, MoEMLP, count_params_flops


def moe_mlp_reference(layer, x, task):
    """Every expert on every token, masked: y_i = Σ_j g_ij (GELU(x_i W_in[e] + b_in[e]) W_out[e] + b_out[e])."""
    B, N, D = x.shape
    xf = x.reshape(B * N, D)
    r = layer.router(xf, task)
    out = torch.zeros_like(xf)
    for e in range(layer.num_experts):
        gate = (r.gates * (r.topk_idx == e)).sum(-1, keepdim=True)  # (B*N, 1), 0 where e not chosen
        out = out + gate * (F.gelu(xf @ layer.w_in[e] + layer.b_in[e]) @ layer.w_out[e] + layer.b_out[e])
    return out.view(B, N, D)


def moe_attention_reference(layer, x, task):
    """Token by token, slot by slot: each chosen expert is one attention head over the shared k/v."""
    B, N, D = x.shape
    r = layer.router(x.reshape(B * N, D), task)
    idx, gates = r.topk_idx.view(B, N, -1), r.gates.view(B, N, -1)
    k, v = layer.kv(x).chunk(2, dim=-1)  # (B, N, Dh)
    rows = []
    for b in range(B):
        for i in range(N):
            y = torch.zeros(D, dtype=x.dtype)
            for j in range(idx.shape[-1]):
                e = idx[b, i, j]
                q = x[b, i] @ layer.w_q[e]  # (Dh,)
                att = torch.softmax(k[b] @ q / math.sqrt(q.numel()), dim=0)  # (N,)
                y = y + gates[b, i, j] * ((att @ v[b]) @ layer.w_o[e])
            rows.append(y)
    return torch.stack(rows).view(B, N, D)


def grads(layer, x, fn):
    x = x.clone().requires_grad_(True)
    out = fn(x)
    out = out[0] if isinstance(out, tuple) else out
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    g = [x.grad] + [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    return out.detach(), g


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # fp32: grouped_mm path; fp64: per-expert loop
@pytest.mark.parametrize("layer_cls,reference", [(MoEMLP, moe_mlp_reference), (MoEAttention, moe_attention_reference)])
def test_moe_layer_matches_loop_reference(tiny_cfg, layer_cls, reference, dtype):
    """Forward and every gradient of the batched dispatch equal the loop reference to fp32 tolerance."""
    torch.manual_seed(0)
    layer = layer_cls(tiny_cfg).to(dtype)
    for p in layer.parameters():  # bigger weights than the official init, so that errors would show
        p.data.normal_(0, 0.3)
    x = torch.randn(2, 9, tiny_cfg.embed_dim, dtype=dtype)
    fast, g_fast = grads(layer, x, lambda x: layer(x, 1))
    slow, g_slow = grads(layer, x, lambda x: reference(layer, x, 1))
    tol = dict(rtol=1e-4, atol=1e-5)  # fp32 tolerance for both: the router always runs in fp32
    torch.testing.assert_close(fast, slow, **tol)
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b, **tol)


def test_dense_baseline_has_the_same_active_flops(tiny_cfg):
    """moe=False replaces every MoE layer by a dense layer doing the work of its K active experts."""
    for layout in ("alternate", "all"):
        moe = count_params_flops(ModSquadConfig(**{**vars(tiny_cfg), "layout": layout}))
        dense = count_params_flops(ModSquadConfig(**{**vars(tiny_cfg), "layout": layout, "moe": False}))
        assert moe["macs"] - moe["router_macs"] == dense["macs"] and moe["router_macs"] > 0
        assert moe["params"] > dense["params"]


@pytest.mark.parametrize("overrides", [{}, {"layout": "all"}, {"moe": False}, {"noisy_gating": True, "qkv_bias": False}])
def test_analytic_counts_match_the_model(tiny_cfg, overrides):
    """count_params_flops agrees with the instantiated model's parameters and with torch's FLOP counter."""
    cfg = ModSquadConfig(**{**vars(tiny_cfg), **overrides})
    model = ModSquad(cfg)
    counts = count_params_flops(cfg, task=2)
    assert counts["params"] == sum(p.numel() for p in model.parameters())
    if not cfg.moe:  # torch's counter sees dense matmuls only: not grouped_mm, nor SDPA's CPU kernel
        with FlopCounterMode(display=False) as fc:
            model(torch.randn(1, 3, cfg.img_size, cfg.img_size), 2)
        N = (cfg.img_size // cfg.patch_size) ** 2 + 1
        attention_core = cfg.depth * 2 * N * N * cfg.num_heads * cfg.head_dim  # q k^T and att v, per block
        assert fc.get_total_flops() == 2 * (counts["macs"] + counts["head_macs"] - attention_core)


def test_paper_model_counts():
    """The ViT-B Mod-Squad of the Taskonomy runs: 206.96 M parameters, 21.34 GMACs per task pass (spec §1.9)."""
    base = count_params_flops(ModSquadConfig.from_preset("mtvit_taskgate_att_mlp_base_MI_twice"))
    assert abs(base["params"] / 206.96e6 - 1) < 0.005 and abs(base["macs"] / 21.34e9 - 1) < 0.005
    small = count_params_flops(ModSquadConfig.from_preset("mtvit_taskgate_att_mlp_small_MI_twice"))
    assert abs(small["params"] / 55.44e6 - 1) < 0.005 and abs(small["macs"] / 5.78e9 - 1) < 0.005


def test_model_gradients_reach_every_parameter(tiny_cfg):
    """Every parameter gets a gradient from a step over all tasks, so DDP needs no find_unused_parameters."""
    model = ModSquad(tiny_cfg)
    x = torch.randn(2, 3, 16, 16)
    sum(model(x, t)[0].square().mean() for t in range(len(tiny_cfg.tasks))).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
