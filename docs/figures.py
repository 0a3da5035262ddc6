"""
The architecture figure of the README, drawn from a ModSquadConfig so that every number in it is the config's.

    python docs/figures.py                                   # docs/architecture.png, the default (tiny) model
    python docs/figures.py --preset mtvit_taskgate_att_mlp_base_MI_twice --out /tmp/vit_b.png

The task x expert usage heatmap of a trained model is written by train.py (out/expert_usage.png), not here.
"""

import argparse
import io
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import Circle, FancyArrowPatch, Rectangle
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from modsquad import PRESETS, ModSquadConfig  # noqa: E402

MOE, DENSE, ROUTER, CHOSEN, TASK = "#fde7c8", "#e3ecf7", "#c9a0dc", "#e8862a", "#9fd8a8"


def box(ax, x, y, w, h, text="", color="white", fontsize=7, **kw):
    ax.add_patch(Rectangle((x, y), w, h, facecolor=color, edgecolor="0.3", lw=0.8, **kw))
    if text:
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize)


def arrow(ax, xy0, xy1, **kw):
    ax.add_patch(FancyArrowPatch(xy0, xy1, arrowstyle="-|>", mutation_scale=8, lw=0.8, color="0.2",
                                 shrinkA=0, shrinkB=0, **kw))


def shown_blocks(depth):
    """Block indices to draw, None for an ellipsis: all of them up to 6, else the first two and the last two."""
    return list(range(depth)) if depth <= 6 else [0, 1, None, depth - 2, depth - 1]


def moe_sublayer(ax, x, y, w, h, title, E, K, T, note):
    """A MoE sublayer: the stack of T task routers (task t's in front), the E experts, K of them chosen by a token."""
    box(ax, x, y, w, h, color=MOE)
    ax.text(x + w / 2, y + h - 0.22, title, ha="center", va="center", fontsize=7, weight="bold")
    ax.text(x + w / 2, y + h - 0.6, note, ha="center", va="center", fontsize=5.5)
    for i in range(min(T, 6)):  # T routers as a stack of cards; only task t's is used in pass t
        box(ax, x + 0.12 + 0.035 * i, y + 0.5 + 0.035 * i, 0.3, 0.6, color=ROUTER, zorder=3 + i)
    ax.text(x + 0.42, y + 0.22, f"{T} routers", ha="center", va="center", fontsize=5.5)
    s = min(0.26, (w - 0.95) / E)  # expert square size
    x0 = x + 0.8
    chosen = {round(j * E / K + E / (2 * K)) % E for j in range(K)}  # an illustrative top-k choice of one token
    for e in range(E):
        ax.add_patch(Rectangle((x0 + e * s, y + 0.65), s * 0.85, 0.36, facecolor=CHOSEN if e in chosen else "white",
                               edgecolor="0.3", lw=min(0.8, 4 * s)))
    arrow(ax, (x + 0.55, y + 0.83), (x0 - 0.03, y + 0.83))
    ax.text(x0, y + 0.44, f"top-{K} of E = {E} experts", ha="left", va="center", fontsize=5.5)
    return x + 0.3, y + 0.5  # where the router's probabilities leave (for the MI loss)


def draw_architecture(cfg, path, title):
    T, D, E_a, E_m = len(cfg.tasks), cfg.embed_dim, cfg.num_attn_experts, cfg.num_mlp_experts
    N = (cfg.img_size // cfg.patch_size) ** 2 + 1
    n_dense = sum(kind == "dense" for _, _, kind in cfg.tasks)
    blocks = shown_blocks(cfg.depth)
    fig = plt.figure(figsize=(13, 6.1))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set(xlim=(0, 26), ylim=(0, 12.2))
    ax.axis("off")
    ax.text(0.3, 11.8, title, fontsize=9, weight="bold", va="center")

    # the backbone runs once per task on the same images: T stacked copies
    bx0, bx1, by0, by1 = 1.9, 22.3, 3.9, 10.0
    for i in (2, 1):
        ax.add_patch(Rectangle((bx0 + 0.18 * i, by0 + 0.18 * i), bx1 - bx0, by1 - by0, facecolor="0.93",
                               edgecolor="0.6", lw=0.6, zorder=0))
    ax.add_patch(Rectangle((bx0, by0), bx1 - bx0, by1 - by0, facecolor="white", edgecolor="0.6", lw=0.6, zorder=0))
    ax.text(bx1 + 0.36, 10.5, f"× T = {T} passes, one per task t,\nover the same images", fontsize=7,
            ha="right", va="bottom", style="italic")

    box(ax, 0.2, 6.2, 1.4, 1.6, f"images\n(B, 3, {cfg.img_size}, {cfg.img_size})")
    box(ax, 2.1, 6.0, 1.9, 2.0, f"patch embed\n{cfg.patch_size}×{cfg.patch_size}, + cls\n+ pos embed\n"
        f"N = {N} tokens\nD = {D}", color=DENSE)
    arrow(ax, (1.6, 7.0), (2.1, 7.0))

    # the task embedding e_t, added before every block (the residual stream is the centre line y = 7)
    x, step = 4.2, (19.2 - 4.2) / len(blocks)
    box(ax, 4.2, 10.45, 14.2, 0.55, f"task embedding e_t  (T × D = {T} × {D}): added to every token before every block",
        color=TASK)
    arrow(ax, (4.0, 7.0), (x + 0.05, 7.0))
    mi_sources = []
    for i in blocks:
        if i is None:
            ax.text(x + step / 2, 7.0, "⋯", fontsize=18, ha="center", va="center")
            arrow(ax, (x + step - 0.15, 7.0), (x + step + 0.05, 7.0))
            x += step
            continue
        ax.add_patch(Circle((x + 0.25, 7.0), 0.2, facecolor=TASK, edgecolor="0.3", lw=0.8))
        ax.text(x + 0.25, 7.0, "+", ha="center", va="center", fontsize=9)
        arrow(ax, (x + 0.25, 10.45), (x + 0.25, 7.2))
        bx, bw = x + 0.6, step - 0.75
        box(ax, bx, 4.2, bw, 5.6, color="0.97")
        arrow(ax, (x + 0.45, 7.0), (bx, 7.0))
        attn, mlp = cfg.block_kinds(i)
        ax.text(bx + bw / 2, 9.55, f"block {i}: x + f(LN x), twice", ha="center", va="center", fontsize=6.5)
        if attn == "moe" and cfg.moe:
            src = moe_sublayer(ax, bx + 0.1, 7.1, bw - 0.2, 2.2, "MoE attention", E_a, cfg.num_heads, T,
                               f"expert: own q, o (Dh = {cfg.head_dim})\none k/v head shared")
            mi_sources.append((src, f"blocks.{i}.attn", E_a, bx, bw, 0))
        else:
            box(ax, bx + 0.1, 7.1, bw - 0.2, 2.2, f"attention\n{cfg.num_heads} heads × Dh {cfg.head_dim}", color=DENSE)
        if mlp == "moe" and cfg.moe:
            src = moe_sublayer(ax, bx + 0.1, 4.4, bw - 0.2, 2.45, "MoE MLP", E_m, cfg.mlp_top_k, T,
                               f"expert: MLP {D}→{cfg.mlp_dim}→{D}")
            mi_sources.append((src, f"blocks.{i}.mlp", E_m, bx, bw, int(attn == "moe")))
        else:
            box(ax, bx + 0.1, 4.4, bw - 0.2, 2.45, f"MLP\n{D}→{int(D * cfg.mlp_ratio)}→{D}", color=DENSE)
        arrow(ax, (bx + bw, 7.0), (x + step + 0.05, 7.0))
        x += step

    # one head per task
    hx = x + 0.05  # where the residual stream arrives
    box(ax, hx, 4.2, 2.8, 5.6, color="0.97")
    ax.text(hx + 1.4, 9.45, f"{T} task heads\n(task t's in pass t)", ha="center", va="center", fontsize=7, weight="bold")
    box(ax, hx + 0.15, 6.6, 2.5, 2.0, f"{n_dense} dense tasks:\nLN, Linear(D, p²C)\nper patch token\n→ (B, C, H, W)",
        color=DENSE, fontsize=6.5)
    box(ax, hx + 0.15, 4.4, 2.5, 2.0, f"{T - n_dense} image tasks:\nmean of patch tokens,\nLN, LN + Linear\n→ (B, C)",
        color=DENSE, fontsize=6.5)
    arrow(ax, (hx + 2.8, 7.0), (hx + 3.4, 7.0))
    box(ax, hx + 3.4, 6.2, 2.5, 1.6, "prediction ŷ_t\ntask loss L_t")

    # the MI loss: per MoE layer (named as in model.moe_layer_names), the task x expert joint over the T passes
    ax.text(0.3, 3.15, "MI loss, per MoE layer:", fontsize=7, weight="bold")
    ax.text(0.3, 2.55, "P(t, e) = mean over tokens\nof π_t(e) / T", fontsize=6.5, va="center")
    ax.text(0.3, 1.55, "L_MI = −I(T; E)\n= −Σ P(t,e) log P(t,e) / P(t)P(e)", fontsize=6.5, va="center")
    for (sx, sy), name, E, bx, bw, slot in mi_sources:  # slot 1: the block's second MoE layer (layout "all")
        sw = bw / (2 if cfg.layout == "all" else 1)  # width each grid may take
        c = min((sw - 0.3) / E, 2.0 / T)  # cell size of the T x E grid
        gx, gy = bx + 0.1 + slot * sw, 3.35 - T * c
        for r in range(T + 1):
            ax.plot([gx, gx + E * c], [gy + r * c] * 2, color="0.5", lw=0.3)
        for e in range(E + 1):
            ax.plot([gx + e * c] * 2, [gy, gy + T * c], color="0.5", lw=0.3)
        ax.add_patch(Rectangle((gx, gy), E * c, T * c, facecolor=ROUTER, alpha=0.35, lw=0))
        label = f"{name}: P(t, e),\n{T} tasks × {E} experts" if sw > 2 else f"{name}\nP(t, e), {T} × {E}"
        ax.text(gx, gy - 0.3, label, fontsize=5.5, va="center")
        arrow(ax, (sx, sy), (max(sx, gx + 0.2), 3.4), linestyle="--")
    box(ax, hx, 0.5, 6.1, 2.6,
        f"loss = Σ_t (weighted) L_t + w_MI · Σ_layers L_MI\nw_MI = {cfg.mi_weight}, one backward per step\n\n"
        "extract(model, t, usage): keep the experts\nused by > 3 % of task t's tokens\n→ a small single-task ModSquad",
        fontsize=6.5)
    ax.text(4.2, 0.25, f"layout '{cfg.layout}': " + ("MoE attention in even blocks, MoE MLP in odd blocks"
            if cfg.layout == "alternate" else "MoE attention and MoE MLP in every block")
            + "; orange = the experts one token picked (illustrative)", fontsize=6.5, va="center")

    # a small PNG: render, then store with an adaptive 64-colour palette
    buf = io.BytesIO()
    fig.savefig(buf, dpi=100, format="png")
    plt.close(fig)
    Image.open(buf).convert("RGB").quantize(64).save(path, optimize=True)
    print(f"wrote {path} ({os.path.getsize(path) / 1024:.0f} KB)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="draw docs/architecture.png from a ModSquadConfig preset")
    parser.add_argument("--preset", default="tiny", choices=PRESETS, help="modsquad.PRESETS name (tiny: train.py's default)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "architecture.png"))
    args = parser.parse_args()
    cfg = ModSquadConfig.from_preset(args.preset)
    where = "python train.py's default model" if args.preset == "tiny" else f"preset {args.preset}"
    draw_architecture(cfg, args.out, f"Mod-Squad ({where}): ViT, D = {cfg.embed_dim}, {cfg.depth} blocks, "
                      f"T = {len(cfg.tasks)} tasks, {cfg.img_size} px, patch {cfg.patch_size}")
