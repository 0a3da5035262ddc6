from dataclasses import replace

import torch

from modsquad import ModSquad, ModSquadConfig, count_params_flops, expert_usage, extract


def sparse_cfg(tiny_cfg):
    # 16 experts and only 5 tokens per image: a batch of one image cannot use every expert
    return ModSquadConfig(**{**vars(tiny_cfg), "img_size": 8, "num_attn_experts": 16, "num_mlp_experts": 16})


def test_expert_usage_fractions_sum_to_k(tiny_cfg):
    model = ModSquad(tiny_cfg)
    usage = expert_usage(model, [torch.randn(3, 3, 16, 16), torch.randn(2, 3, 16, 16)], task=1)
    assert [u.numel() for u in usage] == [8, 8]
    torch.testing.assert_close(torch.stack([u.sum() for u in usage]), torch.tensor([2.0, 2.0]))


def test_extracted_model_matches_full_model_on_its_task(tiny_cfg):
    """The extracted model gives exactly the full model's output on inputs whose tokens chose only kept experts,
    and it is smaller with the same FLOPs per image."""
    cfg = sparse_cfg(tiny_cfg)
    model = ModSquad(cfg).eval()
    x = torch.randn(1, 3, 8, 8)
    for task in range(len(cfg.tasks)):
        usage = expert_usage(model, [x], task)
        small = extract(model, task, usage, threshold=0.0)
        assert len(small.cfg.tasks) == 1 and small.cfg.tasks[0] == cfg.tasks[task]
        torch.testing.assert_close(small(x, 0)[0], model(x, task)[0], rtol=1e-5, atol=1e-6)
        full, ext = count_params_flops(model, task), count_params_flops(small, 0)
        assert ext["params"] == sum(p.numel() for p in small.parameters()) < full["params"]
        assert ext["macs"] == full["macs"]


def test_extraction_keeps_experts_above_threshold_and_at_least_k(tiny_cfg):
    model = ModSquad(tiny_cfg)
    usage = [torch.tensor([0.5, 0.5, 0.5, 0.49, 0.01, 0.0, 0.0, 0.0]), torch.tensor([1.9, 0.1, 0, 0, 0, 0, 0, 0])]
    small = extract(model, 2, usage, threshold=0.03)
    assert small.cfg.kept_experts == ((0, 1, 2, 3), (0, 1))
    assert [m.num_experts for m in small.moe_layers] == [4, 2]
    assert torch.equal(small.moe_layers[0].w_q, model.moe_layers[0].w_q[:4])
    assert torch.equal(small.task_embed[0], model.task_embed[2])
    # the task's whole router is kept: softmax over all 8 original experts
    assert small.moe_layers[0].router.w_gate.shape == (1, 8, tiny_cfg.embed_dim)
    # fewer than K above the threshold: keep the K most used (not the first K); "more than": usage 0 at threshold 0
    usage = [torch.tensor([0.0, 0.02, 1.96, 0.0, 0.0, 0.0, 0.02, 0.0]), torch.tensor([0.5, 0, 0, 0.5, 0, 0.5, 0, 0.5])]
    small = extract(model, 2, usage, threshold=0.03)
    assert small.cfg.kept_experts[0] in ((1, 2), (2, 6))
    assert extract(model, 2, usage, threshold=0.0).cfg.kept_experts == ((1, 2, 6), (0, 3, 5, 7))
    # extracting again from an extracted model: kept_experts still names the original experts
    again = extract(small, 0, [torch.tensor([0.0, 2.0]), torch.tensor([0.0, 1.0, 0.0, 1.0])], threshold=0.03)
    assert again.cfg.kept_experts == (small.cfg.kept_experts[0], (3, 7))
    assert torch.equal(again.moe_layers[1].w_in, model.moe_layers[1].w_in[[3, 7]])


def test_expert_usage_pools_the_tokens_of_all_batches_in_eval_mode(tiny_cfg):
    """expert_usage counts every token of every batch once (batches of different sizes, images or (images, targets)
    pairs), routes as the model in eval mode (no drop-path, no gating noise), and leaves the model's mode as it was."""
    model = ModSquad(replace(tiny_cfg, drop_path=0.5, noisy_gating=True)).train()
    a, b = torch.randn(3, 3, 16, 16), torch.randn(2, 3, 16, 16)
    usage = expert_usage(model, [(a, {"depth_euclidean": None}), b], task=1)
    assert model.training
    with torch.no_grad():
        _, routings = model.eval()(torch.cat([a, b]), 1)
    for u, r in zip(usage, routings):
        torch.testing.assert_close(u, torch.bincount(r.topk_idx.flatten(), minlength=8) / r.topk_idx.shape[0])


def test_extracted_model_saves_and_loads_like_any_model(tiny_cfg, tmp_path):
    model = ModSquad(tiny_cfg).eval()
    x = torch.randn(2, 3, 16, 16)
    small = extract(model, 0, expert_usage(model, [x], 0), threshold=0.2)
    torch.save({"model": small.state_dict(), "config": small.cfg.to_dict()}, tmp_path / "small.pt")
    ckpt = torch.load(tmp_path / "small.pt", weights_only=True)
    again = ModSquad(ModSquadConfig.from_dict(ckpt["config"])).eval()
    again.load_state_dict(ckpt["model"])  # strict: same structure
    torch.testing.assert_close(again(x, 0)[0], small(x, 0)[0])
