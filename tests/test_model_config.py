import pytest

from modsquad import PRESETS, ModSquadConfig, SYNTHETIC_TASKS


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
