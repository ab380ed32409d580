// MoE routing kernels for mindport's "cpu" backend (MindSpore ops.Custom, func_type="aot").
//
// Every exported function has MindSpore's AOT signature
//   int F(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
//         void *stream, void *extra)
// where params holds the inputs, then the outputs. A nonzero return makes MindSpore raise.
//
// The "cfg" input is a float64 tensor of shape [top_k, 3]; every row is
// (norm_topk_prob, norm_eps, capacity). Its leading dimension carries top_k so that one
// Custom primitive (with shape-inferring callables) serves every top_k.
//
// Exported kernels:
//   MoeGatingPermute(logits f32[T,E], hidden [T,H], cfg) ->
//       weights f32[T,k], experts i32[T,k], permuted [T*k,H], slot_rows i32[T*k], counts i32[E]
//   MoeGatingBackward(logits f32[T,E], experts i32[T,k], grad_weights f32[T,k], cfg) -> grad_logits f32[T,E]
//   MoePermuteBackward(grad_permuted [T*k,H], slot_rows i32[T*k], cfg) -> grad_hidden [T,H]
//   MoeUnpermuteCombine(expert_out [T*k,H], slot_rows i32[T*k], weights f32[T,k]) -> out [T,H]
//   MoeCombineBackward(grad_out [T,H], expert_out [T*k,H], slot_rows i32[T*k], weights f32[T,k]) ->
//       grad_expert_out [T*k,H], grad_weights f32[T,k]
// Row tensors may be float32, float16 or bfloat16; sums are accumulated in float32.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "aot_export.h"
#include "parallel_for.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#define MR_HAVE_SSE2 1
#else
#define MR_HAVE_SSE2 0
#endif

namespace {

enum class DType { F32, F16, BF16, Bad };

DType ParseDType(const char *s) {
  if (std::strcmp(s, "float32") == 0 || std::strcmp(s, "float") == 0) return DType::F32;
  if (std::strcmp(s, "float16") == 0) return DType::F16;
  if (std::strcmp(s, "bfloat16") == 0) return DType::BF16;
  return DType::Bad;
}

size_t DTypeSize(DType d) { return d == DType::F32 ? 4 : 2; }

// ---- scalar conversions (round to nearest even, portable: no F16C assumption) ----
inline float HalfToFloat(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      int e = -1;
      do {
        ++e;
        man <<= 1;
      } while ((man & 0x400u) == 0);
      bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t FloatToHalf(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) {  // inf or nan
    return (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
  }
  if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // rounds to >= 65520: overflow
  if (ax < 0x38800000u) {                                      // below the smallest normal half
    // value = ax_float; half subnormal unit = 2^-24. Round to nearest even of value / 2^-24.
    if (ax < 0x33000000u) return (uint16_t)sign;  // < 2^-25: rounds to 0
    uint32_t e = ax >> 23;                         // biased exponent
    uint32_t m = (ax & 0x7fffffu) | 0x800000u;     // 24-bit significand
    uint32_t shift = 126u - e;                     // ax = m * 2^(e-150); want m * 2^(e-150+24)
    uint32_t q = m >> shift;
    uint32_t rem = m & ((1u << shift) - 1u);
    uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return (uint16_t)(sign | q);
  }
  uint32_t q = ((ax >> 13) - (112u << 10));
  uint32_t rem = ax & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (q & 1u))) ++q;
  return (uint16_t)(sign | q);
}

inline float BF16ToFloat(uint16_t h) {
  uint32_t bits = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t FloatToBF16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);  // quiet nan
  uint32_t lsb = (x >> 16) & 1u;
  x += 0x7fffu + lsb;
  return (uint16_t)(x >> 16);
}

// Load a row of n elements of dtype d into float buffer dst.
inline void LoadRow(const void *src, DType d, int64_t n, float *dst) {
  if (d == DType::F32) {
    std::memcpy(dst, src, (size_t)n * 4);
  } else if (d == DType::F16) {
    const uint16_t *s = static_cast<const uint16_t *>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] = HalfToFloat(s[i]);
  } else {
    const uint16_t *s = static_cast<const uint16_t *>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] = BF16ToFloat(s[i]);
  }
}

// acc += w * row (row of dtype d).
inline void AxpyRow(float *acc, float w, const void *src, DType d, int64_t n) {
  if (d == DType::F32) {
    const float *s = static_cast<const float *>(src);
    for (int64_t i = 0; i < n; ++i) acc[i] += w * s[i];
  } else if (d == DType::F16) {
    const uint16_t *s = static_cast<const uint16_t *>(src);
    for (int64_t i = 0; i < n; ++i) acc[i] += w * HalfToFloat(s[i]);
  } else {
    const uint16_t *s = static_cast<const uint16_t *>(src);
    for (int64_t i = 0; i < n; ++i) acc[i] += w * BF16ToFloat(s[i]);
  }
}

// acc = w * row.
inline void ScaleRow(float *acc, float w, const void *src, DType d, int64_t n) {
  if (d == DType::F32) {
    const float *s = static_cast<const float *>(src);
    for (int64_t i = 0; i < n; ++i) acc[i] = w * s[i];
  } else if (d == DType::F16) {
    const uint16_t *s = static_cast<const uint16_t *>(src);
    for (int64_t i = 0; i < n; ++i) acc[i] = w * HalfToFloat(s[i]);
  } else {
    const uint16_t *s = static_cast<const uint16_t *>(src);
    for (int64_t i = 0; i < n; ++i) acc[i] = w * BF16ToFloat(s[i]);
  }
}

// Copy bytes to a destination that will not be read again soon: non-temporal stores where
// possible (no read-for-ownership of the destination), plain memcpy otherwise.
inline void StreamCopy(void *dst, const void *src, size_t bytes) {
#if MR_HAVE_SSE2
  char *d = static_cast<char *>(dst);
  const char *s = static_cast<const char *>(src);
  size_t head = (16u - ((uintptr_t)d & 15u)) & 15u;
  if (bytes < 256 || head > bytes) {
    std::memcpy(dst, src, bytes);
    return;
  }
  if (head) {
    std::memcpy(d, s, head);
    d += head;
    s += head;
    bytes -= head;
  }
  size_t n64 = bytes / 64;
  for (size_t i = 0; i < n64; ++i) {
    __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i *>(s));
    __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i *>(s + 16));
    __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i *>(s + 32));
    __m128i e = _mm_loadu_si128(reinterpret_cast<const __m128i *>(s + 48));
    _mm_stream_si128(reinterpret_cast<__m128i *>(d), a);
    _mm_stream_si128(reinterpret_cast<__m128i *>(d + 16), b);
    _mm_stream_si128(reinterpret_cast<__m128i *>(d + 32), c);
    _mm_stream_si128(reinterpret_cast<__m128i *>(d + 48), e);
    d += 64;
    s += 64;
  }
  bytes -= n64 * 64;
  size_t n16 = bytes / 16;
  for (size_t i = 0; i < n16; ++i) {
    _mm_stream_si128(reinterpret_cast<__m128i *>(d), _mm_loadu_si128(reinterpret_cast<const __m128i *>(s)));
    d += 16;
    s += 16;
  }
  bytes -= n16 * 16;
  if (bytes) std::memcpy(d, s, bytes);
#else
  std::memcpy(dst, src, bytes);
#endif
}

inline void StreamZero(void *dst, size_t bytes) {
#if MR_HAVE_SSE2
  char *d = static_cast<char *>(dst);
  size_t head = (16u - ((uintptr_t)d & 15u)) & 15u;
  if (bytes < 256 || head > bytes) {
    std::memset(dst, 0, bytes);
    return;
  }
  if (head) {
    std::memset(d, 0, head);
    d += head;
    bytes -= head;
  }
  const __m128i z = _mm_setzero_si128();
  size_t n16 = bytes / 16;
  for (size_t i = 0; i < n16; ++i) {
    _mm_stream_si128(reinterpret_cast<__m128i *>(d), z);
    d += 16;
  }
  bytes -= n16 * 16;
  if (bytes) std::memset(d, 0, bytes);
#else
  std::memset(dst, 0, bytes);
#endif
}

inline void StreamFence() {
#if MR_HAVE_SSE2
  _mm_sfence();
#endif
}

// Store a float accumulator row into a destination row of dtype d.
inline void StoreRow(void *dst, DType d, const float *acc, int64_t n) {
  if (d == DType::F32) {
    StreamCopy(dst, acc, (size_t)n * 4);
  } else if (d == DType::F16) {
    uint16_t *o = static_cast<uint16_t *>(dst);
    for (int64_t i = 0; i < n; ++i) o[i] = FloatToHalf(acc[i]);
  } else {
    uint16_t *o = static_cast<uint16_t *>(dst);
    for (int64_t i = 0; i < n; ++i) o[i] = FloatToBF16(acc[i]);
  }
}

// Threads for a memory-bound loop over `bytes`: one core streams ~64 MB in ~5 ms, and below that
// starting threads costs more than it saves. Inside a compiled MindSpore graph the runtime's own
// workers hold the cores, so a thread started per call waits for one: measured on 2 cores at the
// Mixtral training shape (T 1024, H 512, top-2: 4-10 MB per kernel), one MoE layer's routing and
// combine took 1.2-1.5 ms forward + backward on one thread and 7.8-11.9 ms on two.
int NumThreads(double bytes) { return mindport::ThreadsFor(bytes, (double)(64 << 20)); }

// fn(begin, end) over [0, n) in about 16 chunks per thread.
template <typename F>
void ParallelFor(int64_t n, int nthreads, F fn) {
  mindport::ParallelFor(n, nthreads, n / ((int64_t)std::max(1, nthreads) * 16), fn);
}

// Every slot row must be -1 or a row of the N-row tensor.
bool RowsInRange(const int32_t *slot_rows, int64_t n, int64_t rows) {
  for (int64_t s = 0; s < n; ++s)
    if (slot_rows[s] < -1 || slot_rows[s] >= rows) return false;
  return true;
}

struct Cfg {
  bool norm;
  float eps;
  int64_t capacity;
};

bool ReadCfg(const double *cfg, Cfg *out) {
  out->norm = cfg[0] != 0.0;
  out->eps = (float)cfg[1];
  double c = cfg[2];
  if (!(c >= 0.0)) return false;
  out->capacity = (int64_t)c;
  return true;
}

// Softmax of one row in float32 (max-subtracted; sum in double, divide in float).
inline void SoftmaxRow(const float *x, int64_t n, float *p) {
  float m = x[0];
  for (int64_t i = 1; i < n; ++i) m = x[i] > m ? x[i] : m;
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    p[i] = std::exp(x[i] - m);
    s += p[i];
  }
  float fs = (float)s;
  for (int64_t i = 0; i < n; ++i) p[i] = p[i] / fs;
}

}  // namespace

static int MoeGatingPermuteBody(int nparam, void **params, int *ndims, int64_t **shapes,
                                const char **dtypes, void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 8 || ndims[0] != 2 || ndims[1] != 2 || ndims[2] != 2) return 1;
  const float *logits = static_cast<const float *>(params[0]);
  const char *hidden = static_cast<const char *>(params[1]);
  const double *cfgp = static_cast<const double *>(params[2]);
  float *weights = static_cast<float *>(params[3]);
  int32_t *experts = static_cast<int32_t *>(params[4]);
  char *permuted = static_cast<char *>(params[5]);
  int32_t *slot_rows = static_cast<int32_t *>(params[6]);
  int32_t *counts = static_cast<int32_t *>(params[7]);
  if (std::strcmp(dtypes[0], "float32") != 0) return 2;
  DType hd = ParseDType(dtypes[1]);
  if (hd == DType::Bad) return 3;
  const int64_t T = shapes[0][0], E = shapes[0][1], H = shapes[1][1], K = shapes[2][0];
  if (shapes[1][0] != T || K < 1 || K > E) return 4;
  Cfg cfg;
  if (!ReadCfg(cfgp, &cfg)) return 5;
  const int64_t N = T * K;
  const size_t row_bytes = (size_t)H * DTypeSize(hd);

  // 1) softmax -> top-k (descending prob, ties to the lower expert index) -> renormalise.
  auto gate = [&](int64_t t0, int64_t t1) {
    std::vector<float> p(E), key(E);
    std::vector<int32_t> idx(E);
    for (int64_t t = t0; t < t1; ++t) {
      SoftmaxRow(logits + t * E, E, p.data());
      for (int64_t e = 0; e < E; ++e) {
        idx[e] = (int32_t)e;
        key[e] = std::isnan(p[e]) ? -1.0f : p[e];  // a NaN sorts last (keeps the order strict-weak)
      }
      auto better = [&](int32_t a, int32_t b) { return key[a] > key[b] || (key[a] == key[b] && a < b); };
      if (K < E) {
        std::partial_sort(idx.begin(), idx.begin() + K, idx.end(), better);
      } else {
        std::sort(idx.begin(), idx.end(), better);
      }
      float *w = weights + t * K;
      int32_t *ex = experts + t * K;
      float s = 0.f;
      for (int64_t j = 0; j < K; ++j) {
        ex[j] = idx[j];
        w[j] = p[idx[j]];
        s += w[j];
      }
      if (cfg.norm) {
        float d = s + cfg.eps;
        for (int64_t j = 0; j < K; ++j) w[j] = w[j] / d;
      }
    }
  };
  ParallelFor(T, NumThreads((double)T * E * 64), gate);

  // 2) counts, capacity, and the permuted row of every slot (stable in slot order).
  std::vector<int64_t> total(E, 0), offset(E, 0), seen(E, 0);
  for (int64_t s = 0; s < N; ++s) ++total[experts[s]];
  int64_t kept_total = 0;
  for (int64_t e = 0; e < E; ++e) {
    int64_t c = cfg.capacity > 0 ? std::min(total[e], cfg.capacity) : total[e];
    counts[e] = (int32_t)c;
    offset[e] = kept_total;
    kept_total += c;
  }
  for (int64_t s = 0; s < N; ++s) {
    int32_t e = experts[s];
    int64_t r = seen[e]++;
    slot_rows[s] = (cfg.capacity > 0 && r >= cfg.capacity) ? -1 : (int32_t)(offset[e] + r);
  }

  // 3) move the rows: each token row is read once and written to its kept slots.
  const int nt = NumThreads((double)N * row_bytes);
  ParallelFor(T, nt, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const char *src = hidden + t * row_bytes;
      for (int64_t j = 0; j < K; ++j) {
        int32_t r = slot_rows[t * K + j];
        if (r >= 0) StreamCopy(permuted + (size_t)r * row_bytes, src, row_bytes);
      }
    }
    StreamFence();
  });
  // zero the rows after the kept total
  const int64_t tail = N - kept_total;
  ParallelFor(tail, NumThreads((double)tail * row_bytes), [&](int64_t r0, int64_t r1) {
    StreamZero(permuted + (size_t)(kept_total + r0) * row_bytes, (size_t)(r1 - r0) * row_bytes);
    StreamFence();
  });
  return 0;
}

static int MoeGatingBackwardBody(int nparam, void **params, int *ndims, int64_t **shapes,
                                 const char **dtypes, void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 5 || ndims[0] != 2 || ndims[1] != 2 || ndims[2] != 2) return 1;
  const float *logits = static_cast<const float *>(params[0]);
  const int32_t *experts = static_cast<const int32_t *>(params[1]);
  const float *gw = static_cast<const float *>(params[2]);
  const double *cfgp = static_cast<const double *>(params[3]);
  float *gl = static_cast<float *>(params[4]);
  if (std::strcmp(dtypes[0], "float32") != 0 || std::strcmp(dtypes[2], "float32") != 0) return 2;
  const int64_t T = shapes[0][0], E = shapes[0][1], K = shapes[1][1];
  Cfg cfg;
  if (!ReadCfg(cfgp, &cfg)) return 5;
  ParallelFor(T, NumThreads((double)T * E * 64), [&](int64_t t0, int64_t t1) {
    std::vector<float> p(E), dp(E);
    std::vector<float> dw(K);
    for (int64_t t = t0; t < t1; ++t) {
      SoftmaxRow(logits + t * E, E, p.data());
      const int32_t *ex = experts + t * K;
      const float *g = gw + t * K;
      if (cfg.norm) {
        // y_j = w_j / D with D = sum(w) + eps:  dL/dw_i = (g_i - sum_j g_j y_j) / D
        float s = 0.f;
        for (int64_t j = 0; j < K; ++j) s += p[ex[j]];
        float d = s + cfg.eps;
        double gy = 0.0;
        for (int64_t j = 0; j < K; ++j) gy += (double)g[j] * (double)(p[ex[j]] / d);
        for (int64_t j = 0; j < K; ++j) dw[j] = (float)(((double)g[j] - gy) / (double)d);
      } else {
        for (int64_t j = 0; j < K; ++j) dw[j] = g[j];
      }
      std::fill(dp.begin(), dp.end(), 0.f);
      for (int64_t j = 0; j < K; ++j) dp[ex[j]] += dw[j];
      // softmax Jacobian-vector product: dl = p * (dp - <p, dp>)
      double pdp = 0.0;
      for (int64_t j = 0; j < K; ++j) pdp += (double)p[ex[j]] * (double)dw[j];
      float fpdp = (float)pdp;
      float *o = gl + t * E;
      for (int64_t e = 0; e < E; ++e) o[e] = p[e] * (dp[e] - fpdp);
    }
  });
  return 0;
}

// out_row = sum_m w[m] * src[m] for float32 rows, the sum kept in registers across the m source
// rows (16 floats at a time) and streamed to the destination: each byte is read once and written
// once, in the same order of additions as a sequential sum over m (0 + w0*x0 + w1*x1 + ...).
static void WeightedSumRowF32(const float *const *src, const float *w, int m, int64_t H, float *out) {
  int64_t h = 0;
#if MR_HAVE_SSE2
  if (((uintptr_t)out & 15u) == 0) {
    for (; h + 16 <= H; h += 16) {
      __m128 a0 = _mm_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int j = 0; j < m; ++j) {
        const float *x = src[j] + h;
        const __m128 wj = _mm_set1_ps(w[j]);
        a0 = _mm_add_ps(a0, _mm_mul_ps(wj, _mm_loadu_ps(x)));
        a1 = _mm_add_ps(a1, _mm_mul_ps(wj, _mm_loadu_ps(x + 4)));
        a2 = _mm_add_ps(a2, _mm_mul_ps(wj, _mm_loadu_ps(x + 8)));
        a3 = _mm_add_ps(a3, _mm_mul_ps(wj, _mm_loadu_ps(x + 12)));
      }
      _mm_stream_ps(out + h, a0);
      _mm_stream_ps(out + h + 4, a1);
      _mm_stream_ps(out + h + 8, a2);
      _mm_stream_ps(out + h + 12, a3);
    }
  }
#endif
  for (; h + 16 <= H; h += 16) {
    float a[16] = {0.f};
    for (int j = 0; j < m; ++j) {
      const float *x = src[j] + h;
      for (int u = 0; u < 16; ++u) a[u] += w[j] * x[u];
    }
    std::memcpy(out + h, a, sizeof(a));
  }
  for (; h < H; ++h) {
    float a = 0.f;
    for (int j = 0; j < m; ++j) a += w[j] * src[j][h];
    out[h] = a;
  }
}

// out[t] = sum_j w[t,j] * rows[slot_rows[t*K+j]] (w == nullptr means 1), dropped slots skipped.
static int CombineImpl(const char *rows, DType d, const int32_t *slot_rows, const float *w, int64_t T, int64_t K,
                       int64_t H, char *out) {
  const size_t row_bytes = (size_t)H * DTypeSize(d);
  ParallelFor(T, NumThreads((double)T * (K + 1) * row_bytes), [&](int64_t t0, int64_t t1) {
    std::vector<const float *> src(K);
    std::vector<float> wk(K), acc(d == DType::F32 ? 0 : H);
    for (int64_t t = t0; t < t1; ++t) {
      if (d == DType::F32) {
        int m = 0;
        for (int64_t j = 0; j < K; ++j) {
          int32_t r = slot_rows[t * K + j];
          if (r < 0) continue;
          src[m] = reinterpret_cast<const float *>(rows + (size_t)r * row_bytes);
          wk[m++] = w ? w[t * K + j] : 1.0f;
        }
        WeightedSumRowF32(src.data(), wk.data(), m, H, reinterpret_cast<float *>(out + (size_t)t * row_bytes));
        continue;
      }
      bool first = true;
      for (int64_t j = 0; j < K; ++j) {
        int32_t r = slot_rows[t * K + j];
        if (r < 0) continue;
        float wj = w ? w[t * K + j] : 1.0f;
        if (first) {
          ScaleRow(acc.data(), wj, rows + (size_t)r * row_bytes, d, H);
          first = false;
        } else {
          AxpyRow(acc.data(), wj, rows + (size_t)r * row_bytes, d, H);
        }
      }
      if (first) std::fill(acc.begin(), acc.end(), 0.f);
      StoreRow(out + (size_t)t * row_bytes, d, acc.data(), H);
    }
    StreamFence();
  });
  return 0;
}

static int MoePermuteBackwardBody(int nparam, void **params, int *ndims, int64_t **shapes,
                                  const char **dtypes, void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 4 || ndims[0] != 2 || ndims[1] != 1 || ndims[2] != 2) return 1;
  DType d = ParseDType(dtypes[0]);
  if (d == DType::Bad || std::strcmp(dtypes[0], dtypes[3]) != 0) return 3;
  const int64_t N = shapes[0][0], H = shapes[0][1], K = shapes[2][0];
  if (K < 1 || N % K != 0 || shapes[1][0] != N) return 4;
  if (!RowsInRange(static_cast<const int32_t *>(params[1]), N, N)) return 6;
  return CombineImpl(static_cast<const char *>(params[0]), d, static_cast<const int32_t *>(params[1]), nullptr, N / K,
                     K, H, static_cast<char *>(params[3]));
}

static int MoeUnpermuteCombineBody(int nparam, void **params, int *ndims, int64_t **shapes,
                                   const char **dtypes, void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 4 || ndims[0] != 2 || ndims[1] != 1 || ndims[2] != 2) return 1;
  DType d = ParseDType(dtypes[0]);
  if (d == DType::Bad || std::strcmp(dtypes[2], "float32") != 0) return 3;
  const int64_t N = shapes[0][0], H = shapes[0][1], T = shapes[2][0], K = shapes[2][1];
  if (T * K != N || shapes[1][0] != N) return 4;
  if (!RowsInRange(static_cast<const int32_t *>(params[1]), N, N)) return 6;
  return CombineImpl(static_cast<const char *>(params[0]), d, static_cast<const int32_t *>(params[1]),
                     static_cast<const float *>(params[2]), T, K, H, static_cast<char *>(params[3]));
}

// One pass over a float32 row x: returns dot(g, x) (float partial sums, added in double) and
// streams y = w * g to out.
static float DotScaleRowF32(const float *g, const float *x, float w, int64_t H, float *out) {
  double dot = 0.0;
  int64_t h = 0;
#if MR_HAVE_SSE2
  if (((uintptr_t)out & 15u) == 0) {
    const __m128 wv = _mm_set1_ps(w);
    __m128 d0 = _mm_setzero_ps(), d1 = d0, d2 = d0, d3 = d0;
    for (; h + 16 <= H; h += 16) {
      __m128 g0 = _mm_loadu_ps(g + h), g1 = _mm_loadu_ps(g + h + 4);
      __m128 g2 = _mm_loadu_ps(g + h + 8), g3 = _mm_loadu_ps(g + h + 12);
      d0 = _mm_add_ps(d0, _mm_mul_ps(g0, _mm_loadu_ps(x + h)));
      d1 = _mm_add_ps(d1, _mm_mul_ps(g1, _mm_loadu_ps(x + h + 4)));
      d2 = _mm_add_ps(d2, _mm_mul_ps(g2, _mm_loadu_ps(x + h + 8)));
      d3 = _mm_add_ps(d3, _mm_mul_ps(g3, _mm_loadu_ps(x + h + 12)));
      _mm_stream_ps(out + h, _mm_mul_ps(wv, g0));
      _mm_stream_ps(out + h + 4, _mm_mul_ps(wv, g1));
      _mm_stream_ps(out + h + 8, _mm_mul_ps(wv, g2));
      _mm_stream_ps(out + h + 12, _mm_mul_ps(wv, g3));
    }
    float part[16];
    _mm_storeu_ps(part, d0);
    _mm_storeu_ps(part + 4, d1);
    _mm_storeu_ps(part + 8, d2);
    _mm_storeu_ps(part + 12, d3);
    for (int u = 0; u < 16; ++u) dot += part[u];
  }
#endif
  float part[8] = {0.f};
  for (; h + 8 <= H; h += 8) {
    for (int u = 0; u < 8; ++u) {
      part[u] += g[h + u] * x[h + u];
      out[h + u] = w * g[h + u];
    }
  }
  for (int u = 0; u < 8; ++u) dot += part[u];
  for (; h < H; ++h) {
    dot += (double)g[h] * x[h];
    out[h] = w * g[h];
  }
  return (float)dot;
}

static int MoeCombineBackwardBody(int nparam, void **params, int *ndims, int64_t **shapes,
                                  const char **dtypes, void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 6 || ndims[0] != 2 || ndims[1] != 2 || ndims[2] != 1 || ndims[3] != 2) return 1;
  const char *gout = static_cast<const char *>(params[0]);
  const char *eo = static_cast<const char *>(params[1]);
  const int32_t *slot_rows = static_cast<const int32_t *>(params[2]);
  const float *w = static_cast<const float *>(params[3]);
  char *geo = static_cast<char *>(params[4]);
  float *gw = static_cast<float *>(params[5]);
  DType d = ParseDType(dtypes[1]);
  if (d == DType::Bad || std::strcmp(dtypes[0], dtypes[1]) != 0) return 3;
  const int64_t N = shapes[1][0], H = shapes[1][1], T = shapes[3][0], K = shapes[3][1];
  if (T * K != N || shapes[0][0] != T) return 4;
  const size_t row_bytes = (size_t)H * DTypeSize(d);
  if (shapes[2][0] != N || !RowsInRange(slot_rows, N, N)) return 6;
  // As produced by MoeGatingPermute, rows [0, kept) are each referenced by exactly one kept slot
  // and the rest get a zero gradient. Otherwise (slot_rows from elsewhere) scatter-add serially.
  int64_t kept = 0;
  bool bijective = true;
  {
    std::vector<uint8_t> hit(N, 0);
    for (int64_t s = 0; s < N; ++s) {
      int32_t r = slot_rows[s];
      if (r < 0) continue;
      ++kept;
      if (hit[r]) bijective = false;
      hit[r] = 1;
    }
    for (int64_t r = 0; r < kept && bijective; ++r) bijective = hit[r] != 0;
  }
  if (!bijective) {
    std::vector<float> g(H), acc(H);
    std::vector<float> accum((size_t)N * H, 0.f);  // float32 sums, rounded once at the end
    for (int64_t s = 0; s < N; ++s) {
      int64_t t = s / K;
      int32_t r = slot_rows[s];
      LoadRow(gout + (size_t)t * row_bytes, d, H, g.data());
      if (r < 0) {
        gw[s] = 0.f;
        continue;
      }
      LoadRow(eo + (size_t)r * row_bytes, d, H, acc.data());
      double dot = 0.0;
      for (int64_t h = 0; h < H; ++h) dot += (double)g[h] * acc[h];
      gw[s] = (float)dot;
      for (int64_t h = 0; h < H; ++h) accum[(size_t)r * H + h] += w[s] * g[h];
    }
    for (int64_t r = 0; r < N; ++r) StoreRow(geo + (size_t)r * row_bytes, d, accum.data() + (size_t)r * H, H);
    StreamFence();
    return 0;
  }
  ParallelFor(T, NumThreads((double)T * (2 * K + 1) * row_bytes), [&](int64_t t0, int64_t t1) {
    std::vector<float> g(H), x(H), y(H);
    for (int64_t t = t0; t < t1; ++t) {
      if (d != DType::F32) LoadRow(gout + (size_t)t * row_bytes, d, H, g.data());
      for (int64_t j = 0; j < K; ++j) {
        int32_t r = slot_rows[t * K + j];
        if (r < 0) {
          gw[t * K + j] = 0.f;
          continue;
        }
        const char *src = eo + (size_t)r * row_bytes;
        const float wj = w[t * K + j];
        if (d == DType::F32) {
          gw[t * K + j] = DotScaleRowF32(reinterpret_cast<const float *>(gout + (size_t)t * row_bytes),
                                         reinterpret_cast<const float *>(src), wj, H,
                                         reinterpret_cast<float *>(geo + (size_t)r * row_bytes));
          continue;
        }
        LoadRow(src, d, H, x.data());
        double dot = 0.0;
        for (int64_t h = 0; h < H; ++h) dot += (double)g[h] * x[h];
        gw[t * K + j] = (float)dot;
        for (int64_t h = 0; h < H; ++h) y[h] = wj * g[h];
        StoreRow(geo + (size_t)r * row_bytes, d, y.data(), H);
      }
    }
    StreamFence();
  });
  const int64_t tail = N - kept;
  ParallelFor(tail, NumThreads((double)tail * row_bytes), [&](int64_t r0, int64_t r1) {
    StreamZero(geo + (size_t)(kept + r0) * row_bytes, (size_t)(r1 - r0) * row_bytes);
    StreamFence();
  });
  return 0;
}

extern "C" {
MINDPORT_EXPORT(MoeGatingPermute)
MINDPORT_EXPORT(MoeGatingBackward)
MINDPORT_EXPORT(MoePermuteBackward)
MINDPORT_EXPORT(MoeUnpermuteCombine)
MINDPORT_EXPORT(MoeCombineBackward)
}  // extern "C"
