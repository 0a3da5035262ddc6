import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(min(2, torch.get_num_threads()))
os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars in test logs (also in the train.py subprocesses)

from modsquad import ModSquadConfig  # noqa: E402

TINY_TASKS = (("class_object", 6, "image"), ("depth_euclidean", 1, "dense"), ("normal", 3, "dense"))


@pytest.fixture
def tiny_cfg():
    """A model small enough for a unit test: 16 px, patch 4 (17 tokens), depth 2, D 32, 8 experts, 3 tasks."""
    torch.manual_seed(0)
    return ModSquadConfig(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, head_dim=16,
                          num_attn_experts=8, num_mlp_experts=8, mlp_top_k=2, tasks=TINY_TASKS)
