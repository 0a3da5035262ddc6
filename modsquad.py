"""
Mod-Squad: Designing Mixtures of Experts As Modular Multi-Task Learners
Z. Chen, Y. Shen, M. Ding, Z. Chen, H. Zhao, E. Learned-Miller, C. Gan. CVPR 2023. arXiv:2212.08066v1.

A ViT whose layers are mixtures of experts (MoE). Every MoE layer has one router per task; each training step runs
every task on the same images, and a loss that maximises the mutual information I(T;E) between tasks and experts
makes each task settle on a few experts, which can then be extracted as a small standalone single-task model.
Written to be read beside the paper and the official code, https://github.com/UMass-Foundation-Model/Mod-Squad at
commit 1d17e81d090ac7e1a66dd420194c0b7679d820a4 (2023-04-03). Every file:line below points into that commit;
moe.py and parallel_experts.py are in parallel_linear/parallel_experts/.

Notation (every shape comment uses these letters)
    B    images per call. T tasks run in one call as T*B rows, task-major (rows t*B..(t+1)*B-1 are task t's); inside
         a layer the "B*N" token rows then count T*B*N
    N    tokens per image (patches + cls) · D embed_dim · T tasks · C a task's output channels
    E    experts of the MoE layer at hand (num_attn_experts or num_mlp_experts; fewer once extracted)
    K    top-k of the MoE layer at hand: in MoE attention K = num_heads (the query heads each token picks), in MoE MLP
         K = mlp_top_k (the MLPs each token picks); P = B*N*K, that layer's (token, slot) pairs
    H    query heads of dense attention (= num_heads), Hkv its key/value heads (H, or 1 in the dense twin of MoA)
    Dh   head_dim · Dm hidden size of one MLP expert (mlp_dim)

Contents, in file order (the README's reading guide follows it); each section's opening comment says why it is so
    1 notation, contents                                    this docstring
    2 configuration, the "twice" layout                     ModSquadConfig, block_kinds (PRESETS at the end)
    3 task-gated router: one per task per MoE layer         Routing, TaskRouter
    4 dispatch: (token, slot) pairs sorted by expert        Dispatch, sort_by_expert, expert_matmul
    5 MoE layers, each with its equation (forward_reference) beside the fast forward:
        mixture of attention heads (MoA)                    MoEAttention; its dense twin Attention
        mixture of MLP experts                              MoEMLP; its dense twin MLP
    6 block and model, task embedding before every block    Block, ModSquad
    7 MI loss L_MI = -I(T;E) from the joint P(task, expert) task_expert_joint, mutual_information_loss, mi_loss
    8 extraction of a task's experts, and why it is exact   expert_usage, extract
    9 parameters and FLOPs: only the top-k experts count    count_params_flops; then PRESETS, the paper's models

Left out on purpose: starting from ImageNet weights (pretrained.py does it: train.py --init), custom CUDA kernels
(F.grouped_mm is used where it exists), the unused auxiliary losses of the official code (switch, z, cv, top-k loss:
weight 0 in the Mod-Squad configs).
"""

import copy
import math
from dataclasses import asdict, dataclass, fields, replace
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

# The 13 Taskonomy tasks in the official order (main_mt.py:189, without rgb: models_mt.py:22), with the channels of
# models_mt.py:30 and :37: (name, channels, kind).
# "image" tasks predict one vector per image (the .npy soft labels), "dense" tasks one value per pixel.
def taskonomy_tasks(object_classes=1000, scene_classes=365):
    return (("class_object", object_classes, "image"), ("class_scene", scene_classes, "image"),
            ("depth_euclidean", 1, "dense"), ("depth_zbuffer", 1, "dense"), ("edge_occlusion", 1, "dense"),
            ("edge_texture", 1, "dense"), ("keypoints2d", 1, "dense"), ("keypoints3d", 1, "dense"),
            ("normal", 3, "dense"), ("principal_curvature", 2, "dense"), ("reshading", 3, "dense"),
            ("segment_unsup2d", 1, "dense"), ("segment_unsup25d", 1, "dense"))


TASKONOMY_TASKS = taskonomy_tasks()
SYNTHETIC_TASKS = taskonomy_tasks(object_classes=6, scene_classes=4)  # data.SyntheticScenes: 6 objects, 4 scenes


@dataclass
class ModSquadConfig:
    img_size: int = 32  # input resolution (the official code supports 224 only)
    patch_size: int = 4  # 16 in the paper
    in_chans: int = 3
    embed_dim: int = 64  # D
    depth: int = 4  # number of blocks
    num_heads: int = 4  # query heads per token: H of dense attention; in MoE attention K, the experts a token picks
    head_dim: int = 32  # Dh; 2*D/num_heads as the official MoE configs, also their dense blocks (see MoEAttention)
    num_attn_experts: int = 8  # E of MoE attention
    num_mlp_experts: int = 8  # E of MoE MLP
    mlp_top_k: int = 2  # K of MoE MLP ("ffd_heads" in the official code)
    mlp_ratio: float = 4.0  # dense MLP hidden = mlp_ratio*D; expert hidden Dm = mlp_ratio*D // mlp_top_k
    moe: bool = True  # False: the dense multi-task twin, the same active MACs minus the routers' (Attention, MLP)
    layout: str = "alternate"  # "alternate": MoE attention in even blocks, MoE MLP in odd ("twice"); "all": both;
    #                            "dense": no MoE layer, standard ViT blocks (the authors' dense mtvit_* baselines)
    qkv_bias: bool = True
    noisy_gating: bool = False  # Gaussian noise on the router logits while training (off in the Mod-Squad configs)
    mi_weight: float = 0.005  # w_MI, weight of the mutual-information loss
    drop_path: float = 0.0  # stochastic depth rate of the last block (linearly increasing over blocks)
    tasks: tuple = SYNTHETIC_TASKS  # (name, channels, "dense"|"image") per task, in task-index order
    kept_experts: Optional[tuple] = None  # extracted models: per MoE layer, the original ids of the kept experts

    def __post_init__(self):
        self.tasks = tuple(tuple(t) for t in self.tasks)
        if self.kept_experts is not None:
            self.kept_experts = tuple(tuple(int(e) for e in ids) for ids in self.kept_experts)
        problems = []
        if self.layout not in ("alternate", "all", "dense"):
            problems.append(f"layout must be 'alternate', 'all' or 'dense', got {self.layout!r}")
        if self.img_size % self.patch_size:
            problems.append(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.layout != "dense" and self.num_heads > self.num_attn_experts:
            problems.append(f"num_heads (top-k of MoE attention) {self.num_heads} > num_attn_experts {self.num_attn_experts}")
        if self.layout != "dense" and self.mlp_top_k > self.num_mlp_experts:
            problems.append(f"mlp_top_k {self.mlp_top_k} > num_mlp_experts {self.num_mlp_experts}")
        if min(self.embed_dim, self.depth, self.num_heads, self.head_dim, self.mlp_top_k, self.mlp_dim) < 1:
            problems.append("embed_dim, depth, num_heads, head_dim, mlp_top_k and the expert hidden size must be >= 1")
        if not 0 <= self.drop_path < 1 or self.mi_weight < 0:
            problems.append(f"need 0 <= drop_path < 1 and mi_weight >= 0 (got {self.drop_path}, {self.mi_weight})")
        if not self.tasks or len({t[0] for t in self.tasks}) != len(self.tasks):
            problems.append("tasks must be a non-empty list of (name, channels, kind) with unique names")
        for t in self.tasks:
            if len(t) != 3 or t[2] not in ("dense", "image") or int(t[1]) < 1:
                problems.append(f"bad task {t}: expected (name, channels >= 1, 'dense' or 'image')")
        if self.kept_experts is not None:
            layers = self.moe_layer_kinds()
            if len(self.kept_experts) != len(layers):
                problems.append(f"kept_experts has {len(self.kept_experts)} entries for {len(layers)} MoE layers")
            for ids, kind in zip(self.kept_experts, layers):
                e, k = (self.num_attn_experts, self.num_heads) if kind == "attn" else (self.num_mlp_experts, self.mlp_top_k)
                if len(set(ids)) != len(ids) or len(ids) < k or not all(0 <= i < e for i in ids):
                    problems.append(f"kept_experts {ids}: need >= {k} distinct ids in [0, {e})")
        if problems:
            raise ValueError("invalid ModSquadConfig: " + "; ".join(problems))

    @property
    def mlp_dim(self):  # Dm, hidden size of one MLP expert (models_moe.py:379-384): K experts = one dense MLP's width
        return int(self.embed_dim * self.mlp_ratio) // self.mlp_top_k

    def block_kinds(self, i):
        """(attention kind, MLP kind) of block i: 'moe' marks an MoE slot (with moe=False it holds the dense twin of
        the MoE layer), 'dense' an ordinary ViT sublayer. "alternate" is the layout of the paper's Mod-Squad runs, the
        official "twice" (twice_mlp = twice_attn = True, models_mt.py:804-805): each block has one MoE sublayer."""
        if self.layout == "dense":  # MTVisionTransformer, models_mt.py:12-99: timm ViT blocks
            return "dense", "dense"
        moe_attn = self.layout == "all" or i % 2 == 0  # use_moe_attn, models_mt.py:163-164
        moe_mlp = self.layout == "all" or i % 2 == 1
        return ("moe" if moe_attn else "dense"), ("moe" if moe_mlp else "dense")

    def moe_layer_kinds(self):
        """'attn' or 'mlp' for each MoE layer, in forward order (empty for the dense baseline)."""
        if not self.moe or self.layout == "dense":
            return []
        return [kind for i in range(self.depth) for kind, k in zip(("attn", "mlp"), self.block_kinds(i)) if k == "moe"]

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    @classmethod
    def from_preset(cls, name, **overrides):  # PRESETS: at the end of the file
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# -----------------------------------------------------------------------------
# Task-gated router. Why one router per task: the tasks share one pool of experts, and each task's router chooses from
# it on its own, so tasks can cooperate (choose the same experts) or specialise (choose their own); the MI loss below
# pushes each task towards a few experts. Each router is one linear map, logits = x W_t (no bias), softmax, top-k.


class Routing(NamedTuple):
    """What one MoE layer decided for the tokens of one task pass (returned, never stored on the module).
    probs:    (B*N, E) softmax over all experts of the task's router, in float32 or wider (the MI loss uses these)
    topk_idx: (B*N, K) long, the chosen experts, as indices into this layer's experts (the expert ids, unless the
              model was extracted: then positions in router.expert_ids)
    gates:    (B*N, K) the weights of the chosen experts: their softmax probabilities + 1e-4, not renormalised (what
              that changes: TaskRouter.forward)
    A layer called on several tasks at once returns one Routing over all their rows (T*B*N, task-major);
    ModSquad.forward splits it into one Routing per task."""
    probs: torch.Tensor
    topk_idx: torch.Tensor
    gates: torch.Tensor


class TaskRouter(nn.Module):
    """One linear router (no bias) per task over the E experts of a layer (moe.py:366-374, 441-504)."""

    def __init__(self, dim, num_experts, top_k, num_tasks, noisy=False, kept=None):
        super().__init__()
        self.top_k = top_k
        self.w_gate = nn.Parameter(torch.empty(num_tasks, num_experts, dim))  # (T, E, D)
        self.w_noise = nn.Parameter(torch.empty(num_tasks, num_experts, dim)) if noisy else None
        # An extracted model keeps its task's whole router, so the softmax still runs over every original expert;
        # expert_ids lists which of them this layer still has, and top-k is taken among those (why: see extract).
        self.register_buffer("expert_ids", torch.arange(num_experts) if kept is None else torch.tensor(kept))
        for w in (self.w_gate, self.w_noise):
            if w is not None:  # the official zero init (moe.py:374) is overwritten by trunc_normal (models_mt.py:168)
                nn.init.trunc_normal_(w, std=0.02)

    def forward(self, x, task):
        """x: (T*B*N, D), the tokens of T task passes in T contiguous blocks; task: the T task indices (a list), or
        one int for one pass. Block t is routed by task[t]'s router. Returns the Routing of all T*B*N rows."""
        tasks = [task] if isinstance(task, int) else list(task)
        # router in float32 (or the input's wider type), also under autocast: bf16 logits flip top-k choices
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(dtype).view(len(tasks), -1, x.shape[-1])  # (T, B*N, D)
            # logits of every task block with its own router: one batched matmul over the T routers
            logits = torch.bmm(x, self.w_gate[tasks].to(dtype).transpose(1, 2))  # (T, B*N, D) x (T, D, E)
            if self.w_noise is not None and self.training:  # noisy top-k gating, train only (official: also eval)
                noise_std = F.softplus(torch.bmm(x, self.w_noise[tasks].to(dtype).transpose(1, 2))) + 1e-2
                logits = logits + torch.randn_like(logits) * noise_std
            # π = softmax(x W_t)  (B*N, E) per task: a proper distribution, which the MI loss uses
            probs = logits.flatten(0, 1).softmax(dim=-1)  # (T*B*N, E)
            top_p, topk_idx = probs.index_select(1, self.expert_ids).topk(self.top_k, dim=-1)  # (T*B*N, K) each
            # g = the chosen π + 1e-4, as the official gates (moe.py:465, then 482-490), not renormalised over the K
            # chosen. What that changes, against g / Σ_j g_j: the K gates sum to π's mass on the chosen experts
            # (+ K·1e-4), below 1, so a router that is unsure scales the layer's output down; the task loss reaches
            # every expert's logit through the softmax denominator, not only the chosen ones'; and a gate depends on
            # all E logits, so an extracted model must keep the whole router to stay exact (extract). The +1e-4
            # keeps every chosen pair in the official dispatch, which drops gates equal to 0 (nonzero(), moe.py:28).
            gates = top_p + 1e-4
        return Routing(probs, topk_idx, gates)

    def keep_(self, task, keep):
        """Keep only `task`'s router and the experts at local indices `keep` (used by extract)."""
        self.w_gate = nn.Parameter(self.w_gate.data[task : task + 1].clone())
        if self.w_noise is not None:
            self.w_noise = nn.Parameter(self.w_noise.data[task : task + 1].clone())
        self.expert_ids = self.expert_ids[keep]


# -----------------------------------------------------------------------------
# Expert dispatch, shared by both MoE layers. An MoE layer computes y_i = Σ_j g_ij f_{e_ij}(x_i) over a token's K
# chosen experts; each layer's forward_reference writes that as every expert on every token, masked by the gates
# (E/K times the work). The fast forward computes only the P = B*N*K chosen (token, slot) pairs: sort the pairs by
# expert so that each expert's rows are contiguous, then one grouped matmul runs every expert on its own rows.


class Dispatch(NamedTuple):
    order: torch.Tensor  # (P,) pair ids (token*K + slot) sorted by expert
    inverse: torch.Tensor  # (P,) position of each pair in `order`
    token: torch.Tensor  # (P,) token of each sorted pair
    expert: torch.Tensor  # (P,) expert of each sorted pair
    offsets: torch.Tensor  # (E,) int32, end of each expert's block of rows


def sort_by_expert(topk_idx, num_experts):
    """(B*N, K) chosen experts -> the (token, slot) pairs sorted by expert, their tokens, and each expert's rows."""
    flat = topk_idx.flatten()  # (P,)
    order = flat.argsort(stable=True)  # stable: within an expert, pairs stay in token order
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    expert = flat[order]  # ascending
    # end of each expert's rows = how many sorted ids are <= e; unlike bincount, searchsorted needs no host sync on GPU
    offsets = torch.searchsorted(expert, torch.arange(num_experts, device=flat.device), right=True)
    # a pair's id is token*K + slot, so its token is id // K
    return Dispatch(order, inverse, order // topk_idx.shape[1], expert, offsets.to(torch.int32))


def expert_matmul(x, w, d):
    """Rows of x sorted by expert times that expert's weight: (P, in) x (E, in, out) -> (P, out)."""
    if torch.is_autocast_enabled(x.device.type):  # grouped_mm is not on autocast's list: cast both operands
        x = x.to(torch.get_autocast_dtype(x.device.type))
    w = w.to(x.dtype)
    grouped = hasattr(F, "grouped_mm") and (
        (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16))
        or (x.device.type == "cuda" and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)))
    if grouped and x.shape[1] % 8 == 0 and w.shape[2] % 8 == 0:  # kernel needs 16-byte aligned rows
        y = F.grouped_mm(x, w, offs=d.offsets)
        if y.requires_grad:  # its backward rejects the 0-stride gradients of e.g. .sum()
            y.register_hook(torch.Tensor.contiguous)
        return y
    # fallback (fp64, older torch, other GPUs): one matmul per expert over its contiguous block of rows
    counts = torch.diff(d.offsets, prepend=d.offsets.new_zeros(1)).tolist()
    return torch.cat([xe @ we for xe, we in zip(x.split(counts), w.unbind(0))])


def _init_experts(w, b=None):
    # as ParallelExperts (parallel_experts.py:99-106): U(±1/in) for weights, U(±1/sqrt(out)) for biases
    nn.init.uniform_(w, -1.0 / w.shape[1], 1.0 / w.shape[1])
    if b is not None:
        nn.init.uniform_(b, -1.0 / math.sqrt(w.shape[2]), 1.0 / math.sqrt(w.shape[2]))


# -----------------------------------------------------------------------------
# Mixture of attention heads (MoA, Zhang et al. 2022): per-expert query and output projections, one shared k/v head.
# Why the keys and values are shared: a query attends over the keys and values of all N tokens. If each expert had
# its own, a query routed to expert e would need every token's key and value under e, so each token would compute
# them for every expert that any token chose: dense in E. One shared k/v head is computed once per token, not once
# per expert, and only the K chosen experts' projections run per token: the layer stays sparse, and one attention
# call serves all experts. What an expert owns is how a token asks (W_q[e]) and what it writes back (W_o[e]).


class MoEAttention(nn.Module):
    """Each token picks K = num_heads of E attention experts; expert e owns w_q[e] (D, Dh) and w_o[e] (Dh, D); every
    chosen expert attends with the same shared key/value head (models_moe.py:282-349):
        y_i = Σ_j g_ij · softmax(q_ij k^T / sqrt(Dh)) v · W_o[e_ij],   q_ij = x_i W_q[e_ij],   [k, v] = x W_kv + b_kv
    Dh = 2*D/num_heads in the official configs (models_mt.py:800), which do not say why. Its effect: the K chosen
    heads have inner width K*Dh = 2D, so the q and o projections cost 2·D·2D = 4D² MACs per token, what a standard
    ViT attention's q, k, v and o cost at width D; the shared k/v add 2·D·Dh."""

    def __init__(self, cfg, kept=None):
        super().__init__()
        D, Dh = cfg.embed_dim, cfg.head_dim
        E = len(kept) if kept is not None else cfg.num_attn_experts
        self.num_experts, self.top_k = E, cfg.num_heads
        self.router = TaskRouter(D, cfg.num_attn_experts, cfg.num_heads, len(cfg.tasks), cfg.noisy_gating, kept)
        self.w_q = nn.Parameter(torch.empty(E, D, Dh))  # expert query projections, no bias
        self.w_o = nn.Parameter(torch.empty(E, Dh, D))  # expert output projections, no bias
        self.kv = nn.Linear(D, 2 * Dh)  # the shared key and value head (with bias whatever qkv_bias, as kv_proj)
        _init_experts(self.w_q), _init_experts(self.w_o)

    def forward_reference(self, x, task):
        """The equation as written: every expert on every token, weighted by its gate (0 where the token did not
        choose it). E/K times forward's work, the same values; the tests' oracle for forward. Same in, same out."""
        B, N, D = x.shape
        routing = self.router(x.reshape(B * N, D), task)
        k, v = self.kv(x).chunk(2, dim=-1)  # (B, N, Dh) each: one key and one value per token, for every expert
        out = 0
        for e in range(self.num_experts):
            g = (routing.gates * (routing.topk_idx == e)).sum(-1).view(B, N, 1).to(x.dtype)  # g_ij if e_ij = e, else 0
            q = x @ self.w_q[e]  # (B, N, Dh): expert e's query of every token
            a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1) @ v  # (B, N, N) @ v: (B, N, Dh)
            out = out + g * (a @ self.w_o[e])  # (B, N, D)
        return out, routing

    def forward(self, x, task):
        """x: (B, N, D) -> ((B, N, D), Routing): forward_reference's values from the P = B*N*K chosen pairs only."""
        B, N, D = x.shape
        K = self.top_k
        x = x.reshape(B * N, D)
        routing = self.router(x, task)
        d = sort_by_expert(routing.topk_idx, self.num_experts)
        # q_ij = x_i W_q[e_ij]: one query per (token i, slot j), computed expert by expert (pairs sorted by expert),
        # then put back in pair order, token-major, so that each token's K queries lie together for the attention
        q = expert_matmul(x.index_select(0, d.token), self.w_q, d).index_select(0, d.inverse)  # (P, Dh)
        k, v = self.kv(x).view(B, 1, N, -1).chunk(2, dim=-1)  # (B, 1, N, Dh) each: one head shared by all experts
        # a_ij = softmax(q_ij k^T / sqrt(Dh)) v: the K queries of a token fold into the query axis (exact: the
        # softmax is per query row), so one SDPA call with a single k/v head does all experts at once
        a = F.scaled_dot_product_attention(q.view(B, 1, N * K, -1), k, v)  # (B, 1, N*K, Dh)
        # y_i = Σ_j g_ij a_ij W_o[e_ij]; the gate multiplies the narrow (P, Dh) side, not (P, D) (the same: W_o is
        # linear, no bias); .to: the gates are float32, a is bf16 under autocast
        a = a.reshape(B * N * K, -1) * routing.gates.reshape(-1, 1).to(a.dtype)  # (P, Dh)
        y = expert_matmul(a.index_select(0, d.order), self.w_o, d)  # (P, D), sorted by expert
        out = y.new_zeros(B * N, D).index_add_(0, d.token, y)  # sum over each token's K experts
        return out.view(B, N, D), routing

    def keep_(self, task, keep):
        """Keep only `task`'s router and the experts at local indices `keep` (used by extract)."""
        self.router.keep_(task, keep)
        self.w_q, self.w_o = (nn.Parameter(w.data[keep].clone()) for w in (self.w_q, self.w_o))
        self.num_experts = len(keep)


class Attention(nn.Module):
    """Dense attention: H = num_heads query heads of head_dim over Hkv = num_kv_heads key/value heads. With Hkv = H it
    is the official dense block attention (models_moe.py:46-88); with Hkv = 1 it is the dense twin of MoEAttention
    (multi-query attention): the MACs of MoA's K = num_heads chosen experts, without the router's."""

    def __init__(self, dim, num_heads, head_dim, num_kv_heads, qkv_bias=True):
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.q = nn.Linear(dim, num_heads * head_dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * num_kv_heads * head_dim, bias=qkv_bias)
        self.proj = nn.Linear(num_heads * head_dim, dim)

    def forward(self, x, task=None):
        B, N, D = x.shape
        H, Hkv = self.num_heads, self.num_kv_heads
        q = self.q(x).view(B, N, H, -1).transpose(1, 2)  # (B, H, N, Dh)
        k, v = self.kv(x).view(B, N, 2 * Hkv, -1).transpose(1, 2).chunk(2, dim=1)  # (B, Hkv, N, Dh) each
        if Hkv == 1:  # multi-query: fold the heads into the query axis, as in MoEAttention
            a = F.scaled_dot_product_attention(q.reshape(B, 1, H * N, -1), k, v).view(B, H, N, -1)
        else:
            a = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, Dh)
        return self.proj(a.transpose(1, 2).reshape(B, N, -1)), None


# -----------------------------------------------------------------------------
# Mixture of MLP experts. Each token runs only its K chosen MLPs, each of hidden Dm = mlp_ratio*D / K, so its K
# experts cost what one dense MLP of hidden mlp_ratio*D costs, while the layer holds E of them: E/K times the
# parameters at the FLOPs of one dense MLP (plus the router).


class MoEMLP(nn.Module):
    """Each token picks K = mlp_top_k of E two-layer GELU MLPs of hidden Dm (moe.py:506-527):
        y_i = Σ_j g_ij · MLP_{e_ij}(x_i),   MLP_e(x) = GELU(x W_in[e] + b_in[e]) W_out[e] + b_out[e]
    The gate multiplies the whole expert output, its bias included (moe.py:517-520)."""

    def __init__(self, cfg, kept=None):
        super().__init__()
        D, Dm = cfg.embed_dim, cfg.mlp_dim
        E = len(kept) if kept is not None else cfg.num_mlp_experts
        self.num_experts, self.top_k = E, cfg.mlp_top_k
        self.router = TaskRouter(D, cfg.num_mlp_experts, cfg.mlp_top_k, len(cfg.tasks), cfg.noisy_gating, kept)
        self.w_in, self.b_in = nn.Parameter(torch.empty(E, D, Dm)), nn.Parameter(torch.empty(E, Dm))
        self.w_out, self.b_out = nn.Parameter(torch.empty(E, Dm, D)), nn.Parameter(torch.empty(E, D))
        _init_experts(self.w_in, self.b_in), _init_experts(self.w_out, self.b_out)

    def forward_reference(self, x, task):
        """The equation as written: every expert on every token, weighted by its gate (0 where the token did not
        choose it). E/K times forward's work, the same values; the tests' oracle for forward. Same in, same out."""
        B, N, D = x.shape
        x = x.reshape(B * N, D)
        routing = self.router(x, task)
        out = 0
        for e in range(self.num_experts):
            g = (routing.gates * (routing.topk_idx == e)).sum(-1, keepdim=True).to(x.dtype)  # g_ij if e_ij = e, else 0
            out = out + g * (F.gelu(x @ self.w_in[e] + self.b_in[e]) @ self.w_out[e] + self.b_out[e])  # (B*N, D)
        return out.view(B, N, D), routing

    def forward(self, x, task):
        """x: (B, N, D) -> ((B, N, D), Routing): forward_reference's values from the P = B*N*K chosen pairs only."""
        B, N, D = x.shape
        x = x.reshape(B * N, D)
        routing = self.router(x, task)
        d = sort_by_expert(routing.topk_idx, self.num_experts)
        h = expert_matmul(x.index_select(0, d.token), self.w_in, d)  # (P, Dm): x_i W_in[e_ij], sorted by expert
        # + b_in[e] in place: saves a (P, Dm) temporary; .to: h is bf16 under autocast, the parameters float32
        h = F.gelu(h.add_(self.b_in.index_select(0, d.expert).to(h.dtype)))  # (P, Dm)
        y = expert_matmul(h, self.w_out, d) * routing.gates.flatten()[d.order, None].to(h.dtype)  # (P, D): g_ij h W_out
        # the gate multiplies the whole expert output, its bias too; the bias part Σ_j g_ij b_out[e_ij] is
        # (gates scattered over E) @ b_out: (B*N, E) x (E, D), cheaper than gathering a (P, D) bias
        gates = routing.gates.new_zeros(B * N, self.num_experts).scatter(1, routing.topk_idx, routing.gates)
        out = (gates.to(self.b_out.dtype) @ self.b_out).to(y.dtype).index_add_(0, d.token, y)  # (B*N, D)
        return out.view(B, N, D), routing

    def keep_(self, task, keep):
        """Keep only `task`'s router and the experts at local indices `keep` (used by extract)."""
        self.router.keep_(task, keep)
        self.w_in, self.b_in, self.w_out, self.b_out = (
            nn.Parameter(w.data[keep].clone()) for w in (self.w_in, self.b_in, self.w_out, self.b_out))
        self.num_experts = len(keep)


class MLP(nn.Module):
    """Dense MLP fc2(GELU(fc1(x))). In a dense sublayer hidden = mlp_ratio*D; as the dense twin of MoEMLP hidden =
    K*Dm: the MACs of MoEMLP's K chosen experts, without the router's."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x, task=None):
        return self.fc2(F.gelu(self.fc1(x))), None


# -----------------------------------------------------------------------------
# Transformer block: the ViT block, with either sublayer an MoE layer; a block returns the routings of its MoE layers.


def drop_path(x, p, training):
    """Stochastic depth: drop the whole residual branch of a sample with probability p."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], 1, 1).bernoulli_(1 - p)
    return x * keep / (1 - p)


class Block(nn.Module):
    """Pre-norm block: x + attn(LN(x)), then x + MLP(LN(x)); either sublayer may be an MoE layer (models_moe.py:351)."""

    def __init__(self, cfg, index, kept=()):
        super().__init__()
        D, H = cfg.embed_dim, cfg.num_heads  # H query heads per token: dense heads, or the K experts of MoE attention
        attn_kind, mlp_kind = cfg.block_kinds(index)
        kept = list(kept)
        self.norm1, self.norm2 = nn.LayerNorm(D, eps=1e-6), nn.LayerNorm(D, eps=1e-6)
        if attn_kind == "dense":
            self.attn = Attention(D, H, cfg.head_dim, num_kv_heads=H, qkv_bias=cfg.qkv_bias)
        elif cfg.moe:
            self.attn = MoEAttention(cfg, kept.pop(0) if kept else None)
        else:  # the dense twin of MoE attention: H = K query heads over one shared k/v head
            self.attn = Attention(D, H, cfg.head_dim, num_kv_heads=1, qkv_bias=cfg.qkv_bias)
        if mlp_kind == "dense":
            self.mlp = MLP(D, int(D * cfg.mlp_ratio))
        elif cfg.moe:
            self.mlp = MoEMLP(cfg, kept.pop(0) if kept else None)
        else:  # the dense twin of MoE MLP: the hidden width of its K chosen experts
            self.mlp = MLP(D, cfg.mlp_top_k * cfg.mlp_dim)
        self.drop_path = cfg.drop_path * index / max(cfg.depth - 1, 1)  # linspace(0, drop_path, depth)

    def forward(self, x, task):
        """x: (T*B, N, D) -> (x, routings): the Routing of each MoE sublayer (none, one or two), in order."""
        routings = []
        for norm, layer in ((self.norm1, self.attn), (self.norm2, self.mlp)):
            y, routing = layer(norm(x), task)
            x = x + drop_path(y, self.drop_path, self.training)
            if routing is not None:
                routings.append(routing)
        return x, routings


# -----------------------------------------------------------------------------
# The model. Why a task embedding is added before every block (as models_mt.py:505): all the dense parts (patch
# embedding, dense sublayers, norms, the shared k/v) and every router see, at every depth, which task the pass is for;
# the dense baselines are task-conditioned the same way.


class ModSquad(nn.Module):
    """Patch and position embeddings, then per block: + the task's embedding, Block; then the task's head. With
    cfg.moe=False or cfg.layout="dense" it is one of the two dense multi-task baselines."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        D, p, T = cfg.embed_dim, cfg.patch_size, len(cfg.tasks)
        self.grid = cfg.img_size // p  # patches per side
        self.patch_embed = nn.Conv2d(cfg.in_chans, D, kernel_size=p, stride=p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid**2 + 1, D))  # learned
        self.task_embed = nn.Parameter(torch.randn(T, D))  # N(0, 1), never re-initialised (models_mt.py:57)
        kept = list(cfg.kept_experts or [])
        self.blocks = nn.ModuleList()
        for i in range(cfg.depth):
            n_moe = sum(k == "moe" for k in cfg.block_kinds(i)) if cfg.moe else 0
            self.blocks.append(Block(cfg, i, kept[:n_moe]))
            kept = kept[n_moe:]
        kinds = {kind for _, _, kind in cfg.tasks}
        self.norm = nn.LayerNorm(D, eps=1e-6) if "dense" in kinds else None  # before dense heads
        self.fc_norm = nn.LayerNorm(D, eps=1e-6) if "image" in kinds else None  # before image heads
        # dense head: one linear per patch token to its p*p*C pixels; image head: LN + linear (models_mt.py:36-55)
        self.heads = nn.ModuleDict({
            name: nn.Linear(D, p * p * C) if kind == "dense" else nn.Sequential(nn.LayerNorm(D), nn.Linear(D, C))
            for name, C, kind in cfg.tasks})
        self.moe_layers = [m for m in self.modules() if isinstance(m, (MoEAttention, MoEMLP))]
        self.moe_layer_names = [n for n, m in self.named_modules() if isinstance(m, (MoEAttention, MoEMLP))]
        self.apply(self._init_weights)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    @staticmethod
    def _init_weights(m):  # timm 0.3.2 ViT init; Conv2d keeps PyTorch's default
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight), nn.init.zeros_(m.bias)

    def forward(self, images, task):
        """images: (B, 3, H, W) in [-1, 1]; task: an int index into cfg.tasks, or a list of them.
        One task: returns (pred, routings): pred (B, C, H, W) for a dense task, (B, C) logits for an image task;
        routings: one Routing per MoE layer, in the order of self.moe_layer_names.
        A list of T tasks: returns ([pred per task], [routings per task]), the same values as T one-task calls, from one
        backbone call on T*B rows (task-major): every dense GEMM is T times taller and each MoE layer routes and
        dispatches all rows at once, each row block with its own task's embedding, router and head."""
        tasks = [task] if isinstance(task, int) else list(task)
        T, B = len(tasks), images.shape[0]
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, N-1, D), once for all tasks
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1) + self.pos_embed  # (B, N, D)
        N, D = x.shape[1:]
        task_embed = self.task_embed[tasks][:, None, None]  # (T, 1, 1, D)
        x = x[None]  # (1, B, N, D): the first block's "+ task_embed" broadcasts it to (T, B, N, D)
        routings = [[] for _ in tasks]
        for block in self.blocks:
            # the task embedding is added before every block (models_mt.py:505); rows t*B..(t+1)*B-1 are task t's
            x = (x.view(-1, B, N, D) + task_embed).flatten(0, 1)  # (T*B, N, D)
            x, layer_routings = block(x, tasks)
            for r in layer_routings:  # (T*B*N, .) -> T Routings of (B*N, .)
                for per_task, split in zip(routings, zip(*(v.chunk(T) for v in r))):
                    per_task.append(Routing(*split))
        x = x.view(T, B, N, D)
        preds = [self._head(x[i], t) for i, t in enumerate(tasks)]
        return (preds[0], routings[0]) if isinstance(task, int) else (preds, routings)

    def _head(self, x, task):
        """x: (B, N, D) final tokens of one task pass -> its prediction."""
        name, C, kind = self.cfg.tasks[task]
        if kind == "image":  # mean of patch tokens (no cls), norm, head
            return self.heads[name](self.fc_norm(x[:, 1:].mean(dim=1)))  # (B, C)
        B, g, p = x.shape[0], self.grid, self.cfg.patch_size
        y = self.heads[name](self.norm(x)[:, 1:])  # (B, g*g, p*p*C), per patch (row, col, channel), channel fastest
        return y.view(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, g * p, g * p)  # unpatchify


# -----------------------------------------------------------------------------
# Mutual-information loss. Why I(T;E): I(T;E) = H(E) - H(E|T), so maximising it asks for two things at once: each
# task should concentrate on few experts (low H(E|T): the specialisation that extraction then cuts out), and all
# tasks together should spread over all the experts (high H(E): no expert idle, the balance other MoEs get from a
# separate load-balancing loss). Tasks still share experts where that serves them (cooperation); with T > E, they must.


def task_expert_joint(probs_per_task):
    """P(task, expert) of one MoE layer from the router probabilities of the T task passes of one step.
    probs_per_task: T tensors (B*N, E). Every task sees the same B*N tokens, so P(t) = 1/T (moe.py:389-402, 425-426)."""
    T = len(probs_per_task)
    # P(t, e) = 1/(T·B·N) Σ_tokens π_t(e)  -- soft probabilities, as the official code (moe.py:402)
    return torch.stack([p.float().mean(dim=0) for p in probs_per_task]) / T  # (T, E)


def mutual_information_loss(p_te):
    """L_MI = -I(T;E) for a joint p_te (T, E) that sums to 1. Bounds: -log min(T, E) <= L_MI <= 0; it is 0 when experts
    are independent of tasks and -log T when each task owns its own experts (T <= E, uniform P(t))."""
    p_t = p_te.sum(dim=1, keepdim=True)  # (T, 1)
    p_e = p_te.sum(dim=0, keepdim=True)  # (1, E)
    # L_MI = -Σ_t Σ_e P(t,e) log[P(t,e) / (P(t)P(e))]  (moe.py:425-430 without its four 1e-4; 0·log 0 = 0)
    ratio = p_te / (p_t * p_e).clamp_min(1e-20)  # guard: P(t)P(e) = 0
    # guard: 0 log 0 = 0 with a finite gradient where P(t,e) = 0 (softmax underflow); xlogy or torch.where give NaN
    return -(p_te * ratio.clamp_min(1e-20).log()).sum()


def mi_loss(routings_per_task, all_reduce=None):
    """The model's MI loss: L_MI summed over MoE layers (get_zloss, models_mt.py:428-438), unweighted.
    routings_per_task: T lists of Routing (one per MoE layer), from the T task passes of one step. all_reduce, if
    given, averages the joint over data-parallel ranks (a differentiable collective) so that MI is estimated on the
    global batch."""
    losses = []
    for layer_routings in zip(*routings_per_task):  # one MoE layer, all tasks
        p_te = task_expert_joint([r.probs for r in layer_routings])
        if all_reduce is not None:
            p_te = all_reduce(p_te)
        losses.append(mutual_information_loss(p_te))
    return torch.stack(losses).sum() if losses else torch.zeros(())  # the dense baseline has no MoE layer


# -----------------------------------------------------------------------------
# Expert extraction: measure which experts a task's tokens choose, then keep those in a smaller model of the same
# class (stacked expert weights indexed, no state-dict surgery). Why the result is exact: extract's docstring.


@torch.no_grad()
def expert_usage(model, batches, task):
    """Per MoE layer, the fraction of `task`'s tokens that choose each expert (sums to K), over the batches given
    (images, or (images, targets) pairs). Measured directly, unlike the official EMA of the last ~20 steps."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    counts, tokens = [torch.zeros(m.num_experts, device=device) for m in model.moe_layers], 0
    for batch in batches:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        _, routings = model(images.to(device), task)
        for c, r in zip(counts, routings):
            c += torch.bincount(r.topk_idx.flatten(), minlength=c.numel())
        tokens += routings[0].topk_idx.shape[0] if routings else 0
    model.train(was_training)
    return [c.cpu() / max(tokens, 1) for c in counts]


def extract(model, task, usage, threshold=0.03):
    """A standalone single-task ModSquad (T = 1) that keeps, per MoE layer, the experts chosen by more than `threshold`
    of the task's tokens (at least K of them, the most used: top-k needs K to choose from), with the task's embedding,
    head and whole router. usage: per MoE layer, (E,) fractions of the task's tokens choosing each expert (each sums
    to K), as expert_usage returns; "more than 3 % of the tokens" is the official rule (usage_pct > thresh / K,
    models_mt.py:189-221).

    Why it is exact. On every image whose tokens chose only kept experts, in every MoE layer of the full model's pass
    of `task`, the extracted model's output equals the full model's. By induction over the layers, for such an image:
    - everything outside the experts is copied: the patch and position embeddings, norms, dense sublayers, the shared
      k/v heads, the task's embedding and head; so equal inputs give equal outputs there;
    - each router keeps all E rows of the task's W_t, so π = softmax(x W_t) is the same distribution over all the
      original experts; top-k is taken among the kept ones (TaskRouter.expert_ids), which returns the same K experts
      when they were all kept, with the same gates π + 1e-4 (not renormalised, so they depend on π alone);
    - each kept expert's weights are copied, so the chosen experts compute the same outputs, and the layer's output,
      the next layer's input, is the same for every token of the image (attention mixes the image's tokens, so the
      premise is needed for all of them).
    With threshold=0 and usage measured on the same images, every expert any of their tokens chose is kept, so the
    premise holds. A token that did choose a dropped expert gets its best kept one instead (approximate there). The
    official code prunes the router to the kept experts and re-softmaxes over them (models_mt.py:171-390): π changes,
    so every gate changes, and its extraction is approximate everywhere."""
    keeps = []
    for u, layer in zip(usage, model.moe_layers):
        keep = (u > threshold).nonzero().flatten()
        if keep.numel() < layer.top_k:  # keep at least k (models_mt.py:189-221)
            keep = u.topk(layer.top_k).indices
        keeps.append(keep.sort().values.to(layer.router.expert_ids.device))
    name, _, kind = model.cfg.tasks[task]
    kept_ids = tuple(tuple(layer.router.expert_ids[k].tolist()) for layer, k in zip(model.moe_layers, keeps))
    small = copy.deepcopy(model)
    small.cfg = replace(model.cfg, tasks=(model.cfg.tasks[task],), kept_experts=kept_ids)
    small.task_embed = nn.Parameter(model.task_embed.data[task : task + 1].clone())
    small.heads = nn.ModuleDict({name: small.heads[name]})
    if kind == "dense":
        small.fc_norm = None
    else:
        small.norm = None
    for layer, keep in zip(small.moe_layers, keeps):
        layer.keep_(task, keep)
    return small


# -----------------------------------------------------------------------------
# Parameters and FLOPs. A token runs K experts whatever E is, so the FLOPs follow K and the parameters follow E: more
# experts add capacity at the same cost per image, and an extracted model has fewer parameters at the same FLOPs.


def count_params_flops(cfg_or_model, task=0):
    """Analytic parameter count of the whole model, and multiply-accumulates (MACs) per image for one pass of `task`.
    macs counts the backbone: patch embedding, attention, MLPs and routers, one MAC per multiply-add (the unit of the
    authors' fvcore counts, main_mt.py:307-310); heads, norms, softmax and GELU are left out. Only a token's K chosen
    experts count, so E changes params but not macs. Checked against the authors' own comments: the dense mtvit_base
    gives 17.56 G here ("17.58G", models_mt.py:816), and the ViT-B Mod-Squad with 15 attention experts, not the 24 of
    its config, gives 195.80 M parameters ("195.80", models_mt.py:797). router_macs is the routers' share of macs: the
    dense twin (moe=False) costs macs - router_macs. head_macs is the task head's, reported apart."""
    cfg = cfg_or_model.cfg if isinstance(cfg_or_model, nn.Module) else cfg_or_model
    D, Dh, Dm, T = cfg.embed_dim, cfg.head_dim, cfg.mlp_dim, len(cfg.tasks)
    H, Km = cfg.num_heads, cfg.mlp_top_k  # query heads per token (dense H, or MoE attention's K); MoE MLP's K
    p, L = cfg.patch_size, (cfg.img_size // cfg.patch_size) ** 2  # L patches
    N = L + 1
    gate = 2 if cfg.noisy_gating else 1  # router matrices per task: w_gate, and w_noise with noisy gating
    kept = list(cfg.kept_experts or [])
    params = cfg.in_chans * p * p * D + D + D + N * D + T * D  # patch embed, cls, pos, task embeddings
    macs = L * cfg.in_chans * p * p * D
    router_macs = 0
    for i in range(cfg.depth):
        attn, mlp = cfg.block_kinds(i)
        params += 4 * D  # two LayerNorms
        if attn == "dense" or not cfg.moe:  # Attention: H query heads over Hkv key/value heads
            Hkv = H if attn == "dense" else 1
            params += (D + cfg.qkv_bias) * (H + 2 * Hkv) * Dh + H * Dh * D + D  # q, kv, proj
            macs += N * D * (H + 2 * Hkv) * Dh + 2 * N * N * H * Dh + N * H * Dh * D  # q and kv, q k^T and att v, proj
        else:  # MoEAttention: T routers over all original experts, E experts' w_q and w_o, the shared kv (with bias)
            E = len(kept.pop(0)) if cfg.kept_experts else cfg.num_attn_experts
            params += gate * T * cfg.num_attn_experts * D + 2 * E * D * Dh + D * 2 * Dh + 2 * Dh
            router_macs += N * D * cfg.num_attn_experts
            macs += N * H * D * Dh + N * D * 2 * Dh + 2 * N * N * H * Dh + N * H * Dh * D  # K = H chosen experts
        if mlp == "dense" or not cfg.moe:  # MLP: a dense sublayer, or the twin of MoE MLP (its K experts' width)
            hidden = int(D * cfg.mlp_ratio) if mlp == "dense" else Km * Dm
            params += 2 * D * hidden + hidden + D
            macs += 2 * N * D * hidden
        else:  # MoEMLP: T routers over all original experts, E experts of hidden Dm
            E = len(kept.pop(0)) if cfg.kept_experts else cfg.num_mlp_experts
            params += gate * T * cfg.num_mlp_experts * D + E * (2 * D * Dm + Dm + D)
            router_macs += N * D * cfg.num_mlp_experts
            macs += 2 * N * Km * D * Dm  # the K chosen experts
    kinds = [kind for _, _, kind in cfg.tasks]
    params += 2 * D * ("dense" in kinds) + 2 * D * ("image" in kinds)  # norm, fc_norm
    for _, C, kind in cfg.tasks:
        params += (D + 1) * p * p * C if kind == "dense" else 2 * D + (D + 1) * C
    _, C, kind = cfg.tasks[task]
    head_macs = L * D * p * p * C if kind == "dense" else D * C
    return dict(params=int(params), macs=int(macs + router_macs), router_macs=int(router_macs), head_macs=int(head_macs))


# -----------------------------------------------------------------------------
# Presets: the paper's models (not part of the method; ModSquadConfig.from_preset reads them)

# The paper's Taskonomy models (models_mt.py:797 and :704), 224 px, patch 16, 13 tasks, no gating noise; the
# parameter and MAC numbers in the comments are count_params_flops'.
PRESETS = {
    "tiny": dict(),  # the CPU default, ModSquadConfig()
    "mtvit_taskgate_att_mlp_base_MI_twice": dict(  # ViT-B Mod-Squad: 206.96 M params, 21.34 GMACs per task pass
        img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, head_dim=128, num_attn_experts=24,
        num_mlp_experts=16, mlp_top_k=4, mlp_ratio=4.0, layout="alternate", mi_weight=0.005, drop_path=0.1,
        tasks=TASKONOMY_TASKS),
    "mtvit_taskgate_att_mlp_small_MI_twice": dict(  # ViT-S Mod-Squad: 55.44 M params, 5.78 GMACs per task pass
        img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, head_dim=128, num_attn_experts=15,
        num_mlp_experts=16, mlp_top_k=4, mlp_ratio=4.0, layout="alternate", mi_weight=0.005, drop_path=0.1,
        tasks=TASKONOMY_TASKS),
    # the authors' dense multi-task baselines (models_mt.py:816 and :591): standard ViT-B / ViT-S blocks, head_dim 64
    "mtvit_base": dict(  # 90.01 M params, 17.56 GMACs per task pass
        img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, head_dim=64, layout="dense",
        mi_weight=0.0, drop_path=0.1, tasks=TASKONOMY_TASKS),
    "mtvit_small": dict(  # 23.78 M params, 4.60 GMACs per task pass
        img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, head_dim=64, layout="dense",
        mi_weight=0.0, drop_path=0.1, tasks=TASKONOMY_TASKS),
}
