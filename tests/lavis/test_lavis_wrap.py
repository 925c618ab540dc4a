"""Aurora inside LAVIS BLIP (`wrap_blip`): LAVIS's own forward passes, momentum, ICE/GQT sites, generation,
adapter files. Tiny models throughout (`build_blip(..., size="tiny")`), random weights, no download."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from aurora_pet import AdapterFileError, AuroraConfigError, AuroraModel, TargetError
from aurora_pet.families.lavis import FAMILY
from aurora_pet.families.lavis.build import ARCHITECTURES, build_blip
from aurora_pet.families.lavis.wrap import load_blip_adapter, wrap_blip

momentum_pairs = FAMILY.momentum_pairs

PRESETS = ["cross-attention", "text-attention", "reference"]
HEADS = {"blip_retrieval": ("itm_head", "vision_proj", "text_proj"), "blip_vqa": ()}
CAPTIONS = ["a red circle on the left", "two blue squares", "a small green star", "a big yellow triangle"]
QUESTIONS = ["what color is the circle on the left?", "how many?"]
ANSWERS = ["red", "blue", "two", "yes", "a green star"]


def tiny(arch: str = "blip_retrieval", seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return build_blip(arch, ARCHITECTURES[arch][0], size="tiny", **kwargs)


def images(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def retrieval_samples(batch: int = 4, seed: int = 0) -> dict:
    """A batch that divides the tiny queue (16), with one caption per image and distinct image ids."""
    return {"image": images(batch, seed), "text_input": CAPTIONS[:batch], "image_id": torch.arange(batch) + 10 * seed,
            "epoch": 0, "iters": 0, "num_iters_per_epoch": 10}


def vqa_samples() -> dict:
    return {"image": images(2), "text_input": list(QUESTIONS), "answer": ["red", "blue", "two"],
            "weight": torch.tensor([0.5, 0.5, 1.0]), "n_answers": torch.tensor([2, 1])}


def perturb(aurora: AuroraModel, scale: float = 0.3) -> None:
    """Random non-zero factors and ICE/GQT parameters: a stand-in for a trained adapter."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in list(aurora.aurora_factors.parameters()) + list(aurora.aurora_fusion.parameters()):
            parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))


def trainable(aurora: AuroraModel) -> dict[str, nn.Parameter]:
    return {name: p for name, p in aurora.named_parameters() if p.requires_grad}


def expected_trainable(aurora: AuroraModel, arch: str) -> set[str]:
    heads = tuple(f"base_model.{head}." for head in HEADS[arch])
    return {n for n, _ in aurora.named_parameters() if n.startswith(("aurora_adapters.default.factors.", "aurora_adapters.default.fusion.") + heads)}


# --- training through LAVIS's own forward -------------------------------------------------------------

def assert_one_step_reaches_exactly_the_trainable_set(aurora: AuroraModel, arch: str, loss: torch.Tensor) -> None:
    """What DDP without find_unused_parameters needs: every trainable parameter takes part in the step,
    and nothing else is trained."""
    loss.backward()
    params = trainable(aurora)
    assert set(params) == expected_trainable(aurora, arch)
    unused = sorted(n for n, p in params.items() if p.grad is None)
    assert not unused, f"trainable parameters without a gradient: {unused}"
    assert all(torch.isfinite(p.grad).all() for p in params.values())
    assert aurora.aurora_factors.V.grad.abs().sum() > 0  # the step moves the adapter (ΔW = 0 only at init)
    assert not [n for n, p in aurora.named_parameters() if not p.requires_grad and p.grad is not None]


@pytest.mark.parametrize("preset", PRESETS)
def test_retrieval_step_trains_exactly_the_adapter(preset):
    aurora = wrap_blip(tiny(), preset)
    assert aurora.aurora_config.ice and aurora.aurora_config.gqt
    output = aurora(retrieval_samples())
    assert torch.isfinite(output.loss_itc) and torch.isfinite(output.loss_itm)
    assert_one_step_reaches_exactly_the_trainable_set(aurora, "blip_retrieval", output.loss)
    assert int(aurora.queue_ptr) == 4


@pytest.mark.parametrize("preset", PRESETS)
def test_vqa_step_trains_exactly_the_adapter(preset):
    aurora = wrap_blip(tiny("blip_vqa"), preset)
    output = aurora(vqa_samples())
    assert torch.isfinite(output.loss)
    assert_one_step_reaches_exactly_the_trainable_set(aurora, "blip_vqa", output.loss)


def test_vit_activation_checkpointing_keeps_adapter_gradients():
    """LAVIS's retrieval yaml checkpoints ViT blocks (fairscale, reentrant), which used to cut the
    gradient to every target inside them. With it on or off, the factors must get the same gradient."""
    grads = {}
    for checkpointing in (True, False):
        aurora = wrap_blip(tiny(vit_grad_ckpt=checkpointing), "reference", dropout=0.0)
        perturb(aurora)
        torch.manual_seed(1)  # ITM negative sampling
        aurora(retrieval_samples()).loss.backward()
        grads[checkpointing] = {n: p.grad for n, p in trainable(aurora).items()}
    assert grads[True].keys() == grads[False].keys()
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, msg=name)


def test_vit_only_targets_learn_under_checkpointing():
    aurora = wrap_blip(tiny(), "reference", target_modules=r"visual_encoder\.blocks\.\d+\.attn\.qkv", ice=False,
                       gqt=False)
    aurora(retrieval_samples()).loss.backward()
    grad = aurora.aurora_factors.V.grad
    assert grad is not None and grad.abs().sum() > 0


# --- identity at initialisation -----------------------------------------------------------------------

@pytest.mark.parametrize("preset", PRESETS)
def test_retrieval_outputs_equal_base_at_initialisation(preset):
    # Without ViT checkpointing: fairscale's wrapper holds a weak reference that deepcopy shares, so a
    # deepcopy of a checkpointed model would run the original's modules. Checkpointing is compared with
    # itself off in test_vit_activation_checkpointing_keeps_adapter_gradients.
    base = tiny(vit_grad_ckpt=False)
    reference = copy.deepcopy(base)
    aurora = wrap_blip(base, preset)
    outputs = []
    for model in (aurora, reference):
        model.eval()
        torch.manual_seed(3)  # the forward samples ITM negatives
        outputs.append(model(retrieval_samples()))
    ours, theirs = outputs
    for name in ("loss_itc", "loss_itm"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), rtol=0, atol=0)
    for name in ("sim_i2t", "sim_t2i", "sim_i2t_m", "sim_t2i_m"):
        torch.testing.assert_close(getattr(ours.sims, name), getattr(theirs.sims, name), rtol=0, atol=0)
    torch.testing.assert_close(ours.intermediate_output.itm_logits, theirs.intermediate_output.itm_logits,
                               rtol=0, atol=0)
    for buffer in ("image_queue", "text_queue", "idx_queue", "queue_ptr"):
        assert torch.equal(getattr(aurora, buffer), getattr(reference, buffer)), buffer


def vqa_predictions(model: nn.Module) -> tuple[list[str], list[str]]:
    questions = {"image": images(2, seed=5), "text_input": list(QUESTIONS)}
    with torch.no_grad():
        ranked = model.predict_answers(dict(questions), inference_method="rank", answer_list=ANSWERS)
        generated = model.predict_answers(dict(questions), inference_method="generate", max_len=6)
    return ranked, generated


def answer_score(model: nn.Module, image: torch.Tensor, question: str, answer: str) -> float:
    """LAVIS's ranking score (−label-smoothed NLL of the answer) from one teacher-forced pass over one
    question and one answer, so no padding and no tiling are involved."""
    samples = {"image": image[None], "text_input": [question]}
    question_states = model.forward_encoder(samples)[0].last_hidden_state
    ids = model.tokenizer([answer], return_tensors="pt").input_ids
    ids[:, 0] = model.tokenizer.bos_token_id
    output = model.text_decoder(ids, attention_mask=torch.ones_like(ids), encoder_hidden_states=question_states,
                                encoder_attention_mask=samples["tokenized_text"].attention_mask, labels=ids,
                                return_dict=True, reduction="none")
    return -output.loss.item()


@pytest.mark.parametrize("preset", PRESETS)
def test_vqa_outputs_equal_base_at_initialisation(preset):
    base = tiny("blip_vqa")
    reference = copy.deepcopy(base)
    aurora = wrap_blip(base, preset).eval()
    reference.eval()
    ours, theirs = aurora(vqa_samples()), reference(vqa_samples())
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=0, atol=0)
    torch.testing.assert_close(ours.intermediate_output.decoder_output.logits,
                               theirs.intermediate_output.decoder_output.logits, rtol=0, atol=0)
    assert vqa_predictions(aurora) == vqa_predictions(reference)
    image = images(1, seed=5)[0]
    with torch.no_grad():
        scores = [[answer_score(model, image, QUESTIONS[0], answer) for answer in ANSWERS] for model in (aurora, reference)]
    assert scores[0] == scores[1]


# --- VQA inference with ICE on ------------------------------------------------------------------------

def greedy_answers(model: nn.Module, image: torch.Tensor, questions: list[str], max_len: int) -> list[str]:
    """Greedy decoding by re-running the whole prefix every step, with the inputs LAVIS gives `generate`."""
    question_states = model.forward_encoder({"image": image, "text_input": list(questions)})[0].last_hidden_state
    ids = torch.full((len(questions), 1), model.tokenizer.bos_token_id)
    for _ in range(max_len - 1):
        logits = model.text_decoder(ids, encoder_hidden_states=question_states,
                                    encoder_attention_mask=torch.ones(question_states.shape[:-1], dtype=torch.long),
                                    return_dict=True).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    answers = []
    for row in ids.tolist():
        end = row.index(model.tokenizer.sep_token_id) if model.tokenizer.sep_token_id in row else len(row)
        answers.append(model.tokenizer.decode(row[:end], skip_special_tokens=True))
    return answers


@pytest.fixture
def trained_vqa():
    aurora = wrap_blip(tiny("blip_vqa", seed=4), "cross-attention")
    perturb(aurora)
    return aurora.eval()


def test_vqa_loss_with_ice_trains(trained_vqa):
    trained_vqa.train()
    assert_one_step_reaches_exactly_the_trainable_set(trained_vqa, "blip_vqa", trained_vqa(vqa_samples()).loss)


def test_vqa_rank_matches_teacher_forcing_with_ice(trained_vqa):
    image = images(2, seed=5)
    with torch.no_grad():
        ranked = trained_vqa.predict_answers({"image": image, "text_input": list(QUESTIONS)},
                                             inference_method="rank", answer_list=ANSWERS)
        with trained_vqa.disable_adapter():
            base_ranked = trained_vqa.predict_answers({"image": image, "text_input": list(QUESTIONS)},
                                                      inference_method="rank", answer_list=ANSWERS)
        scores = [[answer_score(trained_vqa, image[b], q, a) for a in ANSWERS] for b, q in enumerate(QUESTIONS)]
    assert ranked == [ANSWERS[max(range(len(ANSWERS)), key=row.__getitem__)] for row in scores]
    assert ranked != base_ranked  # the perturbed adapter changes the answers, so the check above has teeth


def test_vqa_generate_with_ice_recomputes_the_prefix(trained_vqa):
    """ICE attends over every earlier token of the layer, so wrap_blip turns the decoder cache off;
    transformers 4.26's generate must honour that (it reads config.use_cache in LAVIS's decoder)."""
    decoder = trained_vqa.text_decoder
    assert decoder.config.use_cache is False and decoder.generation_config.use_cache is False
    calls = []
    handle = decoder.register_forward_hook(
        lambda module, args, kwargs, output: calls.append((kwargs["input_ids"].shape[1], output.past_key_values)),
        with_kwargs=True)
    image = images(2, seed=5)
    questions = {"image": image, "text_input": list(QUESTIONS)}
    try:
        with torch.no_grad():
            generated = trained_vqa.predict_answers(dict(questions), inference_method="generate", num_beams=1, max_len=6)
    finally:
        handle.remove()
    assert [length for length, _ in calls] == list(range(1, len(calls) + 1))  # the whole prefix each step
    assert all(cache is None for _, cache in calls)
    with torch.no_grad():
        assert generated == greedy_answers(trained_vqa, image, QUESTIONS, max_len=6)
        beams = trained_vqa.predict_answers(dict(questions), inference_method="generate", num_beams=3, max_len=6)
    assert len(beams) == 2 and all(isinstance(answer, str) for answer in beams)


def test_decoder_cache_stays_on_without_ice():
    aurora = wrap_blip(tiny("blip_vqa"), "cross-attention", ice=False)
    assert aurora.text_decoder.config.use_cache is True


# --- momentum encoders --------------------------------------------------------------------------------

def test_momentum_update_moves_factors_and_base_copies_by_the_ema():
    aurora = wrap_blip(tiny(), "text-attention")
    twins = {name.replace("text_encoder.", "text_encoder_m.", 1) for name in aurora.layers}
    assert set(aurora.momentum_layers) == twins and len(twins) == 2 * 8  # 2 layers × (self + cross) × q, k, v, o
    pairs = [(aurora.get_submodule(online), aurora.get_submodule(tracking)) for online, tracking in momentum_pairs(aurora)]
    with torch.no_grad():  # let every momentum copy differ from its online encoder, so the EMA is visible
        for _, tracking in pairs:
            for parameter in tracking.parameters():
                parameter.add_(0.01 * torch.randn_like(parameter))
    optimizer = torch.optim.AdamW(trainable(aurora).values(), lr=1e-2)
    for step in range(2):  # V moves at the first step, U, P, λ from the second
        optimizer.zero_grad()
        aurora(retrieval_samples(seed=step)).loss.backward()
        optimizer.step()

    m = aurora.momentum
    online = {k: v.clone() for k, v in aurora.aurora_factors.state_dict().items()}
    tracked = {k: v.clone() for k, v in aurora.aurora_factors_m.state_dict().items()}
    base = [[(p.clone(), p_m.clone()) for p, p_m in zip(a.parameters(), b.parameters())] for a, b in pairs]
    with torch.no_grad():
        aurora(retrieval_samples(seed=2))  # LAVIS's forward runs _momentum_update

    for key, value in aurora.aurora_factors_m.state_dict().items():
        torch.testing.assert_close(value, m * tracked[key] + (1 - m) * online[key], msg=key)
        assert not torch.equal(value, tracked[key]), key
    for (_, tracking), before in zip(pairs, base):
        for p_m, (p, p_m_before) in zip(tracking.parameters(), before):
            torch.testing.assert_close(p_m, m * p_m_before + (1 - m) * p)
    assert not torch.equal(aurora.vision_proj_m.weight, base[2][0][1])  # follows the trained head

    text = aurora.tokenizer(CAPTIONS, padding="longest", return_tensors="pt")
    with torch.no_grad():
        adapted = aurora.text_encoder_m.forward_text(text).last_hidden_state
        with aurora.disable_adapter():
            plain = aurora.text_encoder_m.forward_text(text).last_hidden_state
    assert not torch.allclose(adapted, plain)  # the momentum encoder runs the EMA adapter


def test_momentum_layers_follow_vit_targets():
    aurora = wrap_blip(tiny(), "reference")
    assert any(name.startswith("visual_encoder_m.blocks.") for name in aurora.momentum_layers)
    assert all(not name.startswith(("visual_encoder_m", "text_encoder_m")) for name in aurora.layers)


def test_base_parameter_names_and_momentum_zip_are_unchanged():
    base = tiny()
    names = [n for n, _ in base.named_parameters()]
    wrap_blip(base, "reference")
    assert [n for n, _ in base.named_parameters()] == names
    for online, tracking in momentum_pairs(base):
        assert [n for n, _ in base.get_submodule(online).named_parameters()] == \
               [n for n, _ in base.get_submodule(tracking).named_parameters()]


# --- where ICE and GQT sit ----------------------------------------------------------------------------

def hooked_modules(aurora: AuroraModel) -> list[str]:
    return [name for name, module in aurora.base_model.named_modules() if module._forward_hooks]


@pytest.mark.parametrize(("arch", "stacks"), [
    ("blip_retrieval", ["text_encoder.encoder"]),
    ("blip_vqa", ["text_encoder.encoder", "text_decoder.bert.encoder"]),
])
@pytest.mark.parametrize("preset", PRESETS)
def test_fusion_sites_are_the_online_cross_attention(arch, stacks, preset):
    aurora = wrap_blip(tiny(arch), preset)
    sites = [f"{stack}.layer.{i}.crossattention" for stack in stacks for i in range(2)]
    assert aurora.fusion_sites == sites
    assert hooked_modules(aurora) == sites
    assert len(aurora.aurora_fusion) == len(sites)


# --- errors -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("arch", "config", "error", "pattern"), [
    ("blip_retrieval", "blip_vqa/cross-attention", TargetError, r"'blip_vqa/cross-attention' is for LAVIS blip_vqa models.*use blip_retrieval/cross-attention"),
    ("blip_vqa", "blip_retrieval/reference", TargetError, r"is for LAVIS blip_retrieval models.*BlipVQA"),
    ("blip_vqa", "cross-atention", AuroraConfigError, r"unknown preset 'blip_vqa/cross-atention'.*did you mean 'blip_vqa/cross-attention'"),
])
def test_wrong_preset_is_refused(arch, config, error, pattern):
    with pytest.raises(error, match=pattern):
        wrap_blip(tiny(arch), config)


def test_non_blip_model_is_refused():
    with pytest.raises(TargetError, match=r"expected a LAVIS BlipRetrieval or BlipVQA model, got Sequential"):
        wrap_blip(nn.Sequential(nn.Linear(4, 4)))


def test_targets_matching_nothing_are_refused():
    with pytest.raises(TargetError, match=r"target_modules '.*nothing' matched no nn.Linear module.*Closest names"):
        wrap_blip(tiny(), "cross-attention", target_modules=r"text_encoder\.nothing")


# --- adapter files ------------------------------------------------------------------------------------

def test_save_and_load_round_trip(tmp_path):
    aurora = wrap_blip(tiny(seed=1), "text-attention")
    perturb(aurora)
    aurora.momentum_update()
    aurora.save_pretrained(tmp_path)

    loaded = load_blip_adapter(tiny(seed=1), tmp_path)
    saved = {key: value.clone() for key, value in aurora.adapter_state_dict().items()}  # forwards move the EMA
    assert loaded.adapter_state_dict().keys() == saved.keys() and any(k.startswith("factors_m.") for k in saved)
    for key, value in loaded.adapter_state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert loaded.aurora_config == aurora.aurora_config and set(loaded.momentum_layers) == set(aurora.momentum_layers)
    outputs = []
    for model in (aurora.eval(), loaded.eval()):
        torch.manual_seed(3)
        outputs.append(model(retrieval_samples()).loss)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)  # the momentum update chain included

    # the documented core call loads the same adapter, momentum factors included (the family supplies the pairs)
    core = AuroraModel.from_pretrained(tiny(seed=1), tmp_path)
    assert all(torch.equal(value, saved[key]) for key, value in core.adapter_state_dict().items())


# --- unwrapping ---------------------------------------------------------------------------------------

def _attributes(model: nn.Module) -> dict[tuple[str, str], object]:
    """Every instance attribute of every module, and of the text configs, by (owner, name): the objects
    themselves, so that a replaced function, flag or config shows up even when it compares equal."""
    owners = {name: module for name, module in model.named_modules()}
    for name, module in list(owners.items()):
        for attr in ("config", "generation_config"):
            if getattr(module, attr, None) is not None:
                owners[f"{name}.{attr}"] = getattr(module, attr)
    return {(owner, key): value for owner, obj in owners.items() for key, value in vars(obj).items()
            if key not in ("_parameters", "_buffers", "_modules", "training")}


@pytest.mark.parametrize(("arch", "preset"), [("blip_retrieval", "reference"), ("blip_vqa", "cross-attention")])
@pytest.mark.parametrize("how", ["unload", "merge_and_unload"])
def test_unwrapping_restores_every_attribute_wrap_blip_changed(arch, preset, how):
    """The chained `_momentum_update`, the decoder's `use_cache`, the non-reentrant ViT checkpointing: after
    `unload()` every attribute is the very object LAVIS built (or absent again), and wrapping again behaves
    like one wrap (one EMA step per forward, not two)."""
    model = tiny(arch, vit_grad_ckpt=True, vit_ckpt_layer=2) if arch == "blip_retrieval" else tiny(arch)
    before = _attributes(model)
    aurora = wrap_blip(model, preset, ice=True, gqt=True)
    changed = {key for key, value in _attributes(model).items() if before.get(key, object()) is not value}
    assert any(key[1] == "forward" for key in changed) or arch == "blip_vqa"  # the patches were there
    if how == "merge_and_unload":
        aurora = wrap_blip(aurora.unload(), preset, ice=False, gqt=False)
    getattr(aurora, how)()
    after = _attributes(model)
    assert after.keys() == before.keys()
    assert [key for key in before if after[key] is not before[key]] == []
    assert not any(type(m).__name__ == "AuroraLinear" for m in model.modules())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())

    if arch == "blip_retrieval":  # wrap → unload → wrap: one EMA of the factors per step
        again = wrap_blip(model, preset)
        perturb(again)
        tracked = {k: v.clone() for k, v in again.aurora_factors_m.state_dict().items()}
        online = {k: v.clone() for k, v in again.aurora_factors.state_dict().items()}
        with torch.no_grad():
            again(retrieval_samples())
        m = again.momentum
        for key, value in again.aurora_factors_m.state_dict().items():
            torch.testing.assert_close(value, m * tracked[key] + (1 - m) * online[key], msg=key)
