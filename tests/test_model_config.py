import pytest

from modsquad import PRESETS, ModSquad, ModSquadConfig, SYNTHETIC_TASKS


@pytest.mark.parametrize("overrides,message", [
    (dict(mlp_top_k=9), "mlp_top_k 9 > num_mlp_experts 8"),
    (dict(num_heads=9), "num_heads"),
    (dict(layout="every-third"), "layout must be"),
    (dict(img_size=30), "not a multiple of patch_size"),
    (dict(tasks=()), "non-empty"),
    (dict(tasks=(("depth", 1, "volume"),)), "bad task"),
    (dict(drop_path=1.5), "drop_path"),
    (dict(kept_experts=((0,),)), "kept_experts"),
])
def test_impossible_configs_raise_with_the_reason(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModSquadConfig(**overrides)


def test_default_is_the_tiny_synthetic_13_task_model():
    cfg = ModSquadConfig()
    assert cfg.tasks == SYNTHETIC_TASKS and len(cfg.tasks) == 13 and cfg.img_size <= 64


def test_config_round_trips_through_plain_data():
    for name in PRESETS:
        cfg = ModSquadConfig.from_preset(name)
        assert ModSquadConfig.from_dict(cfg.to_dict()) == cfg


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match="mtvit_taskgate_att_mlp_base_MI_twice"):
        ModSquadConfig.from_preset("vit_huge")


def test_mlp_ratio_sets_the_dense_and_the_expert_mlp_widths():
    """mlp_ratio sets the dense MLP's hidden width (mlp_ratio*D) and the MoE MLP's total active width (K*Dm), both
    in Mod-Squad blocks and in the dense layout; the official hard-codes 4*D for the dense MLP of its Mod-Squad
    blocks (models_moe.py:401), which agrees at the presets' mlp_ratio 4 (README, Differences)."""
    cfg = ModSquadConfig(mlp_ratio=2.0)
    model = ModSquad(cfg)
    D = cfg.embed_dim
    assert model.blocks[0].mlp.fc1.out_features == 2 * D  # block 0: MoE attention, dense MLP
    assert model.blocks[1].mlp.w_in.shape[-1] * cfg.mlp_top_k == 2 * D  # block 1: MoE MLP, K experts of Dm
    assert ModSquad(ModSquadConfig(mlp_ratio=2.0, layout="dense")).blocks[1].mlp.fc1.out_features == 2 * D
