"""pretrained.py: dense ViT checkpoints (torchvision, timm/DeiT/MAE layouts) into ModSquad, all with random weights."""
import os
import runpy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.vision_transformer import VisionTransformer

import pretrained
from modsquad import ModSquad, ModSquadConfig, Routing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = (("depth", 1, "dense"), ("scene", 5, "image"))
MEAN = torch.tensor(pretrained.IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(pretrained.IMAGENET_STD).view(1, 3, 1, 1)


def small_cfg(**kw):
    """A model whose blocks match the checkpoints below: 32 px, patch 4 (8x8 grid), D 64, 2 heads of 32, MLP 256."""
    return ModSquadConfig(**{**dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, head_dim=32,
                                    num_attn_experts=4, num_mlp_experts=4, mlp_top_k=2, tasks=TASKS), **kw})


def timm_state_dict(D=64, depth=2, hidden=256, grid=8, patch=4, classes=10, layer_scale=False, seed=0):
    """A random checkpoint in timm's ViT names (every tensor random, so a misplaced one shows)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=0.1: torch.randn(*shape, generator=g) * s
    sd = {"patch_embed.proj.weight": r(D, 3, patch, patch), "patch_embed.proj.bias": r(D), "cls_token": r(1, 1, D),
          "pos_embed": r(1, 1 + grid * grid, D), "norm.weight": 1 + r(D), "norm.bias": r(D),
          "head.weight": r(classes, D), "head.bias": r(classes)}
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update({p + "norm1.weight": 1 + r(D), p + "norm1.bias": r(D), p + "attn.qkv.weight": r(3 * D, D),
                   p + "attn.qkv.bias": r(3 * D), p + "attn.proj.weight": r(D, D), p + "attn.proj.bias": r(D),
                   p + "norm2.weight": 1 + r(D), p + "norm2.bias": r(D), p + "mlp.fc1.weight": r(hidden, D),
                   p + "mlp.fc1.bias": r(hidden), p + "mlp.fc2.weight": r(D, hidden), p + "mlp.fc2.bias": r(D)})
        if layer_scale:
            sd.update({p + "ls1.gamma": 1 + r(D), p + "ls2.gamma": 1 + r(D)})
    return sd


def reference_vit(sd, u, heads, patch):
    """timm's ViT forward written out on the state dict (own softmax attention): features after the final norm."""
    ln = lambda x, n: F.layer_norm(x, x.shape[-1:], sd[n + ".weight"], sd[n + ".bias"], eps=1e-6)
    x = F.conv2d((u - MEAN) / STD, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    x = torch.cat([sd["cls_token"].expand(len(u), -1, -1), x.flatten(2).transpose(1, 2)], 1) + sd["pos_embed"]
    B, N, D = x.shape
    for i in range(1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))):
        p = f"blocks.{i}."
        q, k, v = F.linear(ln(x, p + "norm1"), sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]).chunk(3, -1)
        q, k, v = (t.view(B, N, heads, -1).transpose(1, 2) for t in (q, k, v))  # (B, H, N, Dh)
        a = ((q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5).softmax(-1) @ v
        y = F.linear(a.transpose(1, 2).reshape(B, N, D), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        x = x + sd.get(p + "ls1.gamma", 1) * y
        h = F.gelu(F.linear(ln(x, p + "norm2"), sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
        x = x + sd.get(p + "ls2.gamma", 1) * F.linear(h, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    return ln(x, "norm")


def features(model, x):
    """The backbone's tokens after the final norm (the input of the dense heads), for task 0 (dense)."""
    out = {}
    handle = model.norm.register_forward_hook(lambda m, i, o: out.update(y=o))
    with torch.no_grad():
        model(x, 0)
    handle.remove()
    return out["y"]


def random_torchvision_vit(**kw):
    torch.manual_seed(0)
    tv = VisionTransformer(**kw).eval()
    with torch.no_grad():  # every parameter random (its init zeroes several biases and the class token)
        for p in tv.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return tv


def torchvision_features(tv, u):
    with torch.no_grad():
        x = tv._process_input((u - MEAN) / STD)
        return tv.encoder(torch.cat([tv.class_token.expand(len(u), -1, -1), x], 1))


def test_torchvision_vit_loads_into_the_dense_layout_exactly(tmp_path):
    """A randomly initialised torchvision VisionTransformer, saved as a file: the dense-layout model's features equal
    torchvision's encoder output on the same pixels (the model's [-1, 1] input, torchvision's ImageNet-normalised)."""
    tv = random_torchvision_vit(image_size=32, patch_size=4, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=256)
    torch.save(tv.state_dict(), tmp_path / "vit.pth")
    model = ModSquad(small_cfg(layout="dense")).eval()
    report = pretrained.load_dense_checkpoint(model, str(tmp_path / "vit.pth"), ckpt_head_dim=32)
    u = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(features(model, u * 2 - 1), torchvision_features(tv, u), rtol=1e-5, atol=1e-5)
    assert "torchvision layout" in report.source and report.ignored == ["heads.head.weight", "heads.head.bias"]
    assert not report.upcycled and not report.mismatched
    legacy = {k.replace("mlp.0.", "mlp.linear_1.").replace("mlp.3.", "mlp.linear_2."): v for k, v in
              tv.state_dict().items()}  # torchvision < 0.13 names
    old = ModSquad(small_cfg(layout="dense"))
    pretrained.load_dense_checkpoint(old, legacy, ckpt_head_dim=32)
    for (name, a), b in zip(model.state_dict().items(), old.state_dict().values()):
        assert name.startswith("heads.") or torch.equal(a, b), name


def test_mae_global_pool_checkpoint_fills_both_final_norms_from_fc_norm():
    """MAE's fine-tuned global-pool models keep fc_norm and drop norm: both of the model's final norms load from it."""
    sd = timm_state_dict()
    sd["fc_norm.weight"], sd["fc_norm.bias"] = sd.pop("norm.weight"), sd.pop("norm.bias")
    model = ModSquad(small_cfg())
    report = pretrained.load_dense_checkpoint(model, sd, ckpt_head_dim=32)
    for n in ("norm.weight", "fc_norm.weight"):
        assert n in report.loaded and torch.equal(dict(model.named_parameters())[n], sd["fc_norm.weight"])


@pytest.mark.slow
def test_full_vit_b_16_loads_into_mtvit_base_exactly():
    from torchvision.models import vit_b_16

    tv = vit_b_16(weights=None).eval()
    with torch.no_grad():
        for p in tv.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model = ModSquad(ModSquadConfig.from_preset("mtvit_base", tasks=TASKS)).eval()
    report = pretrained.load_dense_checkpoint(model, tv.state_dict())
    u = torch.rand(1, 3, 224, 224)
    torch.testing.assert_close(features(model, u * 2 - 1), torchvision_features(tv, u), rtol=1e-4, atol=1e-4)
    assert len(report.loaded) == 4 + 12 * 14 + 4 and not report.mismatched  # stem, blocks, norm and fc_norm


def test_timm_layout_nested_under_model_with_layer_scale_loads_exactly(tmp_path):
    """A DeiT/MAE-style file ({"model": state dict}, DDP's module. prefix, layer scale as in DeiT-III) gives the
    features of timm's forward written out in the test."""
    sd = timm_state_dict(layer_scale=True)
    torch.save({"model": {"module." + k: v for k, v in sd.items()}}, tmp_path / "deit.pth")
    model = ModSquad(small_cfg(layout="dense")).eval()
    report = pretrained.load_dense_checkpoint(model, str(tmp_path / "deit.pth"), ckpt_head_dim=32)
    u = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(features(model, u * 2 - 1), reference_vit(sd, u, heads=2, patch=4), rtol=1e-5, atol=1e-5)
    assert "timm layout" in report.source


def test_upcycled_mlp_experts_are_the_dense_slices_and_compute_the_dense_mlp():
    """Expert e of an MoE MLP is slice e mod S of the dense hidden units, its output scaled by E*S/K: with uniform
    gates 1/E on experts 0..K-1 (one per slice, S = K here) the MoE layer computes the dense MLP exactly."""
    sd = timm_state_dict()
    model = ModSquad(small_cfg())  # block 1 holds the MoE MLP: 4 experts of hidden 128, top 2 (S = 256/128 = 2)
    pretrained.load_dense_checkpoint(model, sd, ckpt_head_dim=32)
    layer = model.blocks[1].mlp
    w1, b1, w2, b2 = (sd["blocks.1.mlp." + n] for n in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"))
    E, K, Dm = 4, 2, 128
    for e in range(E):
        s = slice((e % 2) * Dm, (e % 2 + 1) * Dm)
        assert torch.equal(layer.w_in[e], w1[s].t()) and torch.equal(layer.b_in[e], b1[s])
        assert torch.equal(layer.w_out[e], E * 2 / K * w2[:, s].t()) and torch.equal(layer.b_out[e], E / K * b2)
    x = torch.randn(2, 5, 64)
    layer.router.forward = lambda x, task: Routing(torch.full((len(x), E), 1 / E), torch.arange(K).repeat(len(x), 1),
                                                   torch.full((len(x), K), 1 / E))
    with torch.no_grad():
        y, _ = layer(x, 0)
    torch.testing.assert_close(y, F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2), rtol=1e-5, atol=1e-5)


def test_upcycled_attention_experts_are_the_dense_heads():
    """MoA expert e takes head e mod H's query and output projection (output scaled by E*H/K), and the shared k/v
    head is the mean of the H k heads and of the H v heads. If the checkpoint's k heads are all alike, and its v
    heads too (so the mean is exact), uniform gates on experts 0..H-1 give the dense attention exactly."""
    sd = timm_state_dict()
    q, k, v = sd["blocks.0.attn.qkv.weight"].chunk(3)
    sd["blocks.0.attn.qkv.weight"] = torch.cat([q, k[:32].repeat(2, 1), v[:32].repeat(2, 1)])
    sd["blocks.0.attn.qkv.bias"][:64] = 0  # MoA has no query bias
    b = sd["blocks.0.attn.qkv.bias"]
    b[64:128], b[128:] = b[64:96].repeat(2), b[128:160].repeat(2)
    sd["blocks.0.attn.proj.bias"].zero_()  # nor an output bias
    model = ModSquad(small_cfg())  # block 0 holds MoE attention: 4 experts of head_dim 32, top 2 = H
    pretrained.load_dense_checkpoint(model, sd, ckpt_head_dim=32)
    layer = model.blocks[0].attn
    wqkv, wp = sd["blocks.0.attn.qkv.weight"], sd["blocks.0.attn.proj.weight"]
    E, K, H, Dh = 4, 2, 2, 32
    for e in range(E):
        h = slice((e % H) * Dh, (e % H + 1) * Dh)
        assert torch.equal(layer.w_q[e], wqkv[h].t()) and torch.equal(layer.w_o[e], E * H / K * wp[:, h].t())
    k_heads, v_heads = wqkv[64:128].view(H, Dh, 64), wqkv[128:].view(H, Dh, 64)
    torch.testing.assert_close(layer.kv.weight, torch.cat([k_heads.mean(0), v_heads.mean(0)]))
    x = torch.randn(2, 5, 64)
    layer.router.forward = lambda x, task: Routing(torch.full((len(x), E), 1 / E), torch.arange(K).repeat(len(x), 1),
                                                   torch.full((len(x), K), 1 / E))
    dense = {"blocks.0.attn.qkv.weight": wqkv, "blocks.0.attn.qkv.bias": sd["blocks.0.attn.qkv.bias"]}
    qd, kd, vd = (t.view(2, 5, H, Dh).transpose(1, 2) for t in
                  F.linear(x, dense["blocks.0.attn.qkv.weight"], dense["blocks.0.attn.qkv.bias"]).chunk(3, -1))
    ref = F.linear(F.scaled_dot_product_attention(qd, kd, vd).transpose(1, 2).reshape(2, 5, 64), wp)
    with torch.no_grad():
        y, _ = layer(x, 0)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_pos_embed_interpolation_keeps_the_cls_entry_and_is_exact_at_the_same_grid():
    pos = torch.randn(1, 1 + 14 * 14, 8)
    assert torch.equal(pretrained.interpolate_pos_embed(pos, 14), pos)
    big = pretrained.interpolate_pos_embed(pos, 32)
    assert big.shape == (1, 1 + 32 * 32, 8) and torch.equal(big[:, 0], pos[:, 0])
    assert not torch.allclose(big[:, 1:33], pos[:, 1:33])
    const = torch.cat([pos[:, :1], torch.full((1, 196, 8), 0.7)], 1)  # bicubic weights sum to 1: a constant stays
    torch.testing.assert_close(pretrained.interpolate_pos_embed(const, 9)[:, 1:], torch.full((1, 81, 8), 0.7))
    distilled = torch.randn(1, 2 + 196, 8)  # DeiT-distilled: cls, dist, patches
    out = pretrained.interpolate_pos_embed(distilled, 14, num_prefix=2)
    assert torch.equal(out[:, 0], distilled[:, 0]) and torch.equal(out[:, 1:], distilled[:, 2:])


def test_pos_embed_is_resized_to_the_model_grid_on_load():
    sd = timm_state_dict(grid=8)
    model = ModSquad(small_cfg(img_size=48))  # a 12x12 grid
    report = pretrained.load_dense_checkpoint(model, sd, ckpt_head_dim=32)
    torch.testing.assert_close(model.pos_embed.data, pretrained.interpolate_pos_embed(sd["pos_embed"], 12))
    assert any("8x8 -> 12x12" in n for n in report.notes)


def test_report_accounts_for_every_tensor_once():
    sd = timm_state_dict()
    model = ModSquad(small_cfg())  # block 0: MoE attention + dense MLP, block 1: dense attention + MoE MLP
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = pretrained.load_dense_checkpoint(model, sd, ckpt_head_dim=32)
    groups = [report.loaded, report.upcycled, report.zeroed, report.left_at_init]
    assert sorted(n for g in groups for n in g) == sorted(init)  # a partition of the model's parameters
    assert sorted(report.upcycled) == sorted(["blocks.0.attn.w_q", "blocks.0.attn.w_o", "blocks.0.attn.kv.weight",
                                              "blocks.0.attn.kv.bias", "blocks.1.mlp.w_in", "blocks.1.mlp.b_in",
                                              "blocks.1.mlp.w_out", "blocks.1.mlp.b_out"])
    assert report.zeroed == ["task_embed"] and (model.task_embed == 0).all()
    assert sorted(report.left_at_init) == sorted(["blocks.0.attn.router.w_gate", "blocks.1.mlp.router.w_gate"] + [
        n for n in init if n.startswith("heads.")])
    assert len(report.loaded) == len(init) - 8 - 1 - len(report.left_at_init) == 26
    assert report.ignored == ["head.weight", "head.bias"] and not report.mismatched
    for n in report.left_at_init:
        assert torch.equal(dict(model.named_parameters())[n], init[n]), n
    text = str(report)
    assert len(text.splitlines()) <= 25 and "loaded        26 tensors" in text and "ignored        2 tensors" in text
    assert "head (10, 64)" in text


def test_head_dim_mismatch_is_reported_not_reshaped():
    """The paper's presets use head_dim 128 where ImageNet ViTs have 64: every attention sublayer is reported with
    its shapes and left at init; the rest loads."""
    sd = timm_state_dict()
    model = ModSquad(small_cfg(head_dim=16))  # checkpoint heads are 32 wide
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = pretrained.load_dense_checkpoint(model, sd, ckpt_head_dim=32)
    assert [m for m, _, _ in report.mismatched] == ["blocks.0.attn", "blocks.1.attn"]
    why = dict((m, w) for m, w, _ in report.mismatched)
    assert "w_q (4, 64, 16)" in why["blocks.0.attn"] and "qkv.weight (192, 64)" in why["blocks.0.attn"]
    assert "q.weight (32, 64)" in why["blocks.1.attn"]
    for n in ("blocks.0.attn.w_q", "blocks.0.attn.kv.weight", "blocks.1.attn.q.weight", "blocks.1.attn.proj.bias"):
        assert n in report.left_at_init and torch.equal(dict(model.named_parameters())[n], init[n])
    assert "blocks.1.mlp.w_in" in report.upcycled and "blocks.0.mlp.fc1.weight" in report.loaded
    assert "blocks.0.attn.qkv.weight" not in report.ignored  # mismatched, not silently ignored
    assert "mismatched     2 sublayers" in str(report)


@pytest.mark.parametrize("case, expected", [
    ("width", "patch_embed.proj.weight is (48, 3, 4, 4) in the checkpoint, patch_embed.weight (64, 3, 4, 4)"),
    ("torchvision width", "conv_proj.weight is (48, 3, 4, 4) in the checkpoint"),
    ("depth", "3 blocks in the checkpoint, 2 in the model"),
    ("qk-norm", "blocks.0.attn.q_norm.weight has no counterpart"),
    ("not a vit", "matches no ViT layout read here"),
])
def test_wrong_architecture_checkpoint_is_a_one_line_error(case, expected):
    sd = {"width": lambda: timm_state_dict(D=48),
          "depth": lambda: timm_state_dict(depth=3),
          "qk-norm": lambda: {**timm_state_dict(), "blocks.0.attn.q_norm.weight": torch.ones(32)},
          "not a vit": lambda: {"conv1.weight": torch.zeros(8, 3, 3, 3), "fc.weight": torch.zeros(10, 8)},
          "torchvision width": lambda: random_torchvision_vit(image_size=32, patch_size=4, num_layers=2, num_heads=2,
                                                              hidden_dim=48, mlp_dim=96).state_dict()}[case]()
    with pytest.raises(ValueError) as e:
        pretrained.load_dense_checkpoint(ModSquad(small_cfg()), sd, ckpt_head_dim=32)
    assert expected in str(e.value) and "\n" not in str(e.value)


def train(monkeypatch, *args):
    """train.py in this process (no interpreter start-up), as test_train.run_in_process."""
    monkeypatch.setattr(sys, "argv", ["train.py", *args])
    monkeypatch.chdir(ROOT)
    runpy.run_path(os.path.join(ROOT, "train.py"), run_name="__main__")


def test_train_init_flag_prints_the_report_and_stops_on_a_bad_file(tmp_path, monkeypatch, capsys):
    """--init on the tiny synthetic PASCAL run (D 64, 4 blocks, patch 4, heads 64 wide with --head-dim 64; one
    checkpoint head, so the 4-head dense attention reports a mismatch); skipped on --resume; a wrong-width file stops
    with one line."""
    torch.save({"model": timm_state_dict(depth=4)}, tmp_path / "vit.pth")
    common = ["--dataset", "synthetic-pascal", "--img-size", "32", "--batch-size", "2", "--train-length", "4",
              "--no-final-eval", "--head-dim", "64", "--init", str(tmp_path / "vit.pth"), "--out-dir", str(tmp_path)]
    train(monkeypatch, *common, "--steps", "1")
    out = capsys.readouterr().out
    assert "init from vit.pth (timm layout" in out and "upcycled" in out and "mismatched     2 sublayers" in out
    train(monkeypatch, *common, "--steps", "2", "--resume")
    assert "init from" not in capsys.readouterr().out  # resuming: the checkpoint holds the weights
    torch.save(timm_state_dict(D=48, depth=4), tmp_path / "vit.pth")
    with pytest.raises(SystemExit):
        train(monkeypatch, *common, "--steps", "1", "--out-dir", str(tmp_path / "bad"))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: vit.pth does not fit this model: patch_embed.proj.weight")


@pytest.mark.slow
def test_pascal_small_in1k_recipe_loads_a_deit_s_layout_checkpoint_with_no_mismatch(tmp_path):
    sd = timm_state_dict(D=384, depth=12, hidden=1536, grid=14, patch=16, classes=1000)
    torch.save({"model": sd}, tmp_path / "deit_small_patch16_224-cd65a155.pth")
    proc = subprocess.run([sys.executable, "train.py", "--recipe", "pascal-small-in1k", "--dataset", "synthetic-pascal",
                           "--img-size", "64", "--steps", "1", "--epochs", "0", "--batch-size", "2", "--train-length",
                           "4", "--no-final-eval", "--init", str(tmp_path / "deit_small_patch16_224-cd65a155.pth"),
                           "--out-dir", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "mismatched     0 sublayers" in proc.stdout and "ignored        2 tensors: head (1000, 384)" in proc.stdout
