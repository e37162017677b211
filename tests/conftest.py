"""Shared test setup: one torch thread (the tests' tensors are tiny; threads only contend)."""

import torch

torch.set_num_threads(1)
