"""Aurora on transformers 5 BLIP (`BlipForImageTextRetrieval`, `BlipForQuestionAnswering`), through the
models' own forward passes and `generate`, with random weights built from configs (nothing downloaded)."""

from __future__ import annotations

import copy

import pytest
import torch

from aurora_pet import AuroraConfig, AuroraModel, TargetError, get_aurora_model
from aurora_pet.families import family_of
from aurora_pet.families.hf.build import build_blip

from .conftest import ANSWERS, CAPTIONS, QUESTIONS, perturb, pixels, repad, text_batch

TINY_IMAGE = 32


def itm(model, batch, images):
    return model(**batch, pixel_values=images, use_itm_head=True).itm_score


def itc(model, batch, images):
    return model(**batch, pixel_values=images, use_itm_head=False).itm_score


def vqa_loss(model, question, answer, images):
    return model(**question, pixel_values=images, labels=answer["input_ids"],
                 decoder_attention_mask=answer["attention_mask"]).loss


@pytest.fixture
def retrieval():
    return build_blip("retrieval", "tiny")


@pytest.fixture
def vqa():
    return build_blip("vqa", "tiny")


@pytest.fixture
def retrieval_inputs(tokenizer):
    return text_batch(tokenizer, CAPTIONS), pixels(2, TINY_IMAGE)


@pytest.fixture
def vqa_inputs(tokenizer):
    return text_batch(tokenizer, QUESTIONS), text_batch(tokenizer, ANSWERS), pixels(2, TINY_IMAGE)


# -- the family and its default preset -------------------------------------------------------------

@pytest.mark.parametrize(("task", "arch", "heads"), [
    ("retrieval", "hf_blip_retrieval", ["itm_head", "vision_proj", "text_proj"]),
    ("vqa", "hf_blip_vqa", []),
])
def test_omitted_targets_use_the_familys_default_preset(task, arch, heads):
    model = build_blip(task, "tiny")
    assert family_of(model).name == "hf" and family_of(model).architecture(model) == arch
    aurora = get_aurora_model(model, AuroraConfig(rank=4))
    preset = family_of(model).preset(model)
    assert preset.name == f"{arch}/cross-attention"
    assert list(aurora.heads) == heads
    expected = sorted(n for n, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and ".crossattention." in n and "vision_model" not in n)
    assert sorted(aurora.layers) == expected and expected
    if task == "vqa":  # encoder and answer decoder
        assert any(n.startswith("text_decoder.") for n in aurora.layers)
        assert any(n.startswith("text_encoder.") for n in aurora.layers)


def test_reference_preset_adapts_both_towers(retrieval):
    aurora = get_aurora_model(retrieval, AuroraConfig.from_preset("reference", rank=4))
    names = list(aurora.layers)
    assert any(n.startswith("vision_model.") and n.endswith("self_attn.qkv") for n in names)
    assert any(n.endswith("mlp.fc2") and n.startswith("vision_model.") for n in names)
    assert any(".attention.self.query" in n for n in names) and any(".crossattention.self.value" in n for n in names)
    assert not any(n.endswith("output.dense") and n.startswith("text_encoder") for n in names)


def test_a_lavis_preset_on_a_transformers_model_names_the_right_one(retrieval):
    with pytest.raises(TargetError, match=r"blip_retrieval/reference.*transformers.*hf_blip_retrieval"):
        get_aurora_model(retrieval, AuroraConfig.from_preset("blip_retrieval/reference"))
    assert not any(type(m).__name__ == "AuroraLinear" for m in retrieval.modules())


def test_an_unknown_transformers_class_asks_for_target_modules():
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(TargetError, match="no Aurora presets for transformers BertModel.*target_modules"):
        get_aurora_model(bert, AuroraConfig(rank=2))
    aurora = get_aurora_model(bert, AuroraConfig(rank=2, target_modules=["query", "value"]))
    assert len(aurora.layers) == 2


# -- identity, training, merging, saving ---------------------------------------------------------

@pytest.mark.parametrize("ice_gqt", [False, True])
def test_retrieval_outputs_at_initialisation_equal_the_unwrapped_models(retrieval, retrieval_inputs, ice_gqt):
    batch, images = retrieval_inputs
    reference = copy.deepcopy(retrieval)
    aurora = get_aurora_model(retrieval, AuroraConfig.from_preset("cross-attention", rank=4, ice=ice_gqt,
                                                                  gqt=ice_gqt)).eval()
    assert bool(aurora.fusion_sites) == ice_gqt
    with torch.no_grad():
        assert torch.equal(itm(aurora, batch, images), itm(reference, batch, images))
        assert torch.equal(itc(aurora, batch, images), itc(reference, batch, images))


def test_vqa_outputs_at_initialisation_equal_the_unwrapped_models(vqa, vqa_inputs):
    question, answer, images = vqa_inputs
    reference = copy.deepcopy(vqa)
    aurora = get_aurora_model(vqa, AuroraConfig.from_preset("cross-attention", rank=4)).eval()
    with torch.no_grad():
        assert torch.equal(vqa_loss(aurora, question, answer, images), vqa_loss(reference, question, answer, images))
    assert torch.equal(aurora.generate(**question, pixel_values=images, max_new_tokens=4),
                       reference.generate(**question, pixel_values=images, max_new_tokens=4))


def test_a_training_step_moves_only_adapter_and_head_parameters(retrieval, retrieval_inputs):
    batch, images = retrieval_inputs
    aurora = get_aurora_model(retrieval, AuroraConfig.from_preset("cross-attention", rank=4, dropout=0.0))
    perturb(aurora)  # V ≠ 0 so that every factor gets a gradient
    before = {n: p.detach().clone() for n, p in aurora.named_parameters()}
    trainable = {n for n, p in aurora.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in aurora.parameters() if p.requires_grad], lr=1e-2)
    aurora.train()
    loss = itm(aurora, batch, images).logsumexp(-1).mean() + itc(aurora, batch, images).sum()
    loss.backward()
    optimizer.step()
    moved = {n for n, p in aurora.named_parameters() if not torch.equal(p, before[n])}
    heads = ("base_model.itm_head.", "base_model.vision_proj.", "base_model.text_proj.")
    assert trainable == {n for n in before if n.startswith(("aurora_adapters.default.factors.", "aurora_adapters.default.fusion.", *heads))}
    assert moved <= trainable
    assert any(n.startswith("aurora_adapters.default.factors.") for n in moved) and any(n.startswith("aurora_adapters.default.fusion.") for n in moved)
    assert any(n.startswith(heads) for n in moved)


def test_merged_equals_unmerged_and_unmerge_restores_the_base(vqa, vqa_inputs):
    question, answer, images = vqa_inputs
    base = {k: v.clone() for k, v in vqa.state_dict().items()}
    aurora = get_aurora_model(vqa, AuroraConfig.from_preset("cross-attention", rank=4)).eval()
    perturb(aurora)
    with torch.no_grad():
        unmerged = vqa_loss(aurora, question, answer, images)
        aurora.merge()
        merged = vqa_loss(aurora, question, answer, images)
        aurora.unmerge()
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    for key, value in aurora.base_model.state_dict().items():
        torch.testing.assert_close(value, base[key], rtol=0, atol=1e-6, msg=key)


def test_save_then_load_into_a_fresh_model_gives_identical_outputs(tmp_path, retrieval, retrieval_inputs):
    batch, images = retrieval_inputs
    aurora = get_aurora_model(retrieval, AuroraConfig.from_preset("cross-attention", rank=4)).eval()
    perturb(aurora)
    with torch.no_grad():  # the heads are trained too: change one so that the file must carry it
        aurora.base_model.itm_head.weight.add_(1.0)
    aurora.save_pretrained(tmp_path / "adapter")
    loaded = AuroraModel.from_pretrained(build_blip("retrieval", "tiny"), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(itm(loaded, batch, images), itm(aurora, batch, images))
        assert torch.equal(itc(loaded, batch, images), itc(aurora, batch, images))


# -- ICE / GQT read the right mask at every site ------------------------------------------------

def test_retrieval_padding_ids_change_no_output(retrieval, retrieval_inputs):
    """ICE attends over the text tokens of the layer; transformers passes its cross-attention the *image*
    mask, so reading that mask would let padded tokens in. Outputs must not depend on padded ids."""
    batch, images = retrieval_inputs
    aurora = get_aurora_model(retrieval, AuroraConfig.from_preset("cross-attention", rank=4)).eval()
    perturb(aurora)
    repadded = {**batch, "input_ids": repad(batch["input_ids"], batch["attention_mask"], 57)}
    with torch.no_grad():
        torch.testing.assert_close(itm(aurora, repadded, images), itm(aurora, batch, images), rtol=0, atol=1e-6)
        torch.testing.assert_close(itc(aurora, repadded, images), itc(aurora, batch, images), rtol=0, atol=1e-6)
        # and ICE/GQT do change the output: the check above is not vacuous
        with aurora.disable_adapter():
            plain = itm(aurora, batch, images)
    assert not torch.allclose(plain, itm(aurora, batch, images))


def test_vqa_padding_ids_change_no_output(vqa, vqa_inputs):
    """Encoder sites read the question's padding mask, decoder sites padding + causal. (transformers 5's BLIP
    decoder itself lets padded *question* states into its cross-attention — its layer passes the mask as
    `attention_mask`, which its cross-attention ignores — so the question side is checked at the encoder's
    output, and the answer side at the loss.)"""
    question, answer, images = vqa_inputs
    aurora = get_aurora_model(vqa, AuroraConfig.from_preset("cross-attention", rank=4)).eval()
    perturb(aurora)
    assert any(s.startswith("text_decoder.") for s in aurora.fusion_sites)
    assert any(s.startswith("text_encoder.") for s in aurora.fusion_sites)
    encoded = []
    handle = aurora.base_model.text_encoder.register_forward_hook(lambda m, a, out: encoded.append(out[0]))
    repadded_q = {**question, "input_ids": repad(question["input_ids"], question["attention_mask"], 57)}
    repadded_a = {**answer, "input_ids": repad(answer["input_ids"], answer["attention_mask"], 61)}
    labels = answer["input_ids"].masked_fill(answer["attention_mask"] == 0, -100)
    try:
        with torch.no_grad():
            for q in (question, repadded_q):
                aurora(**q, pixel_values=images, decoder_input_ids=answer["input_ids"], labels=labels,
                       decoder_attention_mask=answer["attention_mask"])
            one = aurora(**question, pixel_values=images, decoder_input_ids=answer["input_ids"], labels=labels,
                         decoder_attention_mask=answer["attention_mask"]).loss
            two = aurora(**question, pixel_values=images, decoder_input_ids=repadded_a["input_ids"], labels=labels,
                         decoder_attention_mask=answer["attention_mask"]).loss
    finally:
        handle.remove()
    real = question["attention_mask"].bool()
    torch.testing.assert_close(encoded[0][real], encoded[1][real], rtol=0, atol=1e-6)
    torch.testing.assert_close(one, two, rtol=0, atol=1e-6)


def test_vqa_with_ice_and_gqt_in_encoder_and_decoder_trains_and_generates(vqa, vqa_inputs):
    question, answer, images = vqa_inputs
    aurora = get_aurora_model(vqa, AuroraConfig.from_preset("cross-attention", rank=4, dropout=0.0))
    perturb(aurora, scale=0.05)
    optimizer = torch.optim.AdamW([p for p in aurora.parameters() if p.requires_grad], lr=3e-2)
    aurora.train()
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = vqa_loss(aurora, question, answer, images)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    aurora.eval()
    tokens = aurora.generate(**question, pixel_values=images, max_new_tokens=5)
    assert tokens.shape[0] == 2 and tokens.shape[1] > 1


def test_cached_generation_gives_the_same_tokens_as_uncached(vqa, vqa_inputs):
    question, _, images = vqa_inputs
    aurora = get_aurora_model(vqa, AuroraConfig.from_preset("cross-attention", rank=4)).eval()
    perturb(aurora)
    cached = aurora.generate(**question, pixel_values=images, max_new_tokens=6, use_cache=True)
    uncached = aurora.generate(**question, pixel_values=images, max_new_tokens=6, use_cache=False)
    assert torch.equal(cached, uncached)


def test_unload_restores_the_decoder_cache_setting(vqa):
    decoder = vqa.text_decoder
    before = (vars(decoder.config).get("use_cache"), decoder.generation_config.use_cache)
    aurora = get_aurora_model(vqa, AuroraConfig.from_preset("cross-attention", rank=4))
    assert decoder.config.use_cache is False
    aurora.unload()
    assert (vars(decoder.config).get("use_cache"), decoder.generation_config.use_cache) == before
    assert "generate" not in vars(decoder)  # the cache-free generate is gone too
    assert not any(type(m).__name__ == "AuroraLinear" for m in vqa.modules())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in vqa.modules())


# -- BLIP-base: the real architecture ----------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("task", ["retrieval", "vqa"])
def test_blip_base_default_preset_and_identity(task, tokenizer):
    model = build_blip(task, "base")
    reference = copy.deepcopy(model)
    aurora = get_aurora_model(model, AuroraConfig(rank=64, ice=True, gqt=True)).eval()
    sites = 12 if task == "retrieval" else 24
    assert aurora.slice_size == 768 and len(aurora.fusion_sites) == sites
    assert aurora.num_slices == 4 * sites  # q, k, v, o of every cross-attention
    batch = text_batch(tokenizer, CAPTIONS)  # ids below 384: valid in BLIP-base's 30524-token embedding
    images = pixels(1, 384).expand(2, -1, -1, -1)
    with torch.no_grad():
        if task == "retrieval":
            assert torch.equal(itm(aurora, batch, images), itm(reference, batch, images))
        else:
            answer = text_batch(tokenizer, ANSWERS)
            assert torch.equal(vqa_loss(aurora, batch, answer, images), vqa_loss(reference, batch, answer, images))


def test_lavis_reference_regex_on_a_transformers_model_warns_about_the_vision_branch(retrieval):
    """The 0.1 trap: LAVIS's `reference` regex on transformers BLIP silently adapted only the text side."""
    from aurora_pet import get_preset

    regex = get_preset("blip_retrieval/reference").target_modules
    with pytest.warns(UserWarning, match=r"visual_encoder.*matched no nn.Linear module of BlipForImageTextRetrieval"):
        aurora = get_aurora_model(retrieval, AuroraConfig(rank=4, target_modules=regex))
    assert not any(n.startswith("vision_model.") for n in aurora.layers)


def test_shared_input_projection_equals_the_per_target_computation(retrieval_inputs):
    """The cross-attention keys and values of every layer read the same image features: z = x·V is computed
    once and reused. Outputs and every gradient equal the per-target computation exactly."""
    batch, images = retrieval_inputs
    results = []
    for share in (True, False):
        aurora = get_aurora_model(build_blip("retrieval", "tiny"),
                                  AuroraConfig.from_preset("cross-attention", rank=4, dropout=0.0))
        perturb(aurora)
        aurora.share_input_projections = share
        calls = []
        for layer in aurora.layers.values():
            original = layer.input_projection
            layer.input_projection = lambda inputs, original=original: calls.append(1) or original(inputs)
        aurora.train()
        score = itm(aurora, batch, images)
        score.logsumexp(-1).sum().backward()
        grads = {n: p.grad.clone() for n, p in aurora.named_parameters() if p.grad is not None}
        results.append((score.detach(), grads, len(calls)))
    (shared, shared_grads, shared_calls), (plain, plain_grads, plain_calls) = results
    assert torch.equal(shared, plain)
    assert shared_grads.keys() == plain_grads.keys()
    for name, grad in shared_grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-6, atol=1e-7, msg=name)
    assert (plain_calls, shared_calls) == (8, 5)  # 2 layers × q, k, v, o; the image features projected once


def test_rank_dropout_shares_the_projection_and_equals_the_per_target_computation(retrieval_inputs):
    """With `dropout_position="rank"` the mask falls on z = x·V, after the shared projection: sharing changes
    nothing (the same masks are drawn in the same order), and the image features are still projected once."""
    batch, images = retrieval_inputs
    results = []
    for share in (True, False):
        aurora = get_aurora_model(build_blip("retrieval", "tiny"), AuroraConfig.from_preset(
            "cross-attention", rank=4, dropout=0.5, dropout_position="rank"))
        perturb(aurora)
        aurora.share_input_projections = share
        calls = []
        for layer in aurora.layers.values():
            original = layer.input_projection
            layer.input_projection = lambda inputs, original=original: calls.append(1) or original(inputs)
        aurora.train()
        torch.manual_seed(0)
        score = itm(aurora, batch, images)
        score.logsumexp(-1).sum().backward()
        results.append((score.detach(), {n: p.grad.clone() for n, p in aurora.named_parameters()
                                         if p.grad is not None}, len(calls)))
        aurora.eval()
        torch.manual_seed(1)
        evaluated = itm(aurora, batch, images)
        aurora.aurora_dropout.p = 0.0
        torch.testing.assert_close(itm(aurora, batch, images), evaluated, rtol=0, atol=0)  # off in eval
    (shared, shared_grads, shared_calls), (plain, plain_grads, plain_calls) = results
    torch.testing.assert_close(shared, plain, rtol=1e-6, atol=1e-6)
    for name, grad in shared_grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    assert (plain_calls, shared_calls) == (8, 5)


@pytest.mark.slow
def test_blip_base_inference_exports_meet_the_size_budget(tmp_path):
    """The default retrieval adapter (cross-attention R=64, ICE/GQT, heads) stored in fp16 fits 1.3 MB, and
    the factors alone 0.25 MB (BLIP-base, random weights; the size depends on shapes only)."""
    aurora = get_aurora_model(build_blip("retrieval", "base"), AuroraConfig.from_preset("cross-attention", rank=64))
    aurora.save_pretrained(tmp_path / "fp32")
    aurora.save_pretrained(tmp_path / "fp16", dtype=torch.float16)
    size = {name: (tmp_path / name / "adapter_model.safetensors").stat().st_size for name in ("fp32", "fp16")}
    assert size["fp16"] <= 1.3e6 < size["fp32"]
    factors = AuroraConfig.from_preset("cross-attention", rank=64, ice=False, gqt=False, modules_to_save=[])
    aurora.unload()
    only = get_aurora_model(build_blip("retrieval", "base"), factors)
    only.save_pretrained(tmp_path / "factors", dtype=torch.float16)
    assert (tmp_path / "factors" / "adapter_model.safetensors").stat().st_size <= 0.25e6
