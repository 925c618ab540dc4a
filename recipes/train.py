"""Train a recipe with LAVIS's runner and an Aurora adapter (the same code as ``aurora-pet train``).

    python recipes/train.py --cfg-path recipes/retrieval_flickr30k.yaml [--options k=v ...] [--resume]
    python -m torch.distributed.run --nproc_per_node=8 recipes/train.py --cfg-path recipes/retrieval_flickr30k.yaml
"""

import sys

from aurora_pet.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
