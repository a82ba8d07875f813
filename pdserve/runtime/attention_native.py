"""Native paged decode attention for the CPU path (AVX-512), built on first use (``pdserve.native``).

Why: the torch path gathers every decode sequence's pages into a padded block and transposes it
before two batched matmuls -- per layer it copies the whole context twice and the matmuls then
read it a third time. This kernel reads K and V straight from the pool's pages, once, with
software prefetch, one task per (sequence, KV head): on the 2-core CI box a decode step's
attention at ~300 tokens of context takes about half the torch path's time in fp32 (the pool is
read from DRAM either way). fp32 and bf16 pools; scores, softmax (a Cephes-style exp, ~1 ulp) and
the weighted sum in fp32. The result matches the torch path to float32 rounding, not bit for bit
(different summation order); every sequence is computed on its own, so a row never depends on its
batch-mates. fp8 pools, head sizes that are not a multiple of 16 (or above 128), more than 8 query
heads per KV head, or a machine without AVX-512: ``decode`` returns None and the torch path runs.
"""

from __future__ import annotations

import ctypes

import torch

from pdserve.native import AVX512_CPU, AVX512_FLAGS, build

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <immintrin.h>
#include <math.h>

static inline __m512 exp512(__m512 x) {  /* Cephes expf: ~1 ulp on [-87, 0] */
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

static inline __m512 ld(const void* base, int bf16, int64_t i) {
  if (bf16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)((const uint16_t*)base + i))), 16));
  return _mm512_loadu_ps((const float*)base + i);
}
static inline int64_t slot_offset(const int64_t* pages, int64_t t, int64_t ps, int64_t page_stride, int64_t row,
                                  int64_t head_off) {  /* element offset of token t's row for one kv head */
  return pages[t / ps] * page_stride + (t % ps) * row + head_off;
}
/* token t's row of one kv head into dst[ND] (fp32), prefetching the row 16 tokens on */
static inline void load_head_row(__m512* dst, const void* base, int bf16, const int64_t* pages, int64_t t, int64_t L,
                                 int64_t ps, int64_t page_stride, int64_t row, int64_t head_off, int64_t ND) {
  if (t + 16 < L)
    __builtin_prefetch((const char*)base + slot_offset(pages, t + 16, ps, page_stride, row, head_off) * (bf16 ? 2 : 4), 0, 3);
  const int64_t off = slot_offset(pages, t, ps, page_stride, row, head_off);
  for (int64_t j = 0; j < ND; j++) dst[j] = ld(base, bf16, off + j * 16);
}

#define MAXG 8
#define MAXND 8
/* One decode token per sequence. q, out: [B, Hq, D] float32. kbase/vbase: this layer's K/V of page 0 (elements of
   the pool dtype); a token's row sits at page * page_stride + slot * Hkv * D + head * D. table [B, P]; lens [B]. */
int decode_attention(const float* q, const void* kbase, const void* vbase, int bf16, int64_t page_stride,
                     const int64_t* table, int64_t P, const int64_t* lens, int64_t B, int64_t Hq, int64_t Hkv,
                     int64_t D, int64_t ps, float scale, float* out, int nthreads) {
  const int64_t G = Hq / Hkv, ND = D / 16, row = Hkv * D;
  if (G > MAXG || ND > MAXND || D % 16) return 2;
  int err = 0;
  #pragma omp parallel for collapse(2) schedule(dynamic, 1) num_threads(nthreads)
  for (int64_t b = 0; b < B; b++) for (int64_t h = 0; h < Hkv; h++) {
    const int64_t L = lens[b], Lp = (L + 15) & ~15;
    float* s = (float*)aligned_alloc(64, (size_t)(G * Lp * 4));
    if (!s) { err = 1; continue; }
    __m512 qv[MAXG * MAXND];
    for (int64_t g = 0; g < G; g++) for (int64_t j = 0; j < ND; j++) qv[g * ND + j] = _mm512_loadu_ps(q + (b * Hq + h * G + g) * D + j * 16);
    const int64_t* pages = table + b * P;
    for (int64_t t = 0; t < L; t++) {
      __m512 kv[MAXND];
      load_head_row(kv, kbase, bf16, pages, t, L, ps, page_stride, row, h * D, ND);
      for (int64_t g = 0; g < G; g++) {
        __m512 acc = _mm512_mul_ps(qv[g * ND], kv[0]);
        for (int64_t j = 1; j < ND; j++) acc = _mm512_fmadd_ps(qv[g * ND + j], kv[j], acc);
        s[g * Lp + t] = _mm512_reduce_add_ps(acc) * scale;
      }
    }
    for (int64_t g = 0; g < G; g++) {  /* softmax over s[g, :L] */
      float* sg = s + g * Lp;
      for (int64_t t = L; t < Lp; t++) sg[t] = -INFINITY;
      __m512 mx = _mm512_set1_ps(-INFINITY);
      for (int64_t t = 0; t < Lp; t += 16) mx = _mm512_max_ps(mx, _mm512_load_ps(sg + t));
      const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
      __m512 sum = _mm512_setzero_ps();
      for (int64_t t = 0; t < Lp; t += 16) {
        __m512 e = exp512(_mm512_sub_ps(_mm512_load_ps(sg + t), m));
        e = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(_mm512_load_ps(sg + t), _mm512_set1_ps(-INFINITY), _CMP_EQ_OQ), e, _mm512_setzero_ps());
        _mm512_store_ps(sg + t, e);
        sum = _mm512_add_ps(sum, e);
      }
      const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
      for (int64_t t = 0; t < Lp; t += 16) _mm512_store_ps(sg + t, _mm512_mul_ps(_mm512_load_ps(sg + t), inv));
    }
    __m512 acc[MAXG * MAXND];
    for (int64_t i = 0; i < G * ND; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t t = 0; t < L; t++) {
      __m512 vv[MAXND];
      load_head_row(vv, vbase, bf16, pages, t, L, ps, page_stride, row, h * D, ND);
      for (int64_t g = 0; g < G; g++) {
        const __m512 p = _mm512_set1_ps(s[g * Lp + t]);
        for (int64_t j = 0; j < ND; j++) acc[g * ND + j] = _mm512_fmadd_ps(p, vv[j], acc[g * ND + j]);
      }
    }
    for (int64_t g = 0; g < G; g++) for (int64_t j = 0; j < ND; j++) _mm512_storeu_ps(out + (b * Hq + h * G + g) * D + j * 16, acc[g * ND + j]);
    free(s);
  }
  return err;
}
"""


def _declare(lib: ctypes.CDLL) -> None:
    p, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    lib.decode_attention.argtypes = [p, p, p, i32, i64, p, i64, p, i64, i64, i64, i64, i64, ctypes.c_float, p, i32]
    lib.decode_attention.restype = i32


def native() -> ctypes.CDLL | None:
    return build("decode_attention", _SOURCE, AVX512_FLAGS, AVX512_CPU, _declare)


def supports(pool_k: torch.Tensor, num_q_heads: int) -> bool:
    """Whether ``decode`` can run over this pool layer view (``[pages, page_size, Hkv, D]``)."""
    _, _, hkv, d = pool_k.shape
    return (pool_k.device.type == "cpu" and pool_k.dtype in (torch.float32, torch.bfloat16) and d % 16 == 0
            and d <= 128 and num_q_heads % hkv == 0 and num_q_heads // hkv <= 8
            and pool_k.stride()[1:] == (hkv * d, d, 1) and native() is not None)


def decode(q: torch.Tensor, pool_k: torch.Tensor, pool_v: torch.Tensor, table: torch.Tensor, lens: torch.Tensor,
           scale: float) -> torch.Tensor:
    """q ``[B, Hq, D]``; pool_k/pool_v ``[pages, page_size, Hkv, D]`` (one layer's strided views);
    table ``[B, P]`` int64 page ids; lens ``[B]`` int64 -> ``[B, Hq, D]`` in q's dtype."""
    b, hq, d = q.shape
    _, ps, hkv, _ = pool_k.shape
    qf = q.float().contiguous()
    out = torch.empty(b, hq, d, dtype=torch.float32)
    err = native().decode_attention(qf.data_ptr(), pool_k.data_ptr(), pool_v.data_ptr(),
                                    int(pool_k.dtype == torch.bfloat16), pool_k.stride(0), table.data_ptr(),
                                    table.shape[1], lens.data_ptr(), b, hq, hkv, d, ps, scale, out.data_ptr(),
                                    torch.get_num_threads())
    if err:
        raise MemoryError("decode_attention: out of memory for the scores")
    return out.to(q.dtype)
