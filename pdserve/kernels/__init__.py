"""Triton kernels (each with a typed wrapper and a plain-torch reference) and attention backends.

Modules: decode_attention, extend_attention, kv_store, rmsnorm, rotary, activation; backend
(TritonAttention), flashinfer_backend (FlashInferAttention). See docs/kernels.md.

Triton runs on CPU only through its interpreter, and ``TRITON_INTERPRET`` is read when a
``@triton.jit`` function is decorated -- including triton's own library functions (``tl.max``,
``tl.zeros``...), decorated when ``triton`` is first imported. So on a machine without CUDA this
package turns the interpreter on, but only while triton is not yet imported (otherwise the
kernel wrappers raise a clear error instead: set ``TRITON_INTERPRET=1`` before anything imports
triton -- transformers does). An explicit ``TRITON_INTERPRET`` is always respected.
"""

import os as _os
import sys as _sys

if "TRITON_INTERPRET" not in _os.environ and "triton" not in _sys.modules:
    import torch as _torch

    if not _torch.cuda.is_available():
        _os.environ["TRITON_INTERPRET"] = "1"
