import torch

from modsquad import ModSquad, TaskRouter


def test_router_selects_top_k_distinct_experts_per_token():
    """Each token picks exactly K distinct experts; gates are their softmax probabilities + 1e-4 (the official
    moe.py:465), not renormalised over the chosen experts."""
    torch.manual_seed(0)
    router = TaskRouter(dim=16, num_experts=8, top_k=3, num_tasks=2)
    r = router(torch.randn(50, 16), task=1)
    assert r.topk_idx.shape == (50, 3) and r.gates.shape == (50, 3) and r.probs.shape == (50, 8)
    assert all(len(set(row.tolist())) == 3 for row in r.topk_idx)
    assert torch.equal(r.gates, r.probs.gather(1, r.topk_idx) + 1e-4)
    torch.testing.assert_close(r.probs.sum(-1), torch.ones(50))  # probs (for the MI loss) are a proper softmax
    assert (r.gates.sum(-1) < 1).all()  # not renormalised over the chosen experts
    # the chosen ones are the K largest
    assert torch.equal(r.probs.topk(3).values + 1e-4, r.gates)


def test_router_computes_in_at_least_float32():
    """The router runs in float32 for bf16 inputs (and under autocast: bf16 logits flip top-k choices), and in the
    input's own precision when it is wider: fp64 routing equals an fp64 softmax of x W_t^T."""
    torch.manual_seed(0)
    router = TaskRouter(dim=16, num_experts=8, top_k=2, num_tasks=2).double()
    x = torch.randn(30, 16, dtype=torch.float64)
    r = router(x, 1)
    assert r.probs.dtype == r.gates.dtype == torch.float64
    torch.testing.assert_close(r.probs, (x @ router.w_gate[1].t()).softmax(-1), rtol=1e-14, atol=1e-15)
    r = router.float()(x.to(torch.bfloat16), 1)
    assert r.probs.dtype == r.gates.dtype == torch.float32
    plain = router(x.float(), 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = router(x.float(), 1)
    assert r.probs.dtype == torch.float32 and torch.equal(r.probs, plain.probs)  # bf16 logits would differ


def test_router_depends_on_task():
    """One router per task: the same tokens are routed differently for different tasks from step 0."""
    torch.manual_seed(0)
    router = TaskRouter(dim=16, num_experts=8, top_k=2, num_tasks=2)
    x = torch.randn(40, 16)
    assert not torch.equal(router(x, 0).topk_idx, router(x, 1).topk_idx)


def test_noisy_gating_only_in_training():
    """Noise on the logits is a training-time regulariser; evaluation is deterministic (the official code is not)."""
    torch.manual_seed(0)
    router = TaskRouter(dim=16, num_experts=8, top_k=2, num_tasks=1, noisy=True)
    x = torch.randn(40, 16)
    router.eval()
    assert torch.equal(router(x, 0).probs, router(x, 0).probs)
    router.train()
    assert not torch.equal(router(x, 0).probs, router(x, 0).probs)


def test_forward_returns_routing_and_stores_nothing(tiny_cfg):
    """forward is a pure function of its inputs: same call twice gives the same output and the module state is
    unchanged; every MoE layer reports its routing."""
    model = ModSquad(tiny_cfg).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attrs = set(vars(model.blocks[0].attn))
    x = torch.randn(2, 3, 16, 16)
    y1, r1 = model(x, 1)
    y2, r2 = model(x, 1)
    assert torch.equal(y1, y2) and len(r1) == len(model.moe_layer_names) == 2
    assert all(torch.equal(a.topk_idx, b.topk_idx) for a, b in zip(r1, r2))
    assert set(vars(model.blocks[0].attn)) == attrs
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_router_routes_each_task_block_with_its_own_router():
    """x of T contiguous row blocks and a list of T tasks: block t is routed as task[t] alone would route it."""
    torch.manual_seed(0)
    router = TaskRouter(dim=16, num_experts=8, top_k=2, num_tasks=3).double()
    blocks = [torch.randn(20, 16, dtype=torch.float64) for _ in range(3)]
    together = router(torch.cat(blocks), [2, 0, 1])
    for i, (block, task) in enumerate(zip(blocks, [2, 0, 1])):
        alone, rows = router(block, task), slice(20 * i, 20 * (i + 1))
        assert torch.equal(together.topk_idx[rows], alone.topk_idx)
        torch.testing.assert_close(together.probs[rows], alone.probs, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(together.gates[rows], alone.gates, rtol=1e-12, atol=1e-14)


def test_kept_router_softmaxes_over_all_experts_and_chooses_among_the_kept():
    """After keep_ (extraction): the softmax still covers every original expert (probs unchanged), top-k is taken
    among the kept experts only, topk_idx are positions in expert_ids, and the gates are those experts' π + 1e-4."""
    torch.manual_seed(0)
    router = TaskRouter(dim=16, num_experts=8, top_k=2, num_tasks=3)
    x = torch.randn(50, 16)
    full = router(x, 1)
    kept = torch.tensor([1, 4, 6])
    router.keep_(1, kept)
    r = router(x, 0)
    assert torch.equal(r.probs, full.probs)
    assert r.topk_idx.min() >= 0 and r.topk_idx.max() < len(kept)
    assert torch.equal(r.topk_idx, full.probs[:, kept].topk(2).indices)
    assert torch.equal(r.gates, full.probs[:, kept].topk(2).values + 1e-4)
