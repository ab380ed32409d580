// Ring-attention block kernels for mindport's "cpu" backend (MindSpore ops.Custom, func_type="aot").
//
// Every exported function has MindSpore's AOT signature
//   int F(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
//         void *stream, void *extra)
// where params holds the inputs, then the outputs. A nonzero return makes MindSpore raise.
// All tensors are float32 and contiguous (the Python wrapper casts).
//
// Notation: B batch, N query heads, Nkv key/value heads (N % Nkv == 0, G = N / Nkv), Sq query
// rows, Sk key rows, D head dim. Query head h reads key/value head h / G (grouped-query
// attention without copying K/V). "cfg" is float64 [2] = (scale, causal).
// causal = 1 means diagonal-causal aligned at the bottom right: query i sees keys j <= i + Sk - Sq
// (the Python wrapper requires Sq <= Sk, so every row sees at least one key).
//
//   RingBlockForward(q[B,N,Sq,D], k[B,Nkv,Sk,D], v[B,Nkv,Sk,D], cfg) -> out[B,N,Sq,D], lse[B,N,Sq]
//       out = softmax(scale q k^T) v, lse = log sum_j exp(scale q_i.k_j), streamed over key tiles
//       with a running max (online softmax), so the score matrix is never materialised.
//   RingBlockBackward(q, k, v, out, lse, dout, dlse, cfg) -> dq, dk, dv
//       p_ij = exp(scale q_i.k_j - lse_i), delta_i = dout_i.out_i - dlse_i,
//       ds_ij = p_ij (dout_i.v_j - delta_i); dq = scale ds k, dk = scale ds^T q, dv = p^T dout.
//       lse and out may be the merged (global) ones: then p is this block's share of the global
//       softmax and the gradients are this block's share of the global gradients (ring backward).
//   LseMerge(o1[R,D], l1[R], o2[R,D], l2[R]) -> o[R,D], l[R]     (R = any number of rows)
//       l = log(exp l1 + exp l2), o = exp(l1 - l) o1 + exp(l2 - l) o2.
//   LseMergeBackward(o1, l1, o2, l2, dout, dlse) -> do1, dl1, do2, dl2
//       w_k = exp(l_k - l): do_k = w_k dout, dl_k = w_k (dout.(o_k - o) + dlse).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

#include "aot_export.h"
#include "parallel_for.h"

namespace {

constexpr int64_t kTileQ = 32;  // query rows per tile
constexpr int64_t kTileK = 64;  // key rows per tile
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// The hot loops are compiled twice on x86-64 (AVX2+FMA and the baseline) and the loader picks the
// clone for the running CPU, so the cached library stays valid on any x86-64 machine.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RA_VECTOR_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define RA_VECTOR_CLONES
#endif

bool IsF32(const char *s) { return std::strcmp(s, "float32") == 0 || std::strcmp(s, "float") == 0; }

// Threads for `flops` of work: starting them is not worth it for tiny blocks.
int NumThreads(double flops) { return mindport::ThreadsFor(flops, 4e6); }

// fn(item) for every item of [0, n), one item at a time from a shared counter.
template <typename F>
void ParallelFor(int64_t n, int nthreads, F fn) {
  mindport::ParallelFor(n, nthreads, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) fn(i);
  });
}

struct Geometry {
  int64_t B, N, Nkv, G, Sq, Sk, D;
  float scale;
  bool causal;
  int64_t offset;  // Sk - Sq: query i sees keys j <= i + offset when causal
  // last key (exclusive) visible from query row i
  int64_t KeyEnd(int64_t i) const { return causal ? std::min(Sk, i + offset + 1) : Sk; }
};

bool ReadGeometry(int nparam_min, int nparam, int *ndims, int64_t **shapes, const char **dtypes, void **params,
                  int cfg_index, Geometry *g) {
  if (nparam < nparam_min || ndims[0] != 4 || ndims[1] != 4 || ndims[2] != 4) return false;
  for (int i = 0; i < nparam; ++i)
    if (i != cfg_index && !IsF32(dtypes[i])) return false;
  if (std::strcmp(dtypes[cfg_index], "float64") != 0 || shapes[cfg_index][0] != 2) return false;
  g->B = shapes[0][0];
  g->N = shapes[0][1];
  g->Sq = shapes[0][2];
  g->D = shapes[0][3];
  g->Nkv = shapes[1][1];
  g->Sk = shapes[1][2];
  if (shapes[1][0] != g->B || shapes[1][3] != g->D || g->Nkv <= 0 || g->N % g->Nkv != 0) return false;
  for (int d = 0; d < 4; ++d)
    if (shapes[2][d] != shapes[1][d]) return false;
  g->G = g->N / g->Nkv;
  const double *cfg = static_cast<const double *>(params[cfg_index]);
  g->scale = (float)cfg[0];
  g->causal = cfg[1] != 0.0;
  g->offset = g->Sk - g->Sq;
  if (g->causal && g->offset < 0) return false;
  return true;
}

// s[i][j] = scale * dot(a_i, bT[:, j]) for a tile: a (nq x D, row stride D), bT (D x nk, row stride kTileK).
// Loop order i, d, j keeps the inner loop over j contiguous (vectorised without reassociation).
inline void TileScores(const float *a, int64_t nq, const float *bT, int64_t nk, int64_t D, float scale,
                       float *s /* nq x kTileK */) {
  for (int64_t i = 0; i < nq; ++i) {
    float *row = s + i * kTileK;
    for (int64_t j = 0; j < nk; ++j) row[j] = 0.0f;
    const float *ai = a + i * D;
    for (int64_t d = 0; d < D; ++d) {
      const float x = ai[d];
      const float *b = bT + d * kTileK;
      for (int64_t j = 0; j < nk; ++j) row[j] += x * b[j];
    }
    for (int64_t j = 0; j < nk; ++j) row[j] *= scale;
  }
}

// Copy rows [j0, j0 + nk) of x (rows of D floats) transposed into xT (D x kTileK).
inline void Transpose(const float *x, int64_t j0, int64_t nk, int64_t D, float *xT) {
  for (int64_t j = 0; j < nk; ++j) {
    const float *row = x + (j0 + j) * D;
    for (int64_t d = 0; d < D; ++d) xT[d * kTileK + j] = row[d];
  }
}

// ------------------------------------------------------------------------------- forward
struct ForwardArgs {
  const float *q, *k, *v;
  float *out, *lse;
};

// One work item = (batch, query head, query tile): streams the visible key tiles.
RA_VECTOR_CLONES
void ForwardItem(const Geometry &g, const ForwardArgs &x, int64_t item) {
  const int64_t D = g.D, Sq = g.Sq, Sk = g.Sk;
  const int64_t q_tiles = (Sq + kTileQ - 1) / kTileQ;
  const int64_t qt = item % q_tiles, bh = item / q_tiles, h = bh % g.N, b = bh / g.N;
  const int64_t i0 = qt * kTileQ, nq = std::min(kTileQ, Sq - i0);
  const float *qb = x.q + ((b * g.N + h) * Sq + i0) * D;
  const int64_t kvh = b * g.Nkv + h / g.G;
  const float *kb = x.k + kvh * Sk * D, *vb = x.v + kvh * Sk * D;
  std::vector<float> kT(D * kTileK), s(kTileQ * kTileK), acc(kTileQ * D, 0.0f);
  std::vector<float> m(kTileQ, kNegInf), l(kTileQ, 0.0f);
  const int64_t key_end = g.KeyEnd(i0 + nq - 1);  // keys beyond this are masked for the whole tile
  for (int64_t j0 = 0; j0 < key_end; j0 += kTileK) {
    const int64_t nk = std::min(kTileK, key_end - j0);
    Transpose(kb, j0, nk, D, kT.data());
    TileScores(qb, nq, kT.data(), nk, D, g.scale, s.data());
    for (int64_t i = 0; i < nq; ++i) {
      float *row = s.data() + i * kTileK;
      const int64_t visible = std::max<int64_t>(0, std::min(nk, g.KeyEnd(i0 + i) - j0));
      if (visible == 0) continue;
      float mt = row[0];
      for (int64_t j = 1; j < visible; ++j) mt = std::max(mt, row[j]);
      const float m_new = std::max(m[i], mt);
      const float alpha = std::exp(m[i] - m_new);  // 0 on the first visible tile (m = -inf)
      float sum = 0.0f;
      for (int64_t j = 0; j < visible; ++j) {
        row[j] = std::exp(row[j] - m_new);
        sum += row[j];
      }
      l[i] = l[i] * alpha + sum;
      m[i] = m_new;
      float *a = acc.data() + i * D;
      for (int64_t d = 0; d < D; ++d) a[d] *= alpha;
      for (int64_t j = 0; j < visible; ++j) {
        const float p = row[j];
        const float *vj = vb + (j0 + j) * D;
        for (int64_t d = 0; d < D; ++d) a[d] += p * vj[d];
      }
    }
  }
  float *ob = x.out + ((b * g.N + h) * Sq + i0) * D;
  float *lb = x.lse + (b * g.N + h) * Sq + i0;
  for (int64_t i = 0; i < nq; ++i) {
    const float inv = 1.0f / l[i];
    for (int64_t d = 0; d < D; ++d) ob[i * D + d] = acc[i * D + d] * inv;
    lb[i] = m[i] + std::log(l[i]);
  }
}

int RingBlockForwardBody(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                         void *, void *) {
  Geometry g;
  if (nparam != 6 || !ReadGeometry(6, nparam, ndims, shapes, dtypes, params, 3, &g)) return 1;
  if (ndims[4] != 4 || ndims[5] != 3) return 2;
  const ForwardArgs x{static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
                      static_cast<const float *>(params[2]), static_cast<float *>(params[4]),
                      static_cast<float *>(params[5])};
  const int64_t q_tiles = (g.Sq + kTileQ - 1) / kTileQ;
  const double flops = 4.0 * g.B * g.N * g.Sq * g.Sk * g.D;
  ParallelFor(g.B * g.N * q_tiles, NumThreads(flops), [&](int64_t item) { ForwardItem(g, x, item); });
  return 0;
}

// ------------------------------------------------------------------------------- backward
struct BackwardArgs {
  const float *q, *k, *v, *out, *lse, *dout, *dlse;
  float *dk, *dv;
};

// One work item = (batch, kv head, key tile): owns those dk/dv rows, loops over the G query heads
// that read them and adds its dq contributions into dq_acc.
RA_VECTOR_CLONES
void BackwardItem(const Geometry &g, const BackwardArgs &x, int64_t item, float *dq_acc) {
  const int64_t D = g.D, Sq = g.Sq, Sk = g.Sk;
  const int64_t k_tiles = (Sk + kTileK - 1) / kTileK;
  const int64_t kt = item % k_tiles, bg = item / k_tiles, kvh = bg % g.Nkv, b = bg / g.Nkv;
  const int64_t j0 = kt * kTileK, nk = std::min(kTileK, Sk - j0);
  const float *kb = x.k + (b * g.Nkv + kvh) * Sk * D, *vb = x.v + (b * g.Nkv + kvh) * Sk * D;
  float *dkb = x.dk + ((b * g.Nkv + kvh) * Sk + j0) * D, *dvb = x.dv + ((b * g.Nkv + kvh) * Sk + j0) * D;
  std::vector<float> kT(D * kTileK), vT(D * kTileK), p(kTileQ * kTileK), dp(kTileQ * kTileK);
  std::fill(dkb, dkb + nk * D, 0.0f);
  std::fill(dvb, dvb + nk * D, 0.0f);
  Transpose(kb, j0, nk, D, kT.data());
  Transpose(vb, j0, nk, D, vT.data());
  // first query row that sees key j0 when causal: i + offset >= j0
  const int64_t i_first = g.causal ? std::max<int64_t>(0, j0 - g.offset) : 0;
  for (int64_t hh = 0; hh < g.G; ++hh) {
    const int64_t qrow = (b * g.N + kvh * g.G + hh) * Sq;
    for (int64_t i0 = i_first / kTileQ * kTileQ; i0 < Sq; i0 += kTileQ) {
      const int64_t nq = std::min(kTileQ, Sq - i0);
      const float *qb = x.q + (qrow + i0) * D, *ob = x.out + (qrow + i0) * D, *gb = x.dout + (qrow + i0) * D;
      TileScores(qb, nq, kT.data(), nk, D, g.scale, p.data());
      TileScores(gb, nq, vT.data(), nk, D, 1.0f, dp.data());
      for (int64_t i = 0; i < nq; ++i) {
        float *pr = p.data() + i * kTileK, *dsr = dp.data() + i * kTileK;
        const int64_t visible = std::max<int64_t>(0, std::min(nk, g.KeyEnd(i0 + i) - j0));
        if (visible == 0) continue;
        const float l = x.lse[qrow + i0 + i];
        const float *gi = gb + i * D, *qi = qb + i * D, *oi = ob + i * D;
        float delta = -x.dlse[qrow + i0 + i];
        for (int64_t d = 0; d < D; ++d) delta += gi[d] * oi[d];
        for (int64_t j = 0; j < visible; ++j) {
          pr[j] = std::exp(pr[j] - l);
          dsr[j] = pr[j] * (dsr[j] - delta) * g.scale;  // scaled ds
        }
        float *dqi = dq_acc + (qrow + i0 + i) * D;
        for (int64_t j = 0; j < visible; ++j) {
          const float pj = pr[j], dsj = dsr[j];
          float *dvj = dvb + j * D, *dkj = dkb + j * D;
          const float *kj = kb + (j0 + j) * D;
          for (int64_t d = 0; d < D; ++d) {
            dvj[d] += pj * gi[d];
            dkj[d] += dsj * qi[d];
            dqi[d] += dsj * kj[d];
          }
        }
      }
    }
  }
}

int RingBlockBackwardBody(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                          void *, void *) {
  // inputs: q, k, v, out, lse, dout, dlse, cfg; outputs: dq, dk, dv
  Geometry g;
  if (nparam != 11 || !ReadGeometry(11, nparam, ndims, shapes, dtypes, params, 7, &g)) return 1;
  for (int i : {3, 5})  // out, dout: like q
    if (ndims[i] != 4 || !std::equal(shapes[i], shapes[i] + 4, shapes[0])) return 2;
  for (int i : {4, 6})  // lse, dlse: q without D
    if (ndims[i] != 3 || !std::equal(shapes[i], shapes[i] + 3, shapes[0])) return 2;
  const BackwardArgs x{static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
                       static_cast<const float *>(params[2]), static_cast<const float *>(params[3]),
                       static_cast<const float *>(params[4]), static_cast<const float *>(params[5]),
                       static_cast<const float *>(params[6]), static_cast<float *>(params[9]),
                       static_cast<float *>(params[10])};
  float *dq = static_cast<float *>(params[8]);
  const int64_t D = g.D, Sq = g.Sq, Sk = g.Sk;
  const int64_t k_tiles = (Sk + kTileK - 1) / kTileK;
  const int64_t items = g.B * g.Nkv * k_tiles;
  const int64_t dq_size = g.B * g.N * Sq * D;
  // One work item = (batch, kv head, key tile): it owns those dk/dv rows and loops over the G query
  // heads that read them. Items are dealt to threads round-robin (item t -> thread t % nt, which
  // balances causal blocks); each thread adds into its own dq buffer and the buffers are summed in
  // thread order, so the result is deterministic for a given thread count.
  const int nt = (int)std::min<int64_t>(NumThreads(10.0 * g.B * g.N * Sq * Sk * D), std::max<int64_t>(1, items));
  std::fill(dq, dq + dq_size, 0.0f);
  std::vector<std::vector<float>> dq_private(nt > 1 ? nt - 1 : 0);
  auto run = [&](int tid) {
    float *dq_acc = dq;
    if (tid > 0) {
      dq_private[tid - 1].assign(dq_size, 0.0f);
      dq_acc = dq_private[tid - 1].data();
    }
    for (int64_t item = tid; item < items; item += nt) BackwardItem(g, x, item, dq_acc);
  };
  if (nt <= 1) {
    run(0);
  } else {
    std::vector<std::thread> pool;
    pool.reserve(nt - 1);
    for (int t = 1; t < nt; ++t) pool.emplace_back(run, t);
    run(0);
    for (auto &t : pool) t.join();
    for (auto &part : dq_private)
      for (int64_t e = 0; e < dq_size; ++e) dq[e] += part[e];
  }
  return 0;
}

// ------------------------------------------------------------------------------- LSE merge
bool MergeShapes(int nparam_expect, int nparam, int *ndims, int64_t **shapes, const char **dtypes, int64_t *rows,
                 int64_t *D) {
  if (nparam != nparam_expect) return false;
  for (int i = 0; i < nparam; ++i)
    if (!IsF32(dtypes[i])) return false;
  const int nd = ndims[0];
  if (nd < 1 || ndims[1] != nd - 1 || ndims[2] != nd || ndims[3] != nd - 1) return false;
  *D = shapes[0][nd - 1];
  *rows = 1;
  for (int d = 0; d < nd - 1; ++d) {
    if (shapes[1][d] != shapes[0][d] || shapes[3][d] != shapes[0][d]) return false;
    *rows *= shapes[0][d];
  }
  for (int d = 0; d < nd; ++d)
    if (shapes[2][d] != shapes[0][d]) return false;
  return true;
}

// w1, w2 and the merged lse of one row; rows where both lse are -inf merge to (0, -inf).
inline void MergeWeights(float l1, float l2, float *w1, float *w2, float *l) {
  const float m = std::max(l1, l2);
  if (m == kNegInf) {
    *w1 = *w2 = 0.0f;
    *l = kNegInf;
    return;
  }
  const float e1 = std::exp(l1 - m), e2 = std::exp(l2 - m), s = e1 + e2;
  *l = m + std::log(s);
  *w1 = e1 / s;
  *w2 = e2 / s;
}

int LseMergeBody(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  int64_t rows, D;
  if (!MergeShapes(6, nparam, ndims, shapes, dtypes, &rows, &D)) return 1;
  const float *o1 = static_cast<const float *>(params[0]), *l1 = static_cast<const float *>(params[1]);
  const float *o2 = static_cast<const float *>(params[2]), *l2 = static_cast<const float *>(params[3]);
  float *o = static_cast<float *>(params[4]), *l = static_cast<float *>(params[5]);
  for (int64_t r = 0; r < rows; ++r) {
    float w1, w2;
    MergeWeights(l1[r], l2[r], &w1, &w2, &l[r]);
    for (int64_t d = 0; d < D; ++d) o[r * D + d] = w1 * o1[r * D + d] + w2 * o2[r * D + d];
  }
  return 0;
}

int LseMergeBackwardBody(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                         void *) {
  // inputs: o1, l1, o2, l2, dout, dlse; outputs: do1, dl1, do2, dl2
  int64_t rows, D;
  if (!MergeShapes(10, nparam, ndims, shapes, dtypes, &rows, &D)) return 1;
  const float *o1 = static_cast<const float *>(params[0]), *l1 = static_cast<const float *>(params[1]);
  const float *o2 = static_cast<const float *>(params[2]), *l2 = static_cast<const float *>(params[3]);
  const float *g = static_cast<const float *>(params[4]), *gl = static_cast<const float *>(params[5]);
  float *do1 = static_cast<float *>(params[6]), *dl1 = static_cast<float *>(params[7]);
  float *do2 = static_cast<float *>(params[8]), *dl2 = static_cast<float *>(params[9]);
  for (int64_t r = 0; r < rows; ++r) {
    float w1, w2, l;
    MergeWeights(l1[r], l2[r], &w1, &w2, &l);
    const float *a = o1 + r * D, *b = o2 + r * D, *gr = g + r * D;
    // o_k - o = w_other (o_k - o_other)
    float dot = 0.0f;
    for (int64_t d = 0; d < D; ++d) {
      dot += gr[d] * (a[d] - b[d]);
      do1[r * D + d] = w1 * gr[d];
      do2[r * D + d] = w2 * gr[d];
    }
    dl1[r] = w1 * (w2 * dot + gl[r]);
    dl2[r] = w2 * (-w1 * dot + gl[r]);
  }
  return 0;
}

}  // namespace

extern "C" {
MINDPORT_EXPORT(RingBlockForward)
MINDPORT_EXPORT(RingBlockBackward)
MINDPORT_EXPORT(LseMerge)
MINDPORT_EXPORT(LseMergeBackward)
}  // extern "C"
