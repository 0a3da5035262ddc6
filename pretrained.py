"""
Start a ModSquad model from a dense ViT checkpoint (ImageNet weights of DeiT, MAE, timm or torchvision).

    from pretrained import load_dense_checkpoint
    report = load_dense_checkpoint(model, "deit_small_patch16_224-cd65a155.pth")   # what train.py --init PATH does
    print(report)                                                                   # one screen: what went where

Why: PASCAL-Context has 4,998 training images, too few to train a ViT from scratch. M3ViT, which Mod-Squad follows
on PASCAL, starts its ViT-S from ImageNet DeiT weights (VITA-Group/M3ViT utils/helpers.py load_pretrained: a
non-strict load of every tensor whose name matches, pos_embed resized, the MoE experts left at their own init). Here
every tensor of the model is accounted for: copied from the checkpoint (loaded), built from the dense tensors that
its MoE layer replaces (upcycled), or left at init. The report lists each group, and the checkpoint tensors it
ignored or could not fit.

Layouts read. The file is only read, nothing is downloaded:
    timm / DeiT / MAE  patch_embed.proj, cls_token, pos_embed, blocks.{i}.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2,
                       mlp.fc1, mlp.fc2, ls2.gamma}, norm, fc_norm (timm/models/vision_transformer.py); also nested
                       under "model" (the DeiT and MAE releases) or "state_dict", or with DDP's "module." prefix
    torchvision        conv_proj, class_token, encoder.pos_embedding, encoder.layers.encoder_layer_{i}.{ln_1,
                       self_attention.in_proj_weight, in_proj_bias, out_proj, ln_2, mlp.0, mlp.3 (older files:
                       mlp.linear_1, linear_2, pytorch/vision#6053)}, encoder.ln (torchvision/models/
                       vision_transformer.py: vit_b_16, vit_l_16)

What goes where (each rule is stated beside the code that applies it):
    loaded        the stem (input normalisation folded in), cls_token, pos_embed (resized), every norm, the dense
                  attention and MLP sublayers (layer scale folded in)
    upcycled      MoE MLP experts: slices of the dense hidden units (moe_mlp); MoA experts: the dense heads, and the
                  shared k/v head their mean (moe_attention); expert outputs scaled for the un-renormalised gates
    set to 0      task_embed
    left at init  routers, task heads, and every sublayer whose shapes do not match (reported, never reshaped)

Shapes as in modsquad.py (B N D T E K Dh Dm), plus: H heads of the checkpoint (each Dh = 64 wide in every DeiT, MAE
and torchvision ViT-S/B/L), Hd hidden units of the checkpoint's MLP, S = Hd / Dm slices of them, g the checkpoint's
grid of patches per side.
"""

import math
import os
import pickle
import re
import textwrap
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from modsquad import MLP, Attention, MoEAttention, MoEMLP

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the input normalisation of the DeiT, MAE and torchvision ImageNet weights
IMAGENET_STD = (0.229, 0.224, 0.225)

# -----------------------------------------------------------------------------
# Reading a checkpoint under timm names

# torchvision name -> timm name (the first pattern that matches)
TORCHVISION_TO_TIMM = (
    (r"conv_proj\.", "patch_embed.proj."),
    (r"class_token$", "cls_token"),
    (r"encoder\.pos_embedding$", "pos_embed"),
    (r"encoder\.ln\.", "norm."),
    (r"encoder\.layers\.encoder_layer_(\d+)\.ln_1\.", r"blocks.\1.norm1."),
    (r"encoder\.layers\.encoder_layer_(\d+)\.ln_2\.", r"blocks.\1.norm2."),
    (r"encoder\.layers\.encoder_layer_(\d+)\.self_attention\.in_proj_(weight|bias)$", r"blocks.\1.attn.qkv.\2"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.self_attention\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"encoder\.layers\.encoder_layer_(\d+)\.mlp\.(0|linear_1)\.", r"blocks.\1.mlp.fc1."),
    (r"encoder\.layers\.encoder_layer_(\d+)\.mlp\.(3|linear_2)\.", r"blocks.\1.mlp.fc2."),
)
# the timm names this loader maps into a ModSquad model
KNOWN = re.compile(r"(patch_embed\.proj\.(weight|bias)|cls_token|pos_embed|(norm|fc_norm)\.(weight|bias)"
                   r"|blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)"
                   r"|blocks\.\d+\.ls[12]\.gamma)")
# checkpoint tensors with no place in a ModSquad backbone, dropped on purpose: classifier heads (head, DeiT's head_dist,
# torchvision's heads, the old ViT pre_logits), DeiT-distilled's dist_token, MAE's decoder and mask token
IGNORED = ("head.", "head_dist.", "heads.", "pre_logits.", "dist_token", "mask_token", "decoder")


def read_checkpoint(source):
    """A checkpoint file (or a loaded dict) -> (tensors under timm names in float32, {timm name: name in the file},
    a one-line description). Raises ValueError for a file that holds no ViT this loader reads."""
    name = os.path.basename(source) if isinstance(source, (str, os.PathLike)) else "the checkpoint"
    sd = source
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"--init: no file {source}; download the weights first (README, PASCAL-Context)")
        if str(source).endswith(".safetensors"):
            raise ValueError(f"{name}: .safetensors files are not read; convert it once: python -c \"import torch; "
                             f"from safetensors.torch import load_file; torch.save(load_file('{source}'), 'vit.pth')\"")
        try:
            sd = torch.load(source, map_location="cpu", weights_only=True)  # plain tensors only: no code runs
        except pickle.UnpicklingError:
            raise ValueError(f"{name} holds Python objects besides tensors, which torch.load(weights_only=True) "
                             f"refuses; if you trust the file, keep its weights: python -c \"import torch; torch.save("
                             f"torch.load('{source}', weights_only=False)['model'], 'vit.pth')\"") from None
        except (RuntimeError, EOFError) as e:
            raise ValueError(f"cannot read {name} as a PyTorch checkpoint ({str(e).splitlines()[0]})") from None
    for key in ("model", "state_dict"):  # the DeiT and MAE releases nest the weights under "model"
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"{name} holds a {type(sd).__name__}, not a state dict")
    tensors = {k.removeprefix("module."): v for k, v in sd.items() if torch.is_tensor(v)}
    torchvision = any(k.startswith(("conv_proj.", "encoder.layers.")) for k in tensors)
    out, original = {}, {}
    for k, v in tensors.items():
        new = k
        for pattern, repl in TORCHVISION_TO_TIMM if torchvision else ():
            if re.match(pattern, k):
                new = re.sub(pattern, repl, k, count=1)
                break
        out[new], original[new] = v.detach().float(), k
    if "patch_embed.proj.weight" not in out or not any(k.startswith("blocks.") for k in out):
        raise ValueError(f"{name} matches no ViT layout read here (timm/DeiT/MAE: patch_embed.proj.weight, "
                         f"blocks.{{i}}.attn.qkv.weight; torchvision: conv_proj.weight, encoder.layers.encoder_layer_"
                         f"{{i}}...); its first keys: {', '.join(list(tensors)[:3]) or 'none'}")
    return out, original, f"{name} ({'torchvision' if torchvision else 'timm'} layout, {len(out)} tensors)"


# -----------------------------------------------------------------------------
# Exact transforms: input normalisation, layer scale, position grid


def fold_input_norm(w, b, mean, std):
    """Patch embedding for inputs x in [-1, 1] from one trained on z = (u - mean) / std, u in [0, 1] the pixel.
    w: (D, C, p, p), b: (D,). Exact: the patch embedding is linear and has no padding."""
    mean, std = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)  # (1, C, 1, 1)
    # z_c = (u - m_c)/s_c with u = (x + 1)/2, so z_c = x/(2 s_c) + (1 - 2 m_c)/(2 s_c):
    # W' = W / (2 s_c),  b' = b + Σ_{c,i,j} W[:, c, i, j] (1 - 2 m_c)/(2 s_c)
    return w / (2 * std), b + (w * (1 - 2 * mean) / (2 * std)).sum(dim=(1, 2, 3))


def interpolate_pos_embed(pos, grid, num_prefix=1):
    """(1, num_prefix + g*g, D) position embedding -> (1, 1 + grid*grid, D) for the model's grid: the patch entries
    resized bicubically (align_corners=False, as DeiT's and MAE's fine-tuning code; M3ViT uses bilinear), the cls
    entry kept as it is. A second prefix entry (DeiT-distilled's dist token) is dropped; with none (a checkpoint that
    adds no position to the cls token) the cls entry is 0, the same function. Unchanged at the same grid."""
    cls = pos[:, :1] if num_prefix else pos.new_zeros(1, 1, pos.shape[2])  # (1, 1, D)
    patches = pos[:, num_prefix:]  # (1, g*g, D)
    g = math.isqrt(patches.shape[1])
    if g != grid:
        patches = patches.reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
        patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
        patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)  # (1, grid*grid, D)
    return torch.cat([cls, patches], dim=1)


# -----------------------------------------------------------------------------
# Sublayers: what the checkpoint's dense attention and MLP of one block give each kind of ModSquad layer.
# Each returns {parameter name in the layer: (tensor, "loaded" | "upcycled")}, or a string saying why nothing fits.


def dense_attention(layer, q, k, v, bq, bk, bv, wp, bp, Dh):
    """Attention (H' query heads over H' or 1 k/v heads) from the checkpoint's H heads of width Dh.
    q, k, v: (H*Dh, D); bq, bk, bv: (H*Dh,); wp: (D, H*Dh); bp: (D,)."""
    H, Hm, Hkv = q.shape[0] // Dh, layer.num_heads, layer.num_kv_heads
    Dhm = layer.q.out_features // Hm
    if (Hm, Dhm) != (H, Dh) or Hkv not in (1, Hm):
        return (f"q.weight {tuple(layer.q.weight.shape)}: {Hm} heads x {Dhm} ({Hkv} k/v heads); the checkpoint's "
                f"qkv.weight {(3 * q.shape[0], q.shape[1])}: {H} heads x {Dh}")
    out = {"q.weight": (q, "loaded"), "proj.weight": (wp, "loaded"), "proj.bias": (bp, "loaded")}
    if layer.q.bias is not None:
        out["q.bias"] = (bq, "loaded")
    if Hkv == Hm:
        kv, kvb, how = torch.cat([k, v]), torch.cat([bk, bv]), "loaded"  # kv rows: the H k heads, then the H v heads
    else:  # the dense twin of MoA (--no-moe): one k/v head, the mean of the checkpoint's heads (see moe_attention)
        kv = torch.cat([k.view(H, Dh, -1).mean(0), v.view(H, Dh, -1).mean(0)])  # (2*Dh, D)
        kvb, how = torch.cat([bk.view(H, Dh).mean(0), bv.view(H, Dh).mean(0)]), "upcycled"
    out["kv.weight"] = (kv, how)
    if layer.kv.bias is not None:
        out["kv.bias"] = (kvb, how)
    return out


def moe_attention(layer, q, k, v, bk, bv, wp, Dh):
    """MoEAttention (E experts, each a query and an output projection over one shared k/v head, top K) from the
    checkpoint's H heads of width Dh; its query and output biases have no counterpart (MoA has none)."""
    H, Dhm = q.shape[0] // Dh, layer.w_q.shape[2]
    if Dhm != Dh:  # e.g. the paper's presets: MoE head_dim 128 vs 64 in every ImageNet ViT; no silent reshaping
        return (f"w_q {tuple(layer.w_q.shape)}: experts of head_dim {Dhm}; the checkpoint's qkv.weight "
                f"{(3 * q.shape[0], q.shape[1])}: {H} heads x {Dh}")
    E, K = layer.router.w_gate.shape[1], layer.top_k  # E: all experts the softmax runs over (extracted: the original)
    D = q.shape[1]
    heads = layer.router.expert_ids % H  # (E',) expert e starts as head e mod H (ids: the original expert ids)
    # q_e = x W_q[e] is head h(e)'s query: W_q[e] = Wq_h^T (D, Dh)
    w_q = q.view(H, Dh, D)[heads].transpose(1, 2)  # (E', D, Dh)
    # y = Σ_j g_j a_j W_o[e_j] with un-renormalised gates (modsquad.TaskRouter). At init the routers (N(0, 0.02²))
    # give nearly uniform π ≈ 1/E, so a token's K gates sum to about K/E (15 experts top-6: 0.4; a little more, as
    # top-k takes the largest: 0.55 measured at ViT-S), and a plain copy of the heads would shrink the attention
    # output about that much in every MoA block. Scaling the experts' output by c = E·H/K makes it the dense
    # attention's in expectation over which heads a token picks, for uniform gates (a pick is head h w.p. ≈ 1/H:
    # E[Σ_j g_j c f_h(j)] ≈ K (1/E) c (1/H) Σ_h f_h = Σ_h f_h). The price: as a router sharpens, its gates grow
    # toward a sum of 1, and so would the output (up to E/K times) until training shrinks W_o. We take a start
    # near the pretrained scale, the point of loading it. (Renormalised top-k gates would make this exact at every
    # step; the official code does not renormalise.)
    c = E * H / K
    w_o = c * wp.view(D, H, Dh).permute(1, 2, 0)[heads]  # (E', Dh, D): W_o[e] = c Wproj[:, head h(e)]^T
    # The one k/v head all experts share: the mean of the checkpoint's H k heads and of its H v heads, as GQA
    # converts multi-head checkpoints to multi-query ones (Ainslie et al. 2023, "mean pooling"); not exact, tuned next
    kv = torch.cat([k.view(H, Dh, D).mean(0), v.view(H, Dh, D).mean(0)])  # (2*Dh, D)
    kvb = torch.cat([bk.view(H, Dh).mean(0), bv.view(H, Dh).mean(0)])  # (2*Dh,)
    return {"w_q": (w_q, "upcycled"), "w_o": (w_o, "upcycled"), "kv.weight": (kv, "upcycled"),
            "kv.bias": (kvb, "upcycled")}


def dense_mlp(layer, w1, b1, w2, b2):
    """MLP from the checkpoint's fc1 (Hd, D), b1 (Hd,), fc2 (D, Hd), b2 (D,)."""
    if layer.fc1.out_features != w1.shape[0]:
        return f"fc1.weight {tuple(layer.fc1.weight.shape)} vs the checkpoint's {tuple(w1.shape)}"
    return {"fc1.weight": (w1, "loaded"), "fc1.bias": (b1, "loaded"), "fc2.weight": (w2, "loaded"),
            "fc2.bias": (b2, "loaded")}


def moe_mlp(layer, w1, b1, w2, b2):
    """MoEMLP (E experts of hidden Dm, top K) from the checkpoint's MLP of hidden Hd = S*Dm.
    Expert e is slice e mod S of the dense hidden units, as MoEfication splits a dense FFN into experts (Zhang et al.
    2022). Sparse upcycling's whole copies (Komatsuzaki et al. 2023) do not fit: an expert here is 1/K of the dense
    MLP (its K active experts cost one dense MLP), so K experts on K distinct slices compute exactly the dense MLP.
    Slices are contiguous: MoEfication clusters co-activated units, which only pays with routers trained to pick the
    clusters; ours start random, and any partition is then the same in expectation. Copies of a slice are identical
    at init and diverge as their routers send them different tokens."""
    Dm, Hd, D = layer.w_in.shape[2], w1.shape[0], w1.shape[1]
    if Hd % Dm:
        return f"w_in {tuple(layer.w_in.shape)}: experts of hidden {Dm} do not tile the checkpoint's fc1 {(Hd, D)}"
    S, E, K = Hd // Dm, layer.router.w_gate.shape[1], layer.top_k
    s = layer.router.expert_ids % S  # (E',) the slice of each expert
    w_in = w1.view(S, Dm, D)[s].transpose(1, 2)  # (E', D, Dm): h_e = x W1[slice]^T + b1[slice]
    b_in = b1.view(S, Dm)[s]  # (E', Dm)
    # Gates sum to about K/E at init (16 experts top-4: 0.25; 0.38 measured at ViT-S), see moe_attention. c = E·S/K
    # makes the output the dense MLP's in expectation over the slices picked, for uniform gates:
    # E[Σ_j g_j (c f_s(j) + b_out)] ≈ K (1/E) (c (1/S) Σ_s f_s + b_out) = Σ_s f_s + b2 with b_out = (E/K) b2.
    # Same price as there: the output grows as the gates sharpen.
    c = E * S / K
    w_out = c * w2.view(D, S, Dm).permute(1, 2, 0)[s]  # (E', Dm, D): c W2[:, slice]^T
    b_out = (E / K) * b2.expand(len(s), D)  # (E', D)
    return {"w_in": (w_in, "upcycled"), "b_in": (b_in, "upcycled"), "w_out": (w_out, "upcycled"),
            "b_out": (b_out, "upcycled")}


# -----------------------------------------------------------------------------
# The report


def _indices(ids):
    """[0, 2, 4, 6] -> '{0,2,..,6}', [0, 1, 2] -> '{0-2}', [3] -> '3'."""
    ids = sorted(set(ids))
    if len(ids) == 1:
        return str(ids[0])
    steps = {b - a for a, b in zip(ids, ids[1:])}
    if len(ids) > 3 and len(steps) == 1:
        step = steps.pop()
        return f"{{{ids[0]}-{ids[-1]}}}" if step == 1 else f"{{{ids[0]},{ids[1]},..,{ids[-1]}}}"
    return "{" + ",".join(map(str, ids)) + "}"


def _group(names, shapes=None):
    """Tensor names -> one short string: weight/bias of a module merged, the index of repeated layers (blocks.3.,
    decoder_blocks.3.) collected: ['blocks.0.mlp.w_in', 'blocks.2.mlp.w_in', 'norm.weight'] -> 'blocks.{0,2}.mlp.w_in,
    norm'. shapes, if given, adds the shape of a module that stands alone (of its weight)."""
    groups = {}
    for n in names:
        m = re.match(r"(.*?\.)(\d+)(\..*)", n)
        key, idx = ((m.group(1) + "{}" + m.group(3)), int(m.group(2))) if m else (n, None)
        key = re.sub(r"\.(weight|bias)$", "", key)
        entry = groups.setdefault(key, [set(), 0, n])
        entry[0].add(idx)
        entry[1] += 1
    out = []
    for key, (ids, count, first) in groups.items():
        text = key.format(_indices(ids)) if "{}" in key else key
        if shapes is not None and ids == {None}:
            text += f" {tuple(shapes[first])}"
        out.append(text)
    return ", ".join(out)


@dataclass
class InitReport:
    """Where every tensor went. Model side: loaded + upcycled + zeroed + left_at_init are all of the model's
    parameters, each once. Checkpoint side: every tensor is used, in mismatched, or in ignored."""
    source: str  # the file and its layout
    loaded: list = field(default_factory=list)  # model tensors copied from a checkpoint tensor (up to exact transforms)
    upcycled: list = field(default_factory=list)  # model tensors built from dense tensors they replace (MoE layers)
    zeroed: list = field(default_factory=list)  # model tensors set to 0
    left_at_init: list = field(default_factory=list)  # model tensors with no counterpart, or whose sublayer mismatched
    ignored: list = field(default_factory=list)  # checkpoint tensors (file names) with no place in the model
    mismatched: list = field(default_factory=list)  # (model sublayer, why, checkpoint tensors): left at init
    notes: list = field(default_factory=list)  # exact transforms applied, parts of tensors dropped
    ignored_shapes: dict = field(default_factory=dict, repr=False)  # file name -> shape, for the printout

    def __str__(self):
        """One screen: a line per group (modules, not tensors, are listed), then the mismatches and the notes."""
        wrap = lambda text, indent=20: textwrap.fill(text, 118, subsequent_indent=" " * indent)
        lines = [f"init from {self.source}"]
        for label, names in (("loaded", self.loaded), ("upcycled", self.upcycled), ("set to 0", self.zeroed),
                             ("left at init", self.left_at_init), ("ignored", self.ignored)):
            shapes = self.ignored_shapes if label == "ignored" else None
            count = f"{len(names):>4} tensor" + "s" * (len(names) != 1)
            lines.append(wrap(f"  {label:<12}{count}" + (f": {_group(names, shapes)}" if names else "")))
        lines.append(f"  {'mismatched':<12}{len(self.mismatched):>4} sublayers, left at init"
                     + (":" if self.mismatched else ""))
        by_why = {}
        for module, why, _ in self.mismatched:
            by_why.setdefault(why, []).append(module)
        lines += [wrap(f"    {_group(modules)}: {why}", 6) for why, modules in by_why.items()]
        lines += [wrap(f"  note: {n}", 8) for n in self.notes]
        return "\n".join(lines)


# -----------------------------------------------------------------------------
# Loading


@torch.no_grad()
def load_dense_checkpoint(model, checkpoint, mean=IMAGENET_MEAN, std=IMAGENET_STD, ckpt_head_dim=64):
    """Copy a dense ViT checkpoint into a ModSquad model (in place) and return the InitReport.
    checkpoint: a file path or a state dict (timm/DeiT/MAE or torchvision names, see the module docstring).
    mean, std: the input normalisation the checkpoint was trained with (ImageNet's for DeiT, MAE, torchvision; use
    (0.5,)*3 for Google's ViT weights), folded into the patch embedding since the model takes images in [-1, 1].
    ckpt_head_dim: width of the checkpoint's attention heads, which a state dict does not record (64 in DeiT, MAE and
    torchvision ViT-S/B/L; 80 in ViT-H/14).
    Raises ValueError, one line naming the first mismatch, when the checkpoint's embed_dim, patch size, input
    channels or depth differ from the model's, or when it holds a layer that ModSquad blocks do not have."""
    ck, original, source = read_checkpoint(checkpoint)
    cfg, short = model.cfg, source.split(" (")[0]
    report = InitReport(source=source + f", heads {ckpt_head_dim} wide")
    used, new = set(), {}  # checkpoint tensors consumed; model parameter name -> (tensor, how)

    def fail(what, fix):
        raise ValueError(f"{short} does not fit this model: {what}; {fix}")

    def take(name):
        used.add(name)
        return ck[name]

    # --- whole-model geometry: anything off here means another architecture, so stop
    w = ck["patch_embed.proj.weight"]  # (D, C, p, p)
    if w.shape != model.patch_embed.weight.shape:
        fail(f"{original['patch_embed.proj.weight']} is {tuple(w.shape)} in the checkpoint, patch_embed.weight "
             f"{tuple(model.patch_embed.weight.shape)} in the model (embed_dim, in_chans, patch, patch)",
             "build the model with the checkpoint's width and patch size (ViT-S/16: --recipe pascal-small-in1k, "
             "ViT-B/16: --recipe pascal-base-in1k)")
    unknown = [k for k in ck if not KNOWN.fullmatch(k) and not k.startswith(IGNORED)]
    if unknown:
        fail(f"{original[unknown[0]]} has no counterpart in ModSquad (standard pre-norm ViT blocks only)",
             "use a plain ViT checkpoint (DeiT, MAE, torchvision vit_b_16 / vit_l_16)")
    depth = 1 + max(int(k.split(".")[1]) for k in ck if k.startswith("blocks."))
    if depth != cfg.depth:
        fail(f"{depth} blocks in the checkpoint, {cfg.depth} in the model",
             "build the model with the checkpoint's depth")
    required = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.proj.weight", "norm2.weight", "norm2.bias",
                "mlp.fc1.weight", "mlp.fc2.weight")
    missing = [f"blocks.{i}.{n}" for i in range(depth) for n in required if f"blocks.{i}.{n}" not in ck]
    if missing:
        fail(f"{missing[0]} (timm name) is missing from the checkpoint", "use a complete ViT checkpoint")
    qkv = ck["blocks.0.attn.qkv.weight"]  # (3*H*Dh, D)
    if qkv.shape[0] % (3 * ckpt_head_dim):
        fail(f"{original['blocks.0.attn.qkv.weight']} {tuple(qkv.shape)} is not 3 x heads of {ckpt_head_dim}",
             "pass the checkpoint's head width as ckpt_head_dim")

    # --- stem. The model takes x in [-1, 1]; the checkpoint was trained on (u - mean)/std: fold it in (exact)
    wb = ck.get("patch_embed.proj.bias", torch.zeros(w.shape[0]))
    used.update({"patch_embed.proj.weight", "patch_embed.proj.bias"} & ck.keys())
    pw, pb = fold_input_norm(w, wb, mean, std)
    new["patch_embed.weight"], new["patch_embed.bias"] = (pw, "loaded"), (pb, "loaded")
    report.notes.append(f"input normalisation mean {tuple(mean)} std {tuple(std)} folded into patch_embed "
                        f"(the model takes images in [-1, 1])")
    if "cls_token" in ck:
        new["cls_token"] = (take("cls_token"), "loaded")
    if "pos_embed" in ck:
        pos = take("pos_embed")  # (1, P + g*g, D), P prefix entries: cls (and DeiT-distilled's dist token)
        g = math.isqrt(pos.shape[1])
        P = pos.shape[1] - g * g
        if pos.shape[2] != cfg.embed_dim or P > 2:
            fail(f"{original['pos_embed']} is {tuple(pos.shape)}", "use a plain ViT checkpoint")
        new["pos_embed"] = (interpolate_pos_embed(pos, model.grid, P), "loaded")
        if g != model.grid:
            report.notes.append(f"pos_embed resized {g}x{g} -> {model.grid}x{model.grid} (bicubic, cls entry kept)")
    # The task embedding is added before every block (N(0, 1) at init, never re-initialised officially): a random
    # unit-variance vector added to a pretrained residual stream before each block would swamp its features. At 0
    # the dense layers compute the checkpoint's features exactly at step 0; the embeddings learn from there.
    report.zeroed.append("task_embed")

    # --- blocks
    dropped = []  # attention sublayers whose query (or q/k/v) and output biases have no counterpart in the model
    for i, block in enumerate(model.blocks):
        pre = f"blocks.{i}."
        for n in ("norm1", "norm2"):
            for t in ("weight", "bias"):
                new[f"{pre}{n}.{t}"] = (take(f"{pre}{n}.{t}"), "loaded")
        # attention: qkv rows are q, k, v, each H heads of Dh (timm and torchvision's in_proj alike)
        names = [pre + "attn.qkv.weight", pre + "attn.qkv.bias", pre + "attn.proj.weight", pre + "attn.proj.bias",
                 pre + "ls1.gamma"]
        wqkv = ck[pre + "attn.qkv.weight"]  # (3*H*Dh, D)
        bqkv = ck.get(pre + "attn.qkv.bias", wqkv.new_zeros(wqkv.shape[0]))  # no bias: the same as a zero bias
        wp, bp = ck[pre + "attn.proj.weight"], ck.get(pre + "attn.proj.bias", wqkv.new_zeros(wqkv.shape[1]))
        if pre + "ls1.gamma" in ck:  # layer scale: x + γ ⊙ (a Wp^T + bp) = x + a (γ Wp)^T + γ bp, folded (exact)
            gamma = ck[pre + "ls1.gamma"]
            wp, bp = gamma[:, None] * wp, gamma * bp
        (q, k, v), (bq, bk, bv) = wqkv.chunk(3), bqkv.chunk(3)
        if isinstance(block.attn, MoEAttention):
            got = moe_attention(block.attn, q, k, v, bk, bv, wp, ckpt_head_dim)
            if not isinstance(got, str) and (bq.abs().sum() + bp.abs().sum()) > 0:
                dropped.append(f"blocks.{i}.attn")
        else:
            assert isinstance(block.attn, Attention)
            got = dense_attention(block.attn, q, k, v, bq, bk, bv, wp, bp, ckpt_head_dim)
            if not isinstance(got, str) and block.attn.q.bias is None and bqkv.abs().sum() > 0:
                dropped.append(f"blocks.{i}.attn")
        _place(report, new, used, ck, original, pre + "attn.", got, names)
        # MLP: fc1 (Hd, D), fc2 (D, Hd)
        names = [pre + "mlp.fc1.weight", pre + "mlp.fc1.bias", pre + "mlp.fc2.weight", pre + "mlp.fc2.bias",
                 pre + "ls2.gamma"]
        w1, w2 = ck[pre + "mlp.fc1.weight"], ck[pre + "mlp.fc2.weight"]
        b1 = ck.get(pre + "mlp.fc1.bias", w1.new_zeros(w1.shape[0]))
        b2 = ck.get(pre + "mlp.fc2.bias", w2.new_zeros(w2.shape[0]))
        if pre + "ls2.gamma" in ck:  # layer scale folded into fc2, as above
            gamma = ck[pre + "ls2.gamma"]
            w2, b2 = gamma[:, None] * w2, gamma * b2
        if isinstance(block.mlp, MoEMLP):
            got = moe_mlp(block.mlp, w1, b1, w2, b2)
        else:
            assert isinstance(block.mlp, MLP)
            got = dense_mlp(block.mlp, w1, b1, w2, b2)
        _place(report, new, used, ck, original, pre + "mlp.", got, names)

    if dropped:
        report.notes.append(f"{_group(dropped)}: biases the model has no place for are dropped (the query bias and "
                            f"proj.bias: MoA experts have neither)")

    # --- final norms: timm's norm before the head (MAE's global-pool models have fc_norm instead); the model has
    # norm before dense heads and fc_norm before image heads (a mean of patch tokens, as MAE's fc_norm)
    for mine, theirs in (("norm", ("norm", "fc_norm")), ("fc_norm", ("fc_norm", "norm"))):
        src = next((n for n in theirs if n + ".weight" in ck), None)
        if getattr(model, mine) is not None and src is not None:
            for t in ("weight", "bias"):
                if f"{src}.{t}" in ck:
                    new[f"{mine}.{t}"] = (take(f"{src}.{t}"), "loaded")

    # --- copy, and account for every model parameter and every checkpoint tensor
    params = dict(model.named_parameters())
    for name, (tensor, how) in new.items():
        p = params[name]
        assert p.shape == tensor.shape, (name, tuple(p.shape), tuple(tensor.shape))  # a bug here, not a user error
        p.copy_(tensor)
        (report.loaded if how == "loaded" else report.upcycled).append(name)
    model.task_embed.zero_()
    report.left_at_init = [n for n in params if n not in new and n not in report.zeroed]
    mismatched = {n for _, _, names in report.mismatched for n in names}
    report.ignored = [original[n] for n in ck if n not in used and n not in mismatched]
    report.ignored_shapes = {original[n]: ck[n].shape for n in ck}
    if not report.loaded and not report.upcycled:
        raise ValueError(f"nothing in {short} fits this model")
    return report


def _place(report, new, used, ck, original, prefix, got, names):
    """Record one sublayer's tensors (got: {name in the layer: (tensor, how)}) or its mismatch (got: why)."""
    present = [n for n in names if n in ck]
    if isinstance(got, str):
        report.mismatched.append((prefix.rstrip("."), got, present))
        return
    used.update(present)
    for name, value in got.items():
        new[prefix + name] = value
