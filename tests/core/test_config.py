import pytest

from aurora_pet import AuroraConfig, AuroraConfigError, all_presets, get_preset
from aurora_pet.families import get_family


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
    ("dropout", 1.0, r"dropout must be a number in \[0, 1\)"),
    ("dropout", "0.1", r"dropout must be a number"),
    ("rank", True, "rank must be a positive integer"),
    ("ice", "yes", "ice must be true or false"),
    ("modules_to_save", [1], "modules_to_save"),
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
    assert {p.kind for p in get_family("lavis").presets.values()} == {"cross-attention", "text-attention", "reference"}
    assert {p.architecture for p in all_presets().values()} >= {"blip_retrieval", "blip_vqa", "hf_blip_retrieval",
                                                                 "hf_blip_vqa", "hf_blip2"}
    with pytest.raises(AuroraConfigError, match="did you mean 'blip_vqa/reference'"):
        get_preset("blip_vqa/referense")


def test_presets_import_no_third_party_model_library():
    """Presets are plain data: listing them never imports LAVIS or transformers (core runs in both envs)."""
    import subprocess
    import sys

    code = ("import sys, aurora_pet; aurora_pet.all_presets(); "
            "assert 'lavis' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_short_preset_names_need_a_model():
    with pytest.raises(AuroraConfigError, match="cross-attention"):
        AuroraConfig.from_preset("cross-atention")


def test_a_string_modules_to_save_is_one_name():
    """0.1 turned "itm_head" into ['i', 't', 'm', ...]: a string there is one module name."""
    assert AuroraConfig(modules_to_save="itm_head").modules_to_save == ["itm_head"]
    assert AuroraConfig.from_dict({"modules_to_save": "itm_head"}).modules_to_save == ["itm_head"]
