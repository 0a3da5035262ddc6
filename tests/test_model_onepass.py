"""All tasks in one backbone call: the same computation as one call per task (issue: the step a GPU needs)."""
from dataclasses import replace

import pytest
import torch

from modsquad import ModSquad, mi_loss


def loop_and_one_call(cfg, dtype, tasks):
    """Outputs, routings and parameter gradients of the per-task loop and of the single call, for the same loss."""
    torch.manual_seed(0)
    model = ModSquad(cfg).to(dtype).eval()  # eval: drop-path off (its masks are random per row)
    images = torch.randn(3, 3, cfg.img_size, cfg.img_size, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    # a loss that touches every output element with its own weight, plus the MI loss over all task passes
    weights = [torch.randn(model(images, t)[0].shape, generator=g, dtype=dtype) for t in tasks]
    results = []
    for one_call in (False, True):
        model.zero_grad(set_to_none=True)
        if one_call:
            preds, routings = model(images, tasks)
        else:
            preds, routings = map(list, zip(*(model(images, t) for t in tasks)))
        loss = sum((p * w).sum() for p, w in zip(preds, weights)) + mi_loss(routings)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((preds, routings, grads))
    return results


@pytest.mark.parametrize("overrides", [dict(), dict(layout="all"), dict(moe=False), dict(layout="dense")],
                         ids=["alternate", "all", "dense-twin", "dense-vit"])
def test_one_call_equals_per_task_loop_fp64(tiny_cfg, overrides):
    """Outputs, routings and every gradient of model(images, [t0, t1, ...]) equal T calls model(images, t), in fp64
    up to summation order, for both MoE layouts and both dense baselines (drop-path in eval, no gating noise)."""
    cfg = replace(tiny_cfg, drop_path=0.2, **overrides)
    (p_loop, r_loop, g_loop), (p_one, r_one, g_one) = loop_and_one_call(cfg, torch.float64, [0, 1, 2])
    for a, b in zip(p_loop, p_one):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert len(r_one) == 3 and all(len(r) == len(r_loop[0]) for r in r_one)
    for ra, rb in zip(r_loop, r_one):
        for a, b in zip(ra, rb):
            assert torch.equal(a.topk_idx, b.topk_idx)
            torch.testing.assert_close(a.probs, b.probs, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(a.gates, b.gates, rtol=1e-12, atol=1e-14)
    assert g_loop.keys() == g_one.keys() and len(g_one) == len(list(ModSquad(cfg).parameters()))
    for name in g_loop:
        torch.testing.assert_close(g_one[name], g_loop[name], rtol=1e-10, atol=1e-12, msg=name)


def test_one_call_equals_per_task_loop_fp32(tiny_cfg):
    """In fp32 (the grouped-matmul path) the two agree to rounding."""
    (p_loop, _, g_loop), (p_one, _, g_one) = loop_and_one_call(tiny_cfg, torch.float32, [0, 1, 2])
    for a, b in zip(p_loop, p_one):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for name in g_loop:
        torch.testing.assert_close(g_one[name], g_loop[name], rtol=1e-3, atol=1e-5, msg=name)


def test_one_call_takes_any_subset_and_order_of_tasks(tiny_cfg):
    """model(images, [2, 0]) gives task 2's then task 0's outputs, with the patch embedding computed once."""
    model = ModSquad(tiny_cfg).double().eval()
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    calls = []
    model.patch_embed.register_forward_hook(lambda *args: calls.append(1))
    (p2, p0), (r2, r0) = model(images, [2, 0])
    assert len(calls) == 1
    torch.testing.assert_close(p2, model(images, 2)[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p0, model(images, 0)[0], rtol=1e-12, atol=1e-12)
    assert torch.equal(r0[0].topk_idx, model(images, 0)[1][0].topk_idx)
