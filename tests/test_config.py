import pytest

from aurora_pet import PRESETS, AuroraConfig, AuroraConfigError, get_preset


def test_json_round_trip(tmp_path):
    config = AuroraConfig(rank=8, target_modules=["query", "value"], core="tucker", scale=2.0, ice=True,
                          modules_to_save=["itm_head"], init_seed=3)
    assert AuroraConfig.from_json(config.to_json()) == config
    path = tmp_path / "c.json"
    path.write_text(config.to_json())
    assert AuroraConfig.from_json_file(path) == config


@pytest.mark.parametrize("field,value,message", [
    ("rank", 0, "rank must be a positive integer"),
    ("rank", -3, "rank must be a positive integer"),
    ("rank", 2.5, "rank must be a positive integer"),
    ("core", "tt", "core must be one of"),
    ("dropout", 1.0, r"dropout must be in \[0, 1\)"),
    ("scale", float("nan"), "scale must be a finite number"),
    ("target_modules", "(unclosed", "not a valid regex"),
    ("target_modules", [], "target_modules must be"),
    ("forward_mode", "fast", "forward_mode must be one of"),
    ("slice_size", 0, "slice_size must be a positive integer"),
])
def test_invalid_values_are_named(field, value, message):
    with pytest.raises(AuroraConfigError, match=message):
        AuroraConfig(**{field: value})


def test_unknown_keys_are_named_with_a_suggestion(tmp_path):
    with pytest.raises(AuroraConfigError, match=r"'rnak' \(did you mean 'rank'\?\)"):
        AuroraConfig.from_dict({"rnak": 4})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(AuroraConfigError, match="bad.json: not valid JSON"):
        AuroraConfig.from_json_file(bad)
    with pytest.raises(AuroraConfigError, match="not found"):
        AuroraConfig.from_json_file(tmp_path / "missing.json")


def test_presets():
    config = AuroraConfig.from_preset("blip_retrieval/cross-attention", rank=16)
    assert config.rank == 16 and config.ice and config.gqt
    assert config.modules_to_save == ["itm_head", "vision_proj", "text_proj"]
    assert {name.split("/")[1] for name in PRESETS} == {"cross-attention", "text-attention", "reference"}
    with pytest.raises(AuroraConfigError, match="did you mean 'blip_vqa/reference'"):
        get_preset("blip_vqa/referense")
