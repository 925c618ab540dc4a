"""Mixed widths on transformers models: Llama (grouped-query attention, an MLP width that is no multiple of the
hidden size), BLIP-2 (the Q-Former's cross-attention reads wider vision features; the language model is
wider again) and CLIP with unequal towers. Random weights from tiny configs; nothing downloaded."""

from __future__ import annotations

import copy

import pytest
import torch

from aurora_pet import AuroraConfig, AuroraConfigError, AuroraModel, TargetError, get_aurora_model
from aurora_pet.factors import num_factor_parameters
from aurora_pet.families.hf.build import build_blip2

RANK = 4


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def tiny_clip():
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "vocab_size": 128, "max_position_embeddings": 32},
        vision_config={"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)
    torch.manual_seed(0)
    return CLIPModel(config).eval()


def llama_inputs():
    return {"input_ids": torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))}


def clip_inputs():
    generator = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, 128, (2, 5), generator=generator),
            "pixel_values": torch.randn(2, 3, 32, 32, generator=generator)}


def blip2_inputs():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 120, (2, 6), generator=generator)
    ids[:, :4] = 127  # the image token, once per query token
    return {"input_ids": ids, "pixel_values": torch.randn(2, 3, 32, 32, generator=generator)}


def output(model, inputs):
    with torch.no_grad():
        result = model(**inputs)
    return result.logits if hasattr(result, "logits") else result.logits_per_image


CASES = {
    # name: (build, inputs, targets, d, expected output widths, expected input widths)
    "llama": (tiny_llama, llama_inputs, r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
              32, [172], [172]),
    "blip2": (lambda: build_blip2("tiny"), blip2_inputs,
              r"qformer\.encoder\.layer\.\d+\.crossattention\.attention\.(query|key|value)"
              r"|qformer\.encoder\.layer\.\d+\.crossattention\.output\.dense|language_model\..*\.(q_proj|v_proj)",
              32, [], [48]),
    "clip": (tiny_clip, clip_inputs, r".*\.self_attn\.(q_proj|k_proj|v_proj|out_proj)", 48, [32], [32]),
}


@pytest.fixture(params=list(CASES))
def case(request):
    build, inputs, targets, d, out_widths, in_widths = CASES[request.param]
    return request.param, build, inputs(), targets, d, out_widths, in_widths


def test_width_classes_count_and_identity_at_initialisation(case):
    name, build, inputs, targets, d, out_widths, in_widths = case
    base = build()
    reference = copy.deepcopy(base)
    aurora = get_aurora_model(base, AuroraConfig(rank=RANK, target_modules=targets)).eval()
    factors = aurora.aurora_factors
    assert (aurora.slice_size, list(factors.out_widths), list(factors.in_widths)) == (d, out_widths, in_widths)
    expected = num_factor_parameters(d, aurora.num_slices, RANK, "cp", out_widths, in_widths)
    assert aurora.parameter_report()["groups"]["factors"] == expected == factors.num_parameters()
    assert expected == (2 * d + sum(out_widths) + sum(in_widths) + aurora.num_slices + 1) * RANK
    assert torch.equal(output(aurora, inputs), output(reference, inputs))


@pytest.mark.parametrize("core", ["cp", "tucker"])
def test_merged_equals_unmerged_and_save_load_is_identical(case, core, tmp_path):
    name, build, inputs, targets, d, *_ = case
    aurora = get_aurora_model(build(), AuroraConfig(rank=RANK, target_modules=targets, core=core)).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in aurora.aurora_factors.parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
    unmerged = output(aurora, inputs)
    with aurora.disable_adapter():
        assert not torch.allclose(output(aurora, inputs), unmerged)  # the update is not zero
    aurora.merge()
    torch.testing.assert_close(output(aurora, inputs), unmerged, rtol=1e-4, atol=1e-4)
    aurora.unmerge()
    # every target's ΔW equals TensorLy's reconstruction of its width pair
    for layer in aurora.layers.values():
        torch.testing.assert_close(layer.delta_weight(), layer.reference_delta_weight(), rtol=1e-5, atol=1e-6)
    aurora.save_pretrained(tmp_path)
    loaded = AuroraModel.from_pretrained(build(), tmp_path).eval()
    assert torch.equal(output(loaded, inputs), unmerged)


def test_rank_is_limited_by_the_smallest_width_in_use():
    """CLIP's towers are 32 and 48 wide: d = 48 (ties go to the larger side), the text tower is a width class."""
    with pytest.raises(TargetError, match=r"rank 40 exceeds the width 32 of text_model\.encoder\.layers\.0\."
                                          r"self_attn\.k_proj \(32×32\).*smallest width in use"):
        get_aurora_model(tiny_clip(), AuroraConfig(rank=40, target_modules=CASES["clip"][2]))
    with pytest.raises(AuroraConfigError, match=r"rank 33 exceeds the slice size d=32"):
        get_aurora_model(tiny_llama(), AuroraConfig(rank=33, target_modules=CASES["llama"][2]))


def test_a_step_trains_every_width_class():
    aurora = get_aurora_model(tiny_llama(), AuroraConfig(rank=RANK, target_modules=CASES["llama"][2]))
    optimizer = torch.optim.SGD([p for p in aurora.parameters() if p.requires_grad], lr=0.1)
    inputs = llama_inputs()
    for _ in range(2):  # V moves first, then every factor
        optimizer.zero_grad()
        aurora(**inputs, labels=inputs["input_ids"]).loss.backward()
        optimizer.step()
    grads = {n: p.grad for n, p in aurora.aurora_factors.named_parameters()}
    assert set(grads) == {"U", "V", "P", "lam", "U_172", "V_172"}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
