"""bench.py at a tiny size: its official-style loop dispatch computes what the modsquad layers compute, and every
section prints markdown rows with ratios."""
import pytest
import torch

import bench
from modsquad import MoEAttention, MoEMLP

CPU = torch.device("cpu")


@pytest.fixture
def one_thread():
    """Two threads that wait for each other stall for milliseconds per op when other jobs share the cores (up to 100x
    slower here); one thread keeps this test at a few seconds anywhere."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("layer_cls,loop", [(MoEMLP, bench.loop_moe_mlp), (MoEAttention, bench.loop_moe_attention)])
def test_loop_dispatch_matches_modsquad_layer(tiny_cfg, layer_cls, loop):
    """The baseline is a correct implementation: same output and same gradients as the fast path."""
    torch.manual_seed(0)
    layer = layer_cls(tiny_cfg)
    for p in layer.parameters():  # bigger weights than the official init, so that errors would show
        p.data.normal_(0, 0.3)
    x = torch.randn(3, 17, tiny_cfg.embed_dim, requires_grad=True)
    grad = torch.randn_like(x)
    outs = []
    for fn in (lambda x: layer(x, 1)[0], lambda x: loop(layer, x, 1)):
        y = fn(x)
        outs.append([y.detach()] + list(torch.autograd.grad(y, [x, *layer.parameters()], grad)))
    for fast, slow in zip(*outs):
        torch.testing.assert_close(slow, fast, rtol=1e-5, atol=1e-5)


def table_rows(text):
    return [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| layer")]


def test_sections_print_rows_with_ratios(tiny_cfg, capsys, one_thread):
    layers = bench.bench_layers(CPU, [("test", tiny_cfg, 2, 1)])
    assert len(layers) == 4  # 2 layers x (fwd, fwd+bwd)
    assert all(r["fast_vs_dense"] > 0 and r["fast_vs_loop"] > 0 for r in layers)
    assert all(r["target"] in ("PASS", "MISS") for r in layers if r["mode"] == "fwd+bwd")
    model = bench.bench_model(CPU, tiny_cfg, B=2, reps=1, task=1)
    assert model["step_ratio"] > 0 and model["flops"]["full"] == model["flops"]["extracted"]
    bench.bench_data(CPU, samples=1, images_per_s=model["images_per_s"])
    out = capsys.readouterr().out
    ratio_rows = [row for row in table_rows(out) if "x |" in row]
    assert len(ratio_rows) >= 4 + 2 + 1  # layer rows, step and extraction ratios, data ratio
    assert out.count("PASS") + out.count("MISS") >= 2 + 1 + 1 + 1
