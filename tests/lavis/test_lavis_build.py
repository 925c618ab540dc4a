"""Offline construction of LAVIS BLIP models and checkpoint loading (aurora_pet.families.lavis.build)."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file, save_model
from transformers import BertTokenizer

from aurora_pet.families.lavis import FAMILY
from aurora_pet.families.lavis.build import (
    ARCHITECTURES, DEFAULT_VOCAB, CheckpointError, blip_tokenizer, build_blip, load_checkpoint,
)
from lavis.models.blip_models.blip_retrieval import BlipRetrieval
from lavis.models.blip_models.blip_vqa import BlipVQA


@pytest.fixture(scope="module", autouse=True)
def offline():
    """Every build in this module runs with the network refused, hub downloads included."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args} {kwargs}")

    original = BertTokenizer.from_pretrained.__func__

    def local_only(cls, name, *args, **kwargs):
        if not Path(name).exists():
            raise AssertionError(f"tokenizer download attempted: {name}")
        return original(cls, name, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        mp.setattr(torch.hub, "load_state_dict_from_url", refuse)
        mp.setattr(BertTokenizer, "from_pretrained", classmethod(local_only))
        yield


def tiny(arch: str = "blip_retrieval", seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return build_blip(arch, ARCHITECTURES[arch][0], size="tiny", **kwargs)


def retrieval_samples(batch: int = 4, image_size: int = 32) -> dict:
    captions = ["a red circle on the left", "two blue squares", "a small green star", "a big yellow triangle"]
    return {"image": torch.randn(batch, 3, image_size, image_size), "text_input": captions[:batch],
            "image_id": torch.arange(batch), "epoch": 0, "iters": 0, "num_iters_per_epoch": 10}


# --- offline guarantees -------------------------------------------------------------------------------

def test_network_guard_is_active():
    with pytest.raises(AssertionError, match="download attempted"):
        BertTokenizer.from_pretrained("bert-base-uncased")


def test_import_aurora_pet_does_not_import_lavis():
    code = "import sys, aurora_pet; assert 'lavis' not in sys.modules, 'lavis imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_tokenizer_matches_lavis_layout():
    tokenizer = blip_tokenizer()
    words = len(DEFAULT_VOCAB.read_text().split())
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.enc_token_id) == (0, words, words + 1)
    assert len(tokenizer) == words + 2
    ids = tokenizer("How many purple hexagons are there? Zebra-like 42!").input_ids
    assert tokenizer.unk_token_id not in ids and ids[0] == tokenizer.cls_token_id


def test_vocabulary_covers_synthetic_data_as_whole_words():
    data = pytest.importorskip("aurora_pet.data")
    tokenizer = blip_tokenizer()
    assert {word: tokenizer.tokenize(word) for word in data.vocabulary()} == {w: [w] for w in data.vocabulary()}


# --- tiny models: LAVIS's own training and inference paths --------------------------------------------

def test_tiny_retrieval_training_step():
    model = tiny()
    assert type(model) is BlipRetrieval and "init_tokenizer" not in vars(model)
    output = model(retrieval_samples())
    assert torch.isfinite(output.loss) and torch.isfinite(output.loss_itm)
    output.loss.backward()
    for name in ("text_encoder.encoder.layer.1.crossattention.self.query.weight",
                 "visual_encoder.blocks.0.attn.qkv.weight", "itm_head.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert not any(p.requires_grad for p in model.text_encoder_m.parameters())
    assert int(model.queue_ptr) == 4


def test_tiny_retrieval_config():
    model = tiny()
    assert model.visual_encoder.pos_embed.shape == (1, 17, 64)  # 32x32 image, 8x8 patches, + cls
    assert len(model.text_encoder.encoder.layer) == 2 and model.queue_size == 16
    assert model.text_encoder.config.vocab_size == len(model.tokenizer)
    assert model.get_submodule("text_encoder.encoder.layer.0.crossattention.self.key").in_features == 64


def test_overrides_and_image_size():
    model = tiny(image_size=64, queue_size=8, num_hidden_layers=1, alpha=0.1)
    assert model.visual_encoder.pos_embed.shape == (1, 65, 64)
    assert (model.queue_size, len(model.text_encoder.encoder.layer), model.alpha) == (8, 1, 0.1)
    assert torch.isfinite(model(retrieval_samples(image_size=64)).loss)


def test_tiny_vqa_loss_and_predictions():
    model = tiny("blip_vqa")
    assert type(model) is BlipVQA
    samples = {"image": torch.randn(2, 3, 32, 32), "text_input": ["what color is the circle?", "how many stars?"],
               "answer": ["red", "blue", "two"], "weight": torch.tensor([0.5, 0.5, 1.0]),
               "n_answers": torch.tensor([2, 1])}
    output = model(samples)
    assert torch.isfinite(output.loss)
    output.loss.backward()
    assert model.get_parameter("text_decoder.bert.encoder.layer.0.crossattention.self.query.weight").grad is not None

    model.eval()
    questions = {"image": torch.randn(2, 3, 32, 32), "text_input": ["what color is it?", "how many?"]}
    answer_list = ["red", "blue", "two", "yes"]
    with torch.no_grad():
        ranked = model.predict_answers(dict(questions), inference_method="rank", answer_list=answer_list)
        generated = model.predict_answers(dict(questions), inference_method="generate", max_len=5)
    assert len(ranked) == 2 and set(ranked) <= set(answer_list)
    assert len(generated) == 2 and all(isinstance(answer, str) for answer in generated)


def test_momentum_pairs():
    model = tiny()
    pairs = FAMILY.momentum_pairs(model)
    assert pairs == [("visual_encoder", "visual_encoder_m"), ("text_encoder", "text_encoder_m"),
                     ("vision_proj", "vision_proj_m"), ("text_proj", "text_proj_m")]
    for online, momentum in pairs:
        shapes = [p.shape for p in model.get_submodule(online).parameters()]
        assert shapes == [p.shape for p in model.get_submodule(momentum).parameters()]
    wrapper = torch.nn.ModuleDict({"base": model})
    assert FAMILY.momentum_pairs(wrapper)[0] == ("base.visual_encoder", "base.visual_encoder_m")
    assert FAMILY.momentum_pairs(tiny("blip_vqa")) == []


# --- the real BLIP-base architecture ------------------------------------------------------------------

def vit_parameters(d=768, depth=12, mlp=4, patch=16, image=384):
    block = 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d + (d * mlp * d + mlp * d) + (mlp * d * d + d)
    patches = (image // patch) ** 2
    return (3 * patch * patch * d + d) + d + (patches + 1) * d + depth * block + 2 * d


def bert_parameters(h=768, layers=12, inter=3072, vocab=30524, positions=512, encoder_width=768):
    def attention(kv_width):
        return (h * h + h) + 2 * (kv_width * h + h) + (h * h + h) + 2 * h
    layer = attention(h) + attention(encoder_width) + (h * inter + inter) + (inter * h + h) + 2 * h
    return vocab * h + positions * h + 2 * h + layers * layer


@pytest.fixture(scope="module")
def base_retrieval():
    torch.manual_seed(0)
    return build_blip("blip_retrieval", "flickr")


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_base_retrieval_parameter_count(base_retrieval):
    model = base_retrieval
    vit, bert = vit_parameters(), bert_parameters()
    projection = 768 * 256 + 256
    assert (vit, bert) == (86_090_496, 137_258_496)
    assert count(model.visual_encoder) == count(model.visual_encoder_m) == vit
    assert count(model.text_encoder) == count(model.text_encoder_m) == bert
    assert count(model.vision_proj) == count(model.text_proj) == projection
    assert count(model.itm_head) == 768 * 2 + 2
    assert count(model) == 2 * (vit + bert + 2 * projection) + (768 * 2 + 2) + 1 == 447_486_979  # + temp


def test_base_retrieval_module_shapes(base_retrieval):
    model = base_retrieval
    for kind in ("query", "key", "value"):
        weight = model.get_parameter(f"text_encoder.encoder.layer.11.crossattention.self.{kind}.weight")
        assert weight.shape == (768, 768)
    assert model.get_parameter("text_encoder.encoder.layer.11.crossattention.output.dense.weight").shape == (768, 768)
    assert model.get_parameter("visual_encoder.blocks.0.attn.qkv.weight").shape == (2304, 768)
    assert model.get_parameter("visual_encoder.blocks.11.mlp.fc1.weight").shape == (3072, 768)
    assert model.visual_encoder.pos_embed.shape == (1, 577, 768)  # 384 / 16 = 24 patches a side
    # The embedding keeps BERT's 30524 rows even though the shipped vocabulary is small.
    assert model.get_parameter("text_encoder.embeddings.word_embeddings.weight").shape == (30524, 768)
    assert len(model.tokenizer) < 30524 and model.queue_size == 57600


# --- checkpoints --------------------------------------------------------------------------------------

def save(state: dict, path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def assert_same_weights(a, b):
    b_state = b.state_dict()
    for key, value in a.state_dict().items():
        assert torch.equal(value, b_state[key]), key


@pytest.mark.parametrize("layout", ["state_dict.pth", "lavis.pth", "weights.safetensors"])
def test_checkpoint_round_trip(tmp_path, layout):
    source, target = tiny(seed=1), tiny(seed=2)
    state = source.state_dict()
    path = save({"model": state, "epoch": 3} if layout == "lavis.pth" else state, tmp_path / layout)
    report = load_checkpoint(target, path)
    assert report.clean and (report.missing, report.unexpected, report.mismatched) == ([], [], [])
    assert_same_weights(source, target)


def test_tied_weights_saved_once_are_not_missing(tmp_path):
    source, target = tiny("blip_vqa", seed=1), tiny("blip_vqa", seed=2)
    path = tmp_path / "vqa.safetensors"
    save_model(source, str(path))  # stores one name per tied tensor (decoder weight and bias)
    assert load_checkpoint(target, path).clean
    assert_same_weights(source, target)


def test_build_with_checkpoint_resets_queue(tmp_path):
    source = tiny(seed=1)
    source(retrieval_samples())
    assert int(source.queue_ptr) == 4
    model = tiny(seed=2, checkpoint=save(source.state_dict(), tmp_path / "model.pth"))
    assert torch.equal(model.itm_head.weight, source.itm_head.weight) and int(model.queue_ptr) == 0


def test_renamed_key_is_reported(tmp_path, caplog):
    source, target = tiny(seed=1), tiny(seed=2)
    state = source.state_dict()
    state["itm_head.renamed"] = state.pop("itm_head.weight")
    path = save(state, tmp_path / "renamed.pth")
    before = target.itm_head.weight.clone()

    with pytest.raises(CheckpointError) as error:
        load_checkpoint(target, path)
    message = str(error.value)
    assert "renamed.pth" in message and "itm_head.weight" in message and "itm_head.renamed" in message
    assert torch.equal(target.itm_head.weight, before)  # strict refusal leaves the model untouched

    with caplog.at_level(logging.WARNING):
        report = load_checkpoint(target, path, strict=False)
    assert (report.missing, report.unexpected) == (["itm_head.weight"], ["itm_head.renamed"])
    assert "itm_head.weight" in caplog.text
    assert torch.equal(target.itm_head.bias, source.itm_head.bias)


def test_shape_mismatch_is_reported(tmp_path):
    state = tiny(seed=1).state_dict()
    state["itm_head.weight"] = torch.zeros(3, 64)
    state.update({f"extra.{i}": torch.zeros(1) for i in range(12)})
    path = save(state, tmp_path / "mismatch.pth")
    with pytest.raises(CheckpointError, match=r"12 unexpected key\(s\).*and 2 more.*1 shape-mismatched"):
        load_checkpoint(tiny(), path)
    report = load_checkpoint(tiny(), path, strict=False)
    assert report.mismatched == ["itm_head.weight"] and report.missing == []


def test_position_embeddings_are_interpolated(tmp_path):
    path = save(tiny(seed=1).state_dict(), tmp_path / "small.pth")
    model = tiny(image_size=64)
    report = load_checkpoint(model, path)
    assert report.clean and report.interpolated == ["visual_encoder.pos_embed", "visual_encoder_m.pos_embed"]
    assert model.visual_encoder.pos_embed.shape == (1, 65, 64)


def test_missing_and_corrupt_checkpoints(tmp_path):
    model = tiny()
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_checkpoint(model, missing)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        tiny(checkpoint=missing)
    for name in ("corrupt.pth", "corrupt.safetensors"):
        (tmp_path / name).write_bytes(b"not a checkpoint at all")
        with pytest.raises(CheckpointError, match=name):
            load_checkpoint(model, tmp_path / name)
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="list.pth.*no state dict"):
        load_checkpoint(model, tmp_path / "list.pth")


# --- argument errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "kwargs", "pattern"), [
    (("blip_caption", "coco"), {}, r"'blip_caption'.*blip_retrieval.*blip_vqa"),
    (("blip_retrieval", "vqav2"), {}, r"'vqav2'.*coco.*flickr"),
    (("blip_vqa", "coco"), {}, r"'coco'.*vqav2"),
    (("blip_vqa", "vqav2"), {"size": "huge"}, r"'huge'.*base.*tiny"),
    (("blip_vqa", "vqav2"), {"size": "tiny", "queue_size": 8}, r"'queue_size'.*valid"),
    (("blip_retrieval", "coco"), {"size": "tiny", "encoder_width": 8}, r"'encoder_width'"),
])
def test_invalid_arguments(args, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        build_blip(*args, **kwargs)


def test_vocab_larger_than_embedding_is_refused():
    with pytest.raises(ValueError, match="vocab_size=10"):
        tiny(vocab_size=10)
    assert tiny(vocab_size=400).text_encoder.config.vocab_size == 400
