"""Build Salesforce LAVIS BLIP models (retrieval, VQA) offline, and load local checkpoints with a report.

Why this exists: in LAVIS 1.0.2 every BLIP model downloads twice while it is being built —
``BlipBase.init_tokenizer`` fetches ``bert-base-uncased`` from the Hugging Face hub and ``from_config``
always loads a checkpoint from a URL (then with ``strict=False``, so keys that fail to load go unnoticed).
Here the models are assembled from LAVIS's own classes (``VisionTransformerEncoder``, ``XBertEncoder``,
``XBertLMHeadDecoder``, ``BlipRetrieval``, ``BlipVQA``) with random weights, and checkpoints are loaded
from local files with every missing, unexpected or mis-shaped key reported.

Sizes. ``"base"`` is BLIP-base exactly as LAVIS's yaml (``configs/models/blip_*.yaml``) and
``med_config.json`` describe it: ViT-B/16 (768 wide, 12 blocks, 12 heads) and a 12-layer BERT-base with
cross-attention and a 30524-token embedding. ``"tiny"`` keeps the classes, module names and yaml flags
but shrinks every width (see ``_TINY``) so a training step takes milliseconds on a CPU.

Tokenizer. Instead of the hub download, a WordPiece ``BertTokenizer`` is built from a vocabulary file
shipped in the package (``aurora_pet/assets/blip_vocab.txt``, package data: the five BERT special tokens with
``[PAD]`` first so its id 0 matches med_config's ``pad_token_id``, ASCII punctuation, digits, letters,
``##`` continuations of letters and digits, then whole words of the demo and test templates — so any
lower-case ASCII text tokenizes without ``[UNK]``). A reviewable text file is simpler than generating one
at run time, since ``BertTokenizer`` reads its vocabulary from a path. As in LAVIS, ``[DEC]`` (bos) and
``[ENC]`` are appended after the file's tokens. The base model's embedding keeps its real 30524 rows so
parameter counts are exact; the small vocabulary only uses the first few hundred rows. Real BLIP weights
index that embedding by bert-base-uncased's token ids, so a base model that gets them (``checkpoint=``,
or ``pretrained_weights=True`` when the caller loads them) never gets the small vocabulary: it uses
``vocab_file=`` or the ``vocab.txt`` of ``bert-base-uncased`` in the Hugging Face cache (where LAVIS's own
tokenizer download leaves it), downloads it only with ``allow_download=True``, and otherwise stops
(``bert_vocab_file``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file as load_safetensors
from torch import nn
from transformers import BertTokenizer

from ...errors import AuroraConfigError, AuroraError

with warnings.catch_warnings():  # LAVIS's import chain raises torch.jit / fairscale deprecation warnings
    warnings.simplefilter("ignore", FutureWarning)
    warnings.simplefilter("ignore", DeprecationWarning)
    from lavis.common.utils import get_abs_path
    from lavis.models.blip_models.blip_retrieval import BlipRetrieval
    from lavis.models.blip_models.blip_vqa import BlipVQA
    from lavis.models.med import BertConfig, XBertEncoder, XBertLMHeadDecoder
    from lavis.models.vit import VisionTransformer, VisionTransformerEncoder, interpolate_pos_embed

__all__ = ["ARCHITECTURES", "BERT_VOCAB_SIZE", "DEFAULT_VOCAB", "SIZES", "CheckpointError", "LoadReport",
           "bert_vocab_file", "blip_tokenizer", "build_blip", "load_checkpoint"]

log = logging.getLogger(__name__)

DEFAULT_VOCAB = Path(__file__).parents[2] / "assets" / "blip_vocab.txt"
BERT_REPO = "bert-base-uncased"
BERT_VOCAB_SIZE = 30522  # tokens in bert-base-uncased's vocab.txt; LAVIS appends [DEC] and [ENC] after them
ARCHITECTURES: dict[str, tuple[str, ...]] = {"blip_retrieval": ("coco", "flickr"), "blip_vqa": ("vqav2",)}
SIZES = ("base", "tiny")
_CLASSES = {"blip_retrieval": BlipRetrieval, "blip_vqa": BlipVQA}

# Constructor defaults of the LAVIS classes; the yaml of the model type overrides them.
_MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "blip_retrieval": {"queue_size": 57600, "alpha": 0.4, "embed_dim": 256, "momentum": 0.995,
                       "negative_all_rank": False, "max_txt_len": 35},
    "blip_vqa": {"max_txt_len": 35},
}
# The ViT geometry LAVIS hard-codes for vit_type "base" (VisionTransformerEncoder.from_config).
_VISION_DEFAULTS = {"image_size": 384, "patch_size": 16, "vision_width": 768, "vision_depth": 12,
                    "vision_heads": 12, "vit_grad_ckpt": False, "vit_ckpt_layer": 0, "vit_drop_path_rate": 0.0}
_TINY = {"image_size": 32, "patch_size": 8, "vision_width": 64, "vision_depth": 2, "vision_heads": 4,
         "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
         "max_position_embeddings": 64, "embed_dim": 32, "queue_size": 16}


class CheckpointError(AuroraError, ValueError):
    """A checkpoint file that cannot be read, or whose keys do not match the model (strict loading)."""


@dataclass
class LoadReport:
    """What loading a checkpoint did: keys the model lacks in the file, keys the model has no place for,
    keys present in both with different shapes (not loaded), and ViT position embeddings resized."""

    path: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    interpolated: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        parts = [f"{len(keys)} {what} key(s): {_first(keys)}" for what, keys in
                 (("missing", self.missing), ("unexpected", self.unexpected),
                  ("shape-mismatched", self.mismatched)) if keys]
        return "; ".join(parts) or "all keys matched"


def _first(keys: list[str], n: int = 10) -> str:
    more = f" ... and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def blip_tokenizer(vocab_file: str | Path | None = None) -> BertTokenizer:
    """LAVIS's BLIP tokenizer (BERT WordPiece + ``[DEC]`` bos + ``[ENC]``) from a local vocabulary file."""
    path = Path(vocab_file) if vocab_file is not None else DEFAULT_VOCAB
    if not path.is_file():
        raise FileNotFoundError(f"vocabulary file not found: {path}")
    # 512 is the limit bert-base-uncased's hub tokenizer config sets; LAVIS relies on it when truncating.
    tokenizer = BertTokenizer(str(path), do_lower_case=True, model_max_length=512)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tokenizer.enc_token_id = tokenizer.additional_special_tokens_ids[0]
    return tokenizer


def bert_vocab_file(vocab_file: str | Path | None = None, *, allow_download: bool = False) -> Path:
    """The ``vocab.txt`` of bert-base-uncased, which real BLIP weights need: ``vocab_file``, else the copy in
    the Hugging Face cache (transformers' own lookup, as LAVIS's ``BertTokenizer.from_pretrained``), else
    a download, only when ``allow_download`` (``HF_HUB_OFFLINE=1`` still forbids it)."""
    if vocab_file is not None:
        return Path(vocab_file)
    from transformers.utils import cached_file

    try:
        with warnings.catch_warnings():  # huggingface_hub's deprecation warnings about transformers' arguments
            warnings.simplefilter("ignore", FutureWarning)
            return Path(cached_file(BERT_REPO, "vocab.txt", local_files_only=not allow_download))
    except (OSError, ValueError) as error:
        where = f"in the Hugging Face cache and cannot be downloaded ({str(error).splitlines()[0]})" \
            if allow_download else "in the Hugging Face cache and downloads are not allowed"
        raise AuroraConfigError(
            f"BLIP-base with pretrained weights needs the vocabulary of {BERT_REPO} (the shipped one only covers "
            f"the demo's words) and it is not {where}. Give the path of its "
            f"vocab.txt ({BERT_VOCAB_SIZE} tokens) as vocab_file (model.vocab_file in a recipe), put it in the cache "
            f"with `huggingface-cli download {BERT_REPO} vocab.txt`, or allow the download with allow_download=True "
            "(model.allow_download: true in a recipe)") from None


def _check_bert_ids(tokenizer: BertTokenizer, vocab_file: Path, vocab_size: int) -> None:
    """Pretrained BLIP-base embeds [DEC] and [ENC] after bert-base-uncased's tokens (LAVIS adds them to that
    tokenizer); a vocabulary of another length would read their rows for other tokens without any error."""
    expected = (vocab_size - 2, vocab_size - 1)
    got = (tokenizer.bos_token_id, tokenizer.enc_token_id)
    if got != expected:
        raise AuroraConfigError(
            f"vocabulary {vocab_file} ({len(tokenizer.vocab)} tokens) gives [DEC] id {got[0]} and [ENC] id {got[1]}, "
            f"but the pretrained BLIP-base embedding has them at {expected[0]} and {expected[1]}, after the "
            f"{BERT_VOCAB_SIZE} tokens of {BERT_REPO}'s vocab.txt: pass that file as vocab_file "
            "(model.vocab_file in a recipe)")


def build_blip(arch: str, model_type: str, *, size: str = "base", checkpoint: str | Path | None = None,
               vocab_file: str | Path | None = None, allow_download: bool = False,
               pretrained_weights: bool | None = None, image_size: int | None = None, strict: bool = True,
               **overrides: Any) -> nn.Module:
    """A LAVIS ``BlipRetrieval`` / ``BlipVQA`` built without the network, random weights unless
    ``checkpoint`` is given. ``overrides`` replace single settings: LAVIS yaml keys (``queue_size``,
    ``alpha``, ``max_txt_len``, ``vit_grad_ckpt``, ...), ViT geometry (``patch_size``, ``vision_width``,
    ``vision_depth``, ``vision_heads``) or ``med_config.json`` fields (``num_hidden_layers``, ...).
    With ``strict=False`` a mismatching checkpoint is loaded as far as it matches and logged; call
    ``load_checkpoint`` directly to get the ``LoadReport``. ``pretrained_weights`` (default: whether
    ``checkpoint`` is given) says real BLIP weights will be loaded: a base model then needs bert-base-uncased's
    vocabulary (``bert_vocab_file``: ``vocab_file``, the Hugging Face cache, or a download if ``allow_download``)."""
    spec = _resolve_spec(arch, model_type, size, image_size, overrides)
    bert_ids = size == "base" and (checkpoint is not None if pretrained_weights is None else pretrained_weights)
    if bert_ids:
        vocab_file = bert_vocab_file(vocab_file, allow_download=allow_download)
    tokenizer = blip_tokenizer(vocab_file)
    text = spec["text"]
    if bert_ids:
        _check_bert_ids(tokenizer, vocab_file, text["vocab_size"])
    if size == "tiny" and "vocab_size" not in overrides:
        text["vocab_size"] = len(tokenizer)
    if len(tokenizer) > text["vocab_size"]:
        raise AuroraConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model embeds only "
                                f"vocab_size={text['vocab_size']}")
    model = (_build_retrieval if arch == "blip_retrieval" else _build_vqa)(spec, tokenizer)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, strict=strict)
        if arch == "blip_retrieval":
            model.reset_queue_ptr()  # as LAVIS's from_config does: fine-tuning starts a fresh queue
    return model


def _resolve_spec(arch: str, model_type: str, size: str, image_size: int | None,
                  overrides: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Settings in three sections (model, vision, text), each key in one of them; later wins:
    class defaults < LAVIS yaml and med_config.json < tiny widths < ``image_size`` < ``overrides``."""
    if arch not in ARCHITECTURES:
        raise AuroraConfigError(f"unknown LAVIS arch {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    if model_type not in ARCHITECTURES[arch]:
        raise AuroraConfigError(f"unknown model_type {model_type!r} for {arch}; "
                                f"choose one of {list(ARCHITECTURES[arch])}")
    if size not in SIZES:
        raise AuroraConfigError(f"unknown size {size!r}; choose one of {list(SIZES)}")
    yaml_cfg = OmegaConf.to_container(
        OmegaConf.load(get_abs_path(_CLASSES[arch].PRETRAINED_MODEL_CONFIG_DICT[model_type])).model)
    spec = {"model": dict(_MODEL_DEFAULTS[arch]), "vision": dict(_VISION_DEFAULTS),
            "text": json.loads(Path(get_abs_path(yaml_cfg["med_config_path"])).read_text())}
    settings = {**yaml_cfg, **(_TINY if size == "tiny" else {})}
    if image_size is not None:
        settings["image_size"] = image_size
    for key, value in settings.items():
        section = _section(spec, key)
        if section is not None:  # yaml download keys and VQA's lack of a queue leave some keys unused
            section[key] = value
    for key, value in overrides.items():
        section = _section(spec, key)
        if section is None:
            valid = sorted(k for part in spec.values() for k in part if k != "encoder_width")
            raise AuroraConfigError(f"unknown setting {key!r} for {arch}; valid: {valid}")
        section[key] = value
    spec["text"]["encoder_width"] = spec["vision"]["vision_width"]  # cross-attention reads image tokens
    return spec


def _section(spec: dict[str, dict[str, Any]], key: str) -> dict[str, Any] | None:
    """The section that owns ``key``; ``encoder_width`` is derived, never set."""
    if key == "encoder_width":
        return None
    return next((part for part in spec.values() if key in part), None)


def _vision_encoder(vision: Mapping[str, Any]) -> VisionTransformerEncoder:
    encoder = VisionTransformerEncoder(
        img_size=vision["image_size"], patch_size=vision["patch_size"], embed_dim=vision["vision_width"],
        depth=vision["vision_depth"], num_heads=vision["vision_heads"],
        use_grad_checkpointing=vision["vit_grad_ckpt"], ckpt_layer=vision["vit_ckpt_layer"],
        drop_path_rate=vision["vit_drop_path_rate"])
    encoder.vision_width = vision["vision_width"]
    return encoder


def _instantiate(cls: type[nn.Module], tokenizer: BertTokenizer, **kwargs: Any) -> nn.Module:
    """Run ``cls.__init__`` with ``init_tokenizer`` answered by our tokenizer instead of the hub.

    The instance attribute shadows the classmethod only while ``__init__`` runs, so the result is a
    plain instance of LAVIS's own class (registry, isinstance, pickling unchanged)."""
    model = cls.__new__(cls)
    object.__setattr__(model, "init_tokenizer", lambda: tokenizer)
    try:
        cls.__init__(model, **kwargs)
    finally:
        object.__delattr__(model, "init_tokenizer")
    return model


def _build_retrieval(spec: Mapping[str, dict[str, Any]], tokenizer: BertTokenizer) -> nn.Module:
    text_encoder = XBertEncoder(config=BertConfig.from_dict(spec["text"]), add_pooling_layer=False)
    return _instantiate(BlipRetrieval, tokenizer, image_encoder=_vision_encoder(spec["vision"]),
                        text_encoder=text_encoder, **spec["model"])


def _build_vqa(spec: Mapping[str, dict[str, Any]], tokenizer: BertTokenizer) -> nn.Module:
    # One BertConfig per text module, as LAVIS reads med_config.json once per module.
    text_encoder = XBertEncoder(config=BertConfig.from_dict(spec["text"]), add_pooling_layer=False)
    text_decoder = XBertLMHeadDecoder(config=BertConfig.from_dict(spec["text"]))
    return _instantiate(BlipVQA, tokenizer, image_encoder=_vision_encoder(spec["vision"]),
                        text_encoder=text_encoder, text_decoder=text_decoder, **spec["model"])


def load_checkpoint(model: nn.Module, path: str | Path, *, strict: bool = True) -> LoadReport:
    """Load a LAVIS ``.pth`` (weights under ``"model"``), a plain state dict or a ``.safetensors`` file.

    ViT position embeddings are resized when the checkpoint's image size differs (as LAVIS does).
    ``strict=True`` raises ``CheckpointError`` naming the file and keys before touching the model;
    ``strict=False`` loads what matches and logs a warning. Either way nothing is skipped silently."""
    path = Path(path)
    state = _read_state_dict(path)
    interpolated = _interpolate_pos_embeds(model, state)
    own = model.state_dict()
    tied = _tied_names(own)
    report = LoadReport(
        path=str(path), missing=[key for key in own if not state.keys() & tied.get(key, {key})],
        unexpected=[key for key in state if key not in own],
        mismatched=[key for key in state if key in own and state[key].shape != own[key].shape],
        interpolated=interpolated)
    if not report.clean:
        if strict:
            raise CheckpointError(f"checkpoint {path} does not match {type(model).__name__}: {report.summary()}")
        log.warning("checkpoint %s loaded partially into %s: %s", path, type(model).__name__, report.summary())
    for key in report.mismatched:
        del state[key]
    model.load_state_dict(state, strict=False)
    return report


def _tied_names(state: Mapping[str, torch.Tensor]) -> dict[str, set[str]]:
    """Names grouped by shared storage: a tied weight (the VQA decoder's output embedding and bias) is
    loaded through any one of its names, and ``safetensors.torch.save_model`` keeps only one."""
    groups: dict[tuple, set[str]] = {}
    for key, value in state.items():
        if value.numel():
            groups.setdefault((value.data_ptr(), value.shape, value.stride()), set()).add(key)
    return {key: group for group in groups.values() for key in group}


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            return dict(load_safetensors(str(path)))
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch and safetensors raise many types for a damaged file
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    state = content.get("model", content) if isinstance(content, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path} holds no state dict (a mapping of names to tensors, "
                              "at the top level or under 'model')")
    return dict(state)


def _square_grid(pos_embed: torch.Tensor, vit: VisionTransformer) -> bool:
    """Whether ``pos_embed`` has ``vit``'s width, extra tokens and a square patch grid."""
    if pos_embed.dim() != 3 or pos_embed.shape[-1] != vit.pos_embed.shape[-1]:
        return False
    patches = pos_embed.shape[-2] - (vit.pos_embed.shape[-2] - vit.patch_embed.num_patches)
    return patches > 0 and math.isqrt(patches) ** 2 == patches


def _interpolate_pos_embeds(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Resize square-grid ViT position embeddings in ``state`` to the model's grid; return their keys."""
    resized = []
    for name, module in model.named_modules():
        key = f"{name}.pos_embed" if name else "pos_embed"
        if not isinstance(module, VisionTransformer) or key not in state:
            continue
        saved, target = state[key], module.pos_embed
        if saved.shape == target.shape or not _square_grid(saved, module):
            continue  # equal, or not resizable: a different shape is then reported as mismatched
        with contextlib.redirect_stdout(io.StringIO()):  # LAVIS prints the resize; we log it
            state[key] = interpolate_pos_embed(saved, module)
        log.info("resized %s from %s to %s", key, tuple(saved.shape), tuple(target.shape))
        resized.append(key)
    return resized
