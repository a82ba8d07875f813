"""Shared checks for the kernel wrappers, and the interpreter fixes the CPU test path needs.

Every wrapper validates its inputs on the host (shapes, dtypes, strides, devices) and raises
``ValueError`` naming the argument: a bad stride in a Triton kernel is a silent wrong answer,
not a crash, so the check is the only line of defence.

On CPU the kernels run through Triton's interpreter (``pdserve/kernels/__init__.py`` says when
it is switched on). It is slow: tests and ``--tiny`` checks only. Triton 3.6's
interpreter has four bugs that our kernels hit; ``_fix_interpreter`` patches them, and only when
the interpreter is on (the compiled GPU path is never touched):
- with numpy >= 2.4, a loop bound that is a runtime scalar (``range(start, end)``) fails with
  "only 0-dimensional arrays can be converted to Python scalars" (triton-lang/triton#9171);
- ``tl.dot`` on bfloat16 multiplies the raw uint16 storage, giving garbage; we widen to fp32;
- a cast to bfloat16 (``x.to(tl.bfloat16)``, or a store of fp32 values into a bf16 tensor) drops
  the low mantissa bits (rounds toward zero), where the GPU rounds to nearest even; such casts
  go through torch (kernels that mirror a reference's bf16 roundings are then bit-exact on CPU);
- a downcast to fp8 (``x.to(fp8)``) rounds half-up on the cut-off bit only, halves values whose
  mantissa rounds up into the next binade (7.9 -> 4 in e4m3) and flushes fp8 subnormals to zero,
  and e5m2 -> fp16 flushes e5m2 subnormals; every cast from or to fp8 goes through torch instead
  (exact upcasts; round to nearest even down, as the GPU's ``cvt.rn`` does).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from pdserve.runtime.kv_pool import FP8_DTYPES  # KV pages only (--kv-cache-dtype): one definition, the pool's

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def require(cond: bool, message: str | Callable[[], str]) -> None:
    """Raise ValueError(message) unless ``cond``. Pass the message as a lambda where it is
    formatted: wrappers run per layer per step, and eager prefill is host-bound (an f-string per
    check was measurable: scripts/gpu/host_profile.py)."""
    if not cond:
        raise ValueError(message() if callable(message) else message)


def check_tensor(name: str, t: torch.Tensor, ndim: int, dtypes: tuple[torch.dtype, ...] | None = None,
                 last_contiguous: bool = True) -> None:
    """``t`` has ``ndim`` dims, a dtype in ``dtypes`` and (by default) unit stride in its last dim.
    One boolean expression on the way through (wrappers run per layer per step; eager prefill is
    host-bound), the message is worked out only when it fails."""
    if (isinstance(t, torch.Tensor) and t.dim() == ndim and (dtypes is None or t.dtype in dtypes)
            and (not last_contiguous or t.stride(-1) == 1 or t.shape[-1] == 1 or t.numel() == 0)):
        return
    require(isinstance(t, torch.Tensor), lambda: f"{name}: expected a tensor, got {type(t).__name__}")
    require(t.dim() == ndim, lambda: f"{name}: expected {ndim} dims, got shape {tuple(t.shape)}")
    require(dtypes is None or t.dtype in dtypes, lambda: f"{name}: dtype {t.dtype} not in {[str(d) for d in dtypes]}")
    raise ValueError(f"{name}: last dim must be contiguous, strides {t.stride()}")


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    """All tensors on one device, and a device Triton can run on here."""
    values = iter(tensors.values())
    first = next(values).device
    for t in values:
        if t.device != first:
            raise ValueError(f"tensors on different devices: { {n: str(x.device) for n, x in tensors.items()} }")
    if first.type != "cuda":
        require(INTERPRET, lambda: f"Triton kernels need CUDA tensors (got {first}); on CPU set TRITON_INTERPRET=1 "
                           "before anything imports triton")
        require(_interpreter_is_whole(), "TRITON_INTERPRET=1 was set after triton was imported, so triton's own "
                                         "library functions are compiled-only; set it before importing triton "
                                         "(or transformers, which imports it)")
    return first


def _interpreter_is_whole() -> bool:
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.standard.max, InterpretedFunction)


def kv_page_dtypes(compute_dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    """Page dtypes an attention kernel reads beside ``compute_dtype`` queries: the same, or fp8."""
    return (compute_dtype, *FP8_DTYPES)


def fp8_max(dtype: torch.dtype) -> float:
    """Largest finite value of an fp8 page dtype; 0.0 (no clamp) for any other dtype."""
    return float(torch.finfo(dtype).max) if dtype in FP8_DTYPES else 0.0


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs must not silently drop to tf32 (10-bit mantissa); 16-bit inputs ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _fix_interpreter() -> None:
    from triton.runtime import interpreter

    if getattr(interpreter, "_pdserve_fixed", False):
        return
    orig_patch_tensor = interpreter._patch_lang_tensor

    def patch_tensor(tensor, scope) -> None:
        orig_patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch_tensor
    orig_dot = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return orig_dot(self, _widen_bf16(a), _widen_bf16(b), d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot
    orig_fp_to_fp = interpreter.InterpreterBuilder.create_fp_to_fp

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        out = _fp8_cast_with_torch(src, dst_type.scalar, rounding_mode)
        return out if out is not None else orig_fp_to_fp(self, src, dst_type, rounding_mode)

    interpreter.InterpreterBuilder.create_fp_to_fp = create_fp_to_fp
    orig_cast = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        out = _bf16_cast_with_torch(src, dst_type.scalar)
        return out if out is not None else orig_cast(self, src, dst_type)

    interpreter.InterpreterBuilder.cast_impl = cast_impl
    interpreter._pdserve_fixed = True


def _fp8_cast_with_torch(handle, dst, rounding_mode):
    """Casts between fp8 (e4m3nv, e5) and fp32/fp16/bf16 done by torch; None for any other cast."""
    import numpy as np
    import triton.language as tl
    from triton._C.libtriton import ir
    from triton.runtime.interpreter import TensorHandle

    fp8 = {tl.float8e4nv: torch.float8_e4m3fn, tl.float8e5: torch.float8_e5m2}
    wide = {tl.float32: torch.float32, tl.float16: torch.float16, tl.bfloat16: torch.bfloat16}
    src = handle.dtype.scalar
    if src in fp8 and dst in wide:  # upcast: reinterpret the stored bytes
        data = np.ascontiguousarray(handle.data)
        out = torch.from_numpy(data).view(fp8[src]).to(wide[dst])
        bits = out.view(torch.int16).numpy().view(np.uint16) if dst == tl.bfloat16 else out.numpy()
        return TensorHandle(bits, dst)  # the interpreter keeps bf16 as uint16
    if dst not in fp8 or src not in wide or rounding_mode == ir.ROUNDING_MODE.RTZ:
        return None
    values = np.ascontiguousarray(_widen_bf16(handle).data)  # float32 or float16 values
    return TensorHandle(torch.from_numpy(values).to(fp8[dst]).view(torch.uint8).numpy(), dst)


def _bf16_cast_with_torch(handle, dst):
    """fp32/fp16 -> bf16 rounded to nearest even (torch), as the GPU does; None for other casts."""
    import numpy as np
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle

    wide = {tl.float32: torch.float32, tl.float16: torch.float16}
    if dst != tl.bfloat16 or handle.dtype.scalar not in wide:
        return None
    values = torch.from_numpy(np.ascontiguousarray(handle.data))
    return TensorHandle(values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), dst)


def _widen_bf16(handle):
    import numpy as np
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle

    if handle.dtype.scalar != tl.bfloat16:
        return handle
    bits = handle.data.astype(np.uint32) << 16  # bf16 is the top half of an fp32
    return TensorHandle(bits.view(np.float32), tl.float32)


if INTERPRET:
    _fix_interpreter()
