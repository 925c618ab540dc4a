"""Build transformers BLIP / BLIP-2 models from configs with random weights (nothing downloaded).

`"base"` is BLIP-base as Salesforce's transformers checkpoints describe it (ViT-B/16 at 384 px, a 12-layer
BERT-base text side with cross-attention, a 30524-token embedding); `"tiny"` keeps the classes and module
names and shrinks every width so a step takes milliseconds on a CPU. Vision weights are drawn with
`initializer_range=0.02`: transformers' default for BLIP's vision tower (1e-10) makes random-weight image
features all but zero, which hides every bug a test should find.

Tokenizer: for tiny models, a WordPiece `BertTokenizer` over the vocabulary shipped with the package
(`aurora_pet/assets/blip_vocab.txt`, shared with the LAVIS family) plus BLIP's `[DEC]` (bos) and `[ENC]`,
with the text config's special-token ids set to match. Real checkpoints come with their own processor
(`BlipProcessor.from_pretrained(local_dir)`); a base-size model never gets the demo vocabulary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import transformers
from torch import nn

if int(transformers.__version__.split(".")[0]) < 5:
    raise ImportError(f"the hf family needs transformers>=5 (found {transformers.__version__}, LAVIS's pin?): "
                      "use the modern environment (`pip install aurora-pet[hf]`, or .venv-hf from `make test`)")

from transformers import (  # noqa: E402
    Blip2Config, Blip2ForConditionalGeneration, BlipConfig, BlipForConditionalGeneration,
    BlipForImageTextRetrieval, BlipForQuestionAnswering, BlipImageProcessor, BlipProcessor, BertTokenizer,
)

from ...errors import AuroraConfigError

__all__ = ["SIZES", "TASKS", "blip_config", "blip_processor", "blip_tokenizer", "build_blip", "build_blip2"]

VOCAB = Path(__file__).parents[2] / "assets" / "blip_vocab.txt"
SIZES = ("tiny", "base")
TASKS = {"retrieval": BlipForImageTextRetrieval, "vqa": BlipForQuestionAnswering,
         "captioning": BlipForConditionalGeneration}

_BASE_TEXT = {"num_attention_heads": 12}
_BASE_VISION = {"image_size": 384, "initializer_range": 0.02}
_TINY_TEXT = {"hidden_size": 64, "encoder_hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "max_position_embeddings": 64}
_TINY_VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                "image_size": 32, "patch_size": 8, "initializer_range": 0.02}
_TINY_SHARED = {"projection_dim": 32, "image_text_hidden_size": 32}


def blip_tokenizer(vocab_file: str | Path | None = None) -> BertTokenizer:
    """BLIP's tokenizer (BERT WordPiece + `[DEC]` bos + `[ENC]`) from a local vocabulary file."""
    path = Path(vocab_file) if vocab_file is not None else VOCAB
    if not path.is_file():
        raise FileNotFoundError(f"vocabulary file not found: {path}")
    tokenizer = BertTokenizer(str(path), do_lower_case=True, model_max_length=512)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tokenizer


def blip_processor(image_size: int, vocab_file: str | Path | None = None) -> BlipProcessor:
    """A `BlipProcessor` (image processor + the tokenizer above) for models built here."""
    images = BlipImageProcessor(size={"height": image_size, "width": image_size})
    return BlipProcessor(image_processor=images, tokenizer=blip_tokenizer(vocab_file))


def blip_config(size: str = "tiny", **overrides: Any) -> BlipConfig:
    """The `BlipConfig` of a size; `overrides` set text (`text_<field>`), vision (`vision_<field>`) or
    top-level fields, e.g. `text_num_hidden_layers=1`."""
    if size not in SIZES:
        raise AuroraConfigError(f"unknown size {size!r}; choose one of {list(SIZES)}")
    text = dict(_TINY_TEXT if size == "tiny" else _BASE_TEXT)
    vision = dict(_TINY_VISION if size == "tiny" else _BASE_VISION)
    top: dict[str, Any] = dict(_TINY_SHARED if size == "tiny" else {})
    if size == "tiny":
        tokenizer = blip_tokenizer()
        text.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                    sep_token_id=tokenizer.sep_token_id, eos_token_id=tokenizer.sep_token_id)
    for key, value in overrides.items():
        section = text if key.startswith("text_") else vision if key.startswith("vision_") else top
        section[key.removeprefix("text_").removeprefix("vision_")] = value
    text["encoder_hidden_size"] = vision.get("hidden_size", 768)
    return BlipConfig(text_config=text, vision_config=vision, **top)


def build_blip(task: str = "retrieval", size: str = "tiny", seed: int | None = 0, **overrides: Any) -> nn.Module:
    """A transformers BLIP model for `task` ("retrieval", "vqa", "captioning") with random weights."""
    if task not in TASKS:
        raise AuroraConfigError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
    return _seeded(lambda: TASKS[task](blip_config(size, **overrides)), seed).eval()


def build_blip2(size: str = "tiny", seed: int | None = 0) -> nn.Module:
    """A `Blip2ForConditionalGeneration` with random weights: tiny (a 48-wide vision tower, a 32-wide
    Q-Former, a 64-wide OPT) or base (BLIP-2 OPT-2.7b's shapes: ViT-g 1408, Q-Former 768, OPT 2560)."""
    if size not in SIZES:
        raise AuroraConfigError(f"unknown size {size!r}; choose one of {list(SIZES)}")
    if size == "tiny":
        config = Blip2Config(
            vision_config={"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                           "image_size": 32, "patch_size": 8, "initializer_range": 0.02},
            qformer_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "encoder_hidden_size": 48, "vocab_size": 128},
            text_config={"model_type": "opt", "hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "vocab_size": 128, "max_position_embeddings": 64,
                         "word_embed_proj_dim": 64},
            num_query_tokens=4, image_token_index=127)
    else:
        config = Blip2Config(vision_config={"initializer_range": 0.02},
                             text_config={"model_type": "opt", "hidden_size": 2560, "ffn_dim": 10240,
                                          "num_hidden_layers": 32, "num_attention_heads": 32,
                                          "word_embed_proj_dim": 2560})
    return _seeded(lambda: Blip2ForConditionalGeneration(config), seed).eval()


def _seeded(make, seed: int | None) -> nn.Module:
    import torch

    if seed is None:
        return make()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()
