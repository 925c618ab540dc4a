"""Test-wide settings: one torch thread, since the suite's models are tiny and CI has 2 cores
(two threads fighting over them make tiny ops many times slower)."""

import torch

torch.set_num_threads(1)
