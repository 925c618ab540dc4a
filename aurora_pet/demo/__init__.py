"""The embedded demo: a tiny BLIP learns a generated shapes world, then Aurora adapts it to a shifted one.

1. Data (``aurora_pet.data.synthetic``) in Flickr30k's real annotation format: a ``source`` domain
   (light background, one set of colour/shape pairs, "on the left") and a ``shifted`` one (dark noisy
   background, the other pairs, "at the left", more shapes per image).
2. A tiny LAVIS ``BlipRetrieval`` trained in full on the source domain with LAVIS's runner and BLIP's own
   losses (ITC with momentum distillation + ITM with hard negatives), through the same
   ``aurora_pet.training.train`` as the recipes (48 epochs, about 6 minutes on 2 CPU cores). The result of
   the default settings ships with the package (``aurora_pet/assets``, 2 MB); other settings are trained
   once and cached, keyed by a hash of every setting.
3. Evaluation on the shifted test split before adaptation (the Aurora-wrapped model at initialisation is
   exactly the pre-trained model), Aurora adaptation (the paper's cross-attention preset by default,
   ``--preset`` for another, + ITM/projection heads) on the shifted training split, and evaluation after
   it: LAVIS's retrieval task, R@1/5/10 in both directions with ITM re-ranking. The shift is visual, so
   the ``reference`` preset, which also adapts the ViT, recovers more of full fine-tuning's gain
   (``bench.learning``); the demo's report says so.

The transformers family (``aurora-pet demo --family hf``, ``make demo-hf``, in ``.venv-hf``) tells the same
story with ``BlipForImageTextRetrieval`` built from a config: pre-trained in full on the same source data
through the hf recipe runner (``aurora_pet.training.hf_train.train``; 30 epochs, about 4 minutes on one
free CPU core; shipped, 0.9 MB), written with ``save_pretrained`` as the adaptation recipe's
``model.pretrained``, evaluated and adapted by a ``family: hf`` recipe with the family's cross-attention
preset.

Modules, also used by the benchmarks: ``recipe`` (the settings, the generated data and the recipe that
trains on it), ``hf`` (the same for the transformers family) and ``pretrained`` (the source-domain model of
either family: shipped, cached or pre-trained now; also the tiny ``BlipVQA`` of ``bench.learning --task vqa``,
pre-trained on source-domain questions from the retrieval model's encoders). Evaluation is ``aurora_pet.training.evaluate`` (LAVIS)
or an hf recipe run with ``run.evaluate``; ``aurora-pet demo`` (``aurora_pet.cli.demo``) runs the steps and
prints them.
"""
