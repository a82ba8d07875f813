"""Native CPU kernels for ``--quantization w8a8_int8`` (AVX-512 VNNI), built on first use.

Why: at decode sizes (a few rows) oneDNN's ``torch._int_mm`` reads the weights at ~8 GB/s on the
2-core CI box and each int8 linear is ~12 small torch ops around it (quantize, convert, two
scalings). ``int8_gemv`` does the whole linear in one call: it quantizes the rows, multiplies with
``vpdpbusd`` over weights packed for it (int32 accumulation) and writes the dequantized float32
output; at 8 rows it takes half the time of ``_int_mm`` alone. For many rows (long prefill) oneDNN's
GEMM is faster, so there only the quantize and dequantize passes are native (one pass each).

Every result is bit-identical to the torch path in ``pdserve.models.quant`` (same float32
operations in the same order; the integer products are exact), so the choice is only speed.

The C source below is built on first use by ``pdserve.native``. Without a compiler or without
AVX-512 VNNI, ``native()`` is None and the torch path runs; the reason is logged once.
"""

from __future__ import annotations

import ctypes

import torch

from pdserve.native import AVX512_CPU, AVX512_FLAGS, build

GEMV_MAX_ROWS = 32       # decode batches; on the CI box the GEMV stays as fast as oneDNN's GEMM
                         # (``torch._int_mm``) up to 256 rows, and oneDNN is 1.4x faster at 2,048
PACK_N, PACK_K = 32, 4   # weights packed as [N / 32, K / 4, 32, 4]: one 128-byte step per 4 k

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <immintrin.h>

#define TINY 1e-10f

static inline __mmask16 tail(int64_t left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1); }

static inline __m512 load16(const void* x, int bf16, int64_t i, __mmask16 m) {
  if (bf16) {
    __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t*)x + i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  return _mm512_maskz_loadu_ps(m, (const float*)x + i);
}

/* One row: scale = max|x| / 127 (at least TINY / 127); codes = round_half_even(x * (1/max * 127)),
   plus `offset` (128 turns int8 codes into the unsigned operand vpdpbusd needs). */
static void quantize_row(const void* x, int bf16, int64_t K, int8_t* codes, float* scale, int offset) {
  __m512 mx = _mm512_setzero_ps();
  for (int64_t i = 0; i < K; i += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(load16(x, bf16, i, tail(K - i))));
  float amax = _mm512_reduce_max_ps(mx);
  if (amax < TINY) amax = TINY;
  const __m512 inv = _mm512_set1_ps((1.0f / amax) * 127.0f);
  *scale = amax / 127.0f;
  const __m512i off = _mm512_set1_epi32(offset);
  for (int64_t i = 0; i < K; i += 16) {
    __mmask16 m = tail(K - i);
    __m512 v = _mm512_roundscale_ps(_mm512_mul_ps(load16(x, bf16, i, m), inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm512_mask_cvtepi32_storeu_epi8(codes + i, m, _mm512_add_epi32(_mm512_cvtps_epi32(v), off));
  }
}

void quantize_rows(const void* x, int bf16, int64_t M, int64_t K, int64_t ldx, int8_t* codes, float* scales, int nthreads) {
  #pragma omp parallel for num_threads(nthreads) if (M * K > 65536)
  for (int64_t m = 0; m < M; m++)
    quantize_row((const char*)x + m * ldx * (bf16 ? 2 : 4), bf16, K, codes + m * K, scales + m, 0);
}

/* out[m, n] = ((float)acc[m, n] * ws[n]) * xs[m] */
void dequantize(const int32_t* acc, int64_t M, int64_t N, const float* xs, const float* ws, float* out, int nthreads) {
  #pragma omp parallel for num_threads(nthreads) if (M * N > 65536)
  for (int64_t m = 0; m < M; m++) {
    const __m512 s = _mm512_set1_ps(xs[m]);
    for (int64_t n = 0; n < N; n += 16) {
      __mmask16 k = tail(N - n);
      __m512 v = _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(k, acc + m * N + n));
      _mm512_mask_storeu_ps(out + m * N + n, k, _mm512_mul_ps(_mm512_mul_ps(v, _mm512_maskz_loadu_ps(k, ws + n)), s));
    }
  }
}

/* R rows (R <= 8) against one 32-channel block: 2R int32 accumulators. */
#define ROWS(R) \
static inline void rows_##R(const uint32_t* xu, int64_t K4, const int8_t* wb, __m512i* out) { \
  __m512i a0[R], a1[R]; \
  _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) { a0[r] = _mm512_setzero_si512(); a1[r] = _mm512_setzero_si512(); } \
  for (int64_t k4 = 0; k4 < K4; k4++) { \
    __m512i w0 = _mm512_loadu_si512((const void*)(wb + k4 * 128)); \
    __m512i w1 = _mm512_loadu_si512((const void*)(wb + k4 * 128 + 64)); \
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) { \
      __m512i xb = _mm512_set1_epi32((int)xu[r * K4 + k4]); \
      a0[r] = _mm512_dpbusd_epi32(a0[r], xb, w0); a1[r] = _mm512_dpbusd_epi32(a1[r], xb, w1); } \
  } \
  _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) { out[2 * r] = a0[r]; out[2 * r + 1] = a1[r]; } \
}
ROWS(1) ROWS(2) ROWS(3) ROWS(4) ROWS(5) ROWS(6) ROWS(7) ROWS(8)

static void rows_any(int64_t R, const uint32_t* xu, int64_t K4, const int8_t* wb, __m512i* out) {
  switch (R) {
    case 1: rows_1(xu, K4, wb, out); break; case 2: rows_2(xu, K4, wb, out); break;
    case 3: rows_3(xu, K4, wb, out); break; case 4: rows_4(xu, K4, wb, out); break;
    case 5: rows_5(xu, K4, wb, out); break; case 6: rows_6(xu, K4, wb, out); break;
    case 7: rows_7(xu, K4, wb, out); break; default: rows_8(xu, K4, wb, out);
  }
}

/* x [M, K] (row stride ldx) -> out [M, N] float32 = dequantize(int8(x) . W^T). packed: [N/32][K/4][32][4]
   int8; comp[n] = 128 * sum_k W[n, k] (undoes the +128 of the unsigned activation codes). */
int int8_gemv(const void* x, int bf16, int64_t M, int64_t K, int64_t ldx, const int8_t* packed, const int32_t* comp,
              const float* ws, int64_t N, float* out, int nthreads) {
  const int64_t K4 = K / 4;
  uint32_t* xu = (uint32_t*)malloc((size_t)(M * K4 * 4 + 64));
  float* xs = (float*)malloc((size_t)(M * 4 + 64));
  if (!xu || !xs) { free(xu); free(xs); return 1; }
  for (int64_t m = 0; m < M; m++)
    quantize_row((const char*)x + m * ldx * (bf16 ? 2 : 4), bf16, K, (int8_t*)(xu + m * K4), xs + m, 128);
  #pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t nb = 0; nb < N / 32; nb++) {
    const int8_t* wb = packed + nb * K4 * 128;
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
      __m512i acc[16];
      const int64_t R = M - m0 < 8 ? M - m0 : 8;
      rows_any(R, xu + m0 * K4, K4, wb, acc);
      for (int h = 0; h < 2; h++) {
        const __m512i c = _mm512_loadu_si512((const void*)(comp + nb * 32 + h * 16));
        const __m512 s = _mm512_loadu_ps(ws + nb * 32 + h * 16);
        for (int64_t r = 0; r < R; r++) {
          __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[2 * r + h], c));
          _mm512_storeu_ps(out + (m0 + r) * N + nb * 32 + h * 16, _mm512_mul_ps(_mm512_mul_ps(v, s), _mm512_set1_ps(xs[m0 + r])));
        }
      }
    }
  }
  free(xu);
  free(xs);
  return 0;
}
"""

def native() -> ctypes.CDLL | None:
    """The compiled kernels, or None (no AVX-512 VNNI, no C compiler, or the build failed)."""
    return build("quant_int8", _SOURCE, [*AVX512_FLAGS, "-mavx512vnni"], (*AVX512_CPU, "avx512_vnni"), _declare)


def _declare(lib: ctypes.CDLL) -> None:
    ptr, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    lib.quantize_rows.argtypes = [ptr, i32, i64, i64, i64, ptr, ptr, i32]
    lib.quantize_rows.restype = None
    lib.dequantize.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i32]
    lib.dequantize.restype = None
    lib.int8_gemv.argtypes = [ptr, i32, i64, i64, i64, ptr, ptr, ptr, i64, ptr, i32]
    lib.int8_gemv.restype = i32


def can_pack(qweight: torch.Tensor) -> bool:
    n, k = qweight.shape
    return qweight.device.type == "cpu" and n % PACK_N == 0 and k % PACK_K == 0 and native() is not None


def pack_weight(qweight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 ``[N, K]`` -> (``[N/32, K/4, 32, 4]`` int8 for vpdpbusd, int32 ``[N]`` = 128 * row sums)."""
    n, k = qweight.shape
    packed = qweight.view(n // PACK_N, PACK_N, k // PACK_K, PACK_K).permute(0, 2, 1, 3).contiguous()
    return packed, qweight.sum(dim=1, dtype=torch.int32) * 128


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x as rows with a unit inner stride, and whether it holds bf16 (else float32)."""
    if x.dtype not in (torch.float32, torch.bfloat16):
        x = x.float()
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x, int(x.dtype == torch.bfloat16)


def gemv(x: torch.Tensor, packed: torch.Tensor, comp: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """``x [M, K]`` float -> float32 ``[M, N]``: the whole int8 linear in one call (few rows)."""
    x, bf16 = _rows(x)
    m, k = x.shape
    n = comp.shape[0]
    out = torch.empty(m, n, dtype=torch.float32)
    if m and native().int8_gemv(_ptr(x), bf16, m, k, x.stride(0), _ptr(packed), _ptr(comp), _ptr(weight_scale),
                                n, _ptr(out), torch.get_num_threads()):
        raise MemoryError("int8_gemv: out of memory for the activation codes")
    return out


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quant.quantize_tokens`` in one native pass per row (bit-identical)."""
    x, bf16 = _rows(x)
    m, k = x.shape
    codes = torch.empty(m, k, dtype=torch.int8)
    scales = torch.empty(m, 1, dtype=torch.float32)
    native().quantize_rows(_ptr(x), bf16, m, k, x.stride(0), _ptr(codes), _ptr(scales), torch.get_num_threads())
    return codes, scales


def dequantize(acc: torch.Tensor, x_scale: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """int32 ``[M, N]`` -> float32 ``(acc * weight_scale) * x_scale`` in one pass (bit-identical)."""
    acc = acc.contiguous()
    m, n = acc.shape
    out = torch.empty(m, n, dtype=torch.float32)
    native().dequantize(_ptr(acc), m, n, _ptr(x_scale.contiguous()), _ptr(weight_scale), _ptr(out),
                        torch.get_num_threads())
    return out
