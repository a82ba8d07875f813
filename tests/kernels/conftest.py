"""Kernel tests run the real Triton kernels: compiled on a GPU, through the interpreter on CPU.

TRITON_INTERPRET is read when a kernel is decorated, so it is set here, before any test module
imports ``pdserve.kernels.*``.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
