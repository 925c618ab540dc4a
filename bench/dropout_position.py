"""Learning effect of the adapter dropout's placement on the demo's shifted-domain retrieval task.

One run of the demo's adaptation (its data, pre-trained tiny BLIP, recipe and 12 epochs) with Aurora's dropout
off, 0.1 on the input x, or 0.1 on z = x·V; prints and writes the test metrics.

    .venv/bin/python -m bench.dropout_position {none|input|rank} SEED OUT_DIR
"""
import json
import sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from aurora_pet.demo.pretrained import pretrained_tiny_blip
from aurora_pet.demo.recipe import ADAPT_DATA, ARCH, DEMO_AURORA, demo_recipe, write_demo_data
from aurora_pet.training.data import write_recipe
from aurora_pet.training.trainer import train

variant, seed, root = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
aurora = dict(DEMO_AURORA)
if variant == "none":
    aurora["dropout"] = 0.0
else:
    aurora.update(dropout=0.1, dropout_position=variant)
out = root / f"{variant}_{seed}"
pretrained = pretrained_tiny_blip(ARCH, None, quiet=True)
written = write_demo_data(out / "data", "shifted", **ADAPT_DATA)
recipe = write_recipe(out / "recipe.yaml", demo_recipe(written, out / "run", pretrained=pretrained, aurora=aurora,
                                                      run={"seed": seed}))
result = train(recipe, ["run.progress=False"], quiet=True)
test = {k: v for k, v in (result.final or {}).items() if k.startswith("test_")}
print(json.dumps({"variant": variant, "seed": seed, **test}))
(root / f"{variant}_{seed}.json").write_text(json.dumps({"variant": variant, "seed": seed, **test}))
