// Fused selective scan (Mamba S6) for CPUs: forward and backward, vectorised across channels.
//
// Reference: Gu & Dao (2023) §3.3 (hardware-aware scan), and mamba-ssm's CUDA kernel
// (csrc/selective_scan/): states saved only at chunk boundaries, the backward recomputes each chunk.
// Walkthrough: docs/fused-scan.md.  Python side: ssmkit/scan/cpu.py.
//
// Glossary (code -> paper):  u = x, delta = Δ (before softplus), dt = Δ (after), A, B, C, D as in the
// paper, h = hidden state, a = Ā = exp(Δ A), dtu = Δ u (so Δ B u = dtu · B), z = gate, y = C·h + D u,
// out = y · SiLU(z).  One "block" = 16 consecutive channels (the 16 lanes of a `vf`) of one batch row.
//
// Layouts (all float32, contiguous; prepared by cpu.py):
//   u, delta, z, out, du, ddelta, dz : (b, d, l)
//   A : (d, n);  D, bias : (d,)
//   B, C variable/grouped : (b, g, l, n)  (time-major, so B_t is n contiguous scalars shared by a group)
//   B, C time-invariant   : (d, n)
//   saved : (b, K, d, n) = state h at the START of each chunk of kChunk steps (K = ceil(l / kChunk))
//   h0, last, dh0, dlast : (b, d, n)
// Blocks never straddle a group: channels are split into "super-groups" of gs = gcd(d/gB, d/gC)
// channels (gs = d when B and C are shared by all channels), each cut into ceil(gs/16) blocks; lanes past
// the super-group's end are padding with all inputs 0, so they contribute exactly 0 to every gradient.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <numeric>
#include <vector>

#include "vec_math.h"

namespace ssmkit_scan {

constexpr int64_t kChunk = 64;  // steps between saved states (the backward's recomputation unit)
constexpr int64_t kTile = 32;   // forward tile length (divides kChunk): 4 tiles of 2 KiB stay in L1
static_assert(kChunk % kTile == 0, "kTile must divide kChunk");
constexpr int kMaxN = 256;       // largest d_state (as mamba-ssm's MAX_DSTATE)

struct Problem {
  int64_t b, d, l, n;
  const float *u, *delta, *A, *B, *C, *D, *z, *bias, *h0;  // D, z, bias, h0 may be null
  bool softplus, B_ti, C_ti;
  int64_t gB, gC;  // groups of B and C (1 for (b, n, l)); unused when time-invariant
  int64_t gs;      // channels per super-group
  int64_t K;       // chunks
  int64_t nbg() const { return (gs + W - 1) / W; }  // blocks per super-group
  int64_t nsg() const { return d / gs; }             // super-groups
};

struct Block {
  int64_t c0;      // first channel
  int nvalid;      // real lanes (≤ W)
  int64_t gBi, gCi;  // group of B and C used by this block
};

static Block block_at(const Problem& p, int64_t s, int64_t j) {
  Block k;
  k.c0 = s * p.gs + j * W;
  k.nvalid = (int)std::min<int64_t>(W, p.gs - j * W);
  k.gBi = p.B_ti ? 0 : k.c0 / (p.d / p.gB);
  k.gCi = p.C_ti ? 0 : k.c0 / (p.d / p.gC);
  return k;
}

// ---- lane <-> channel transposes (O(b·d·l) work in total, never on the per-(t, n) path) -------------

static inline vf lane_vec(const float* v, const Block& k) {  // v: (d,)
  vf r = {};
  if (v)
    for (int i = 0; i < k.nvalid; ++i) r[i] = v[k.c0 + i];
  return r;
}

static inline void lane_mat(const float* M, const Block& k, int n, vf* out) {  // M: (d, n) -> out[n]
  for (int j = 0; j < n; ++j) out[j] = vf{};
  if (!M) return;
  for (int i = 0; i < k.nvalid; ++i)
    for (int j = 0; j < n; ++j) out[j][i] = M[(k.c0 + i) * n + j];
}

static inline void store_mat(float* M, const Block& k, int n, const vf* v) {  // inverse of lane_mat
  for (int i = 0; i < k.nvalid; ++i)
    for (int j = 0; j < n; ++j) M[(k.c0 + i) * n + j] = v[j][i];
}

// In-register 16×16 transpose: stage S swaps bit S of the row index with bit S of the column index
// (two-source shuffles of row pairs R, R + 2^S); after the four stages r[i][j] holds the old r[j][i].
static_assert(W == 16, "the transpose below is written for 16 lanes");
#define SSMKIT_LO(c) ((((c) >> S) & 1) == 0 ? (c) : 16 + (c) - (1 << S))
#define SSMKIT_HI(c) ((((c) >> S) & 1) == 0 ? (c) + (1 << S) : 16 + (c))
#define SSMKIT_16(M) M(0), M(1), M(2), M(3), M(4), M(5), M(6), M(7), M(8), M(9), M(10), M(11), M(12), \
                     M(13), M(14), M(15)
template <int S>
static inline void transpose_stage(vf* r) {
  for (int R = 0; R < 16; ++R) {
    if ((R >> S) & 1) continue;
    const vf a = r[R], b = r[R + (1 << S)];
    r[R] = __builtin_shufflevector(a, b, SSMKIT_16(SSMKIT_LO));
    r[R + (1 << S)] = __builtin_shufflevector(a, b, SSMKIT_16(SSMKIT_HI));
  }
}
#undef SSMKIT_LO
#undef SSMKIT_HI
#undef SSMKIT_16

static inline void transpose16(vf* r) {
  transpose_stage<0>(r);
  transpose_stage<1>(r);
  transpose_stage<2>(r);
  transpose_stage<3>(r);
}

// base: (d, l) rows of one batch element; tile[t][lane] = base[c0 + lane, t0 + t], zero-padded.
// Full 16-lane, 16-step pieces go through the register transpose; the ragged rest element by element.
static inline void load_tile(const float* base, int64_t l, const Block& k, int64_t t0, int64_t T, vf* tile) {
  if (!base) {
    for (int64_t t = 0; t < T; ++t) tile[t] = vf{};
    return;
  }
  int64_t done = 0;
  if (k.nvalid == W) {
    for (; done + W <= T; done += W) {
      vf r[W];
      for (int i = 0; i < W; ++i) std::memcpy(&r[i], base + (k.c0 + i) * l + t0 + done, sizeof(vf));
      transpose16(r);
      for (int t = 0; t < W; ++t) tile[done + t] = r[t];
    }
  }
  for (int64_t t = done; t < T; ++t) tile[t] = vf{};
  for (int i = 0; i < k.nvalid; ++i) {
    const float* row = base + (k.c0 + i) * l + t0;
    for (int64_t t = done; t < T; ++t) tile[t][i] = row[t];
  }
}

// Software prefetch of a future tile's rows: the 16 row streams of a block are touched only every ~40k
// instructions, too sparse for the hardware prefetcher, so without this the tile loads stall on DRAM.
static inline void prefetch_tile(const float* base, int64_t l, const Block& k, int64_t t0, int64_t T) {
  if (!base || T <= 0) return;
  for (int i = 0; i < k.nvalid; ++i) {
    const float* row = base + (k.c0 + i) * l + t0;
    for (int64_t t = 0; t < T; t += 16) __builtin_prefetch(row + t, 0, 1);
    __builtin_prefetch(row + T - 1, 0, 1);
  }
}

static inline void store_tile(float* base, int64_t l, const Block& k, int64_t t0, int64_t T, const vf* tile) {
  int64_t done = 0;
  if (k.nvalid == W) {
    for (; done + W <= T; done += W) {
      vf r[W];
      for (int t = 0; t < W; ++t) r[t] = tile[done + t];
      transpose16(r);
      for (int i = 0; i < W; ++i) std::memcpy(base + (k.c0 + i) * l + t0 + done, &r[i], sizeof(vf));
    }
  }
  for (int i = 0; i < k.nvalid; ++i) {
    float* row = base + (k.c0 + i) * l + t0;
    for (int64_t t = done; t < T; ++t) row[t] = tile[t][i];
  }
}

// Δ for a tile: dt = softplus(delta + bias) (or delta + bias); also σ(delta + bias) = dsoftplus/dx.
static inline void delta_tile(const Problem& p, int64_t bi, const Block& k, int64_t t0, int64_t T, vf biasv,
                              vf* dt, vf* sig) {
  load_tile(p.delta + bi * p.d * p.l, p.l, k, t0, T, dt);
  for (int64_t t = 0; t < T; ++t) {
    const vf x = dt[t] + biasv;
    if (sig) sig[t] = p.softplus ? vsigmoid(x) : splat(1.0f);
    dt[t] = p.softplus ? vsoftplus(x) : x;
  }
}

// ---- the scan inner loop: one step t for all n, 16 channels at a time ---------------------------------
// h[j] <- exp(dt·A[j]) ⊙ h[j] + dt·u·B_t[j];  returns y = Σ_j C_t[j] h[j].  B_t/C_t are shared scalars
// (variable/grouped) or per-lane vectors (time-invariant). When `abuf`/`hbuf` are given, Ā and h are
// also written out (the backward's recomputation).
template <int NN, bool BTI, bool CTI>
static inline vf scan_step(int n_rt, vf dtv, vf dtu, const vf* Av, const vf* Bv, const vf* Cv,
                           const float* Bt, const float* Ct, vf* h, vf* abuf, vf* hbuf) {
  const int n = NN > 0 ? NN : n_rt;
  vf y = {};
  for (int j = 0; j < n; ++j) {
    const vf a = vexp(dtv * Av[j]);
    const vf bj = BTI ? Bv[j] : splat(Bt[j]);
    const vf cj = CTI ? Cv[j] : splat(Ct[j]);
    h[j] = a * h[j] + dtu * bj;
    y += h[j] * cj;
    if (abuf) {
      abuf[j] = a;
      hbuf[j] = h[j];
    }
  }
  return y;
}

// ---- forward: one (batch, block) ------------------------------------------------------------------
template <int NN, bool BTI, bool CTI>
static void fwd_block(const Problem& p, int64_t bi, const Block& k, float* out, float* last, float* saved) {
  const int n = NN > 0 ? NN : (int)p.n;
  constexpr int NB = NN > 0 ? NN : kMaxN;
  vf h[NB], Av[NB], Bv[BTI ? NB : 1], Cv[CTI ? NB : 1];
  alignas(64) vf dt[kTile], uu[kTile], zz[kTile], yy[kTile];
  lane_mat(p.A, k, n, Av);
  if (BTI) lane_mat(p.B, k, n, Bv);
  if (CTI) lane_mat(p.C, k, n, Cv);
  const vf Dv = lane_vec(p.D, k), biasv = lane_vec(p.bias, k);
  lane_mat(p.h0 ? p.h0 + bi * p.d * n : nullptr, k, n, h);
  const float* Bg = BTI ? nullptr : p.B + (bi * p.gB + k.gBi) * p.l * n;  // (l, n)
  const float* Cg = CTI ? nullptr : p.C + (bi * p.gC + k.gCi) * p.l * n;
  const int64_t off = bi * p.d * p.l;
  for (int64_t t0 = 0; t0 < p.l; t0 += kTile) {
    const int64_t T = std::min(kTile, p.l - t0);
    if (t0 % kChunk == 0) store_mat(saved + (bi * p.K + t0 / kChunk) * p.d * n, k, n, h);
    delta_tile(p, bi, k, t0, T, biasv, dt, nullptr);
    load_tile(p.u + off, p.l, k, t0, T, uu);
    const int64_t Tn = std::min(kTile, p.l - t0 - T);  // the next tile, read while this one computes
    prefetch_tile(p.delta + off, p.l, k, t0 + T, Tn);
    prefetch_tile(p.u + off, p.l, k, t0 + T, Tn);
    prefetch_tile(p.z ? p.z + off : nullptr, p.l, k, t0, T);
    for (int64_t t = 0; t < T; ++t) {
      const vf dtu = dt[t] * uu[t];
      const float* Bt = BTI ? nullptr : Bg + (t0 + t) * n;
      const float* Ct = CTI ? nullptr : Cg + (t0 + t) * n;
      yy[t] = scan_step<NN, BTI, CTI>(n, dt[t], dtu, Av, Bv, Cv, Bt, Ct, h, nullptr, nullptr);
    }
    if (p.D)  // only when given: 0 · u would turn an infinite u into NaN where the reference has no term
      for (int64_t t = 0; t < T; ++t) yy[t] += Dv * uu[t];
    if (p.z) {
      load_tile(p.z + off, p.l, k, t0, T, zz);
      for (int64_t t = 0; t < T; ++t) yy[t] = yy[t] * (zz[t] * vsigmoid(zz[t]));  // y · SiLU(z)
    }
    store_tile(out + off, p.l, k, t0, T, yy);
  }
  store_mat(last + bi * p.d * n, k, n, h);
}

// ---- backward: one work item = (batch bi, super-group s, blocks [j0, j1)) -----------------------------
// Chunks are walked in reverse; inside a chunk every block of the item is processed in turn so that
// the lane-wise partial sums of dB_t, dC_t (shared by all channels of a group) are reduced across lanes
// once per (t, n) per item, not once per block. Per-block carries: g = dL/dh at the chunk's end, and
// the lane-wise accumulators for dA, dD, dbias and time-invariant dB/dC.
struct Grads {
  float *du, *ddelta, *dz;  // (b, d, l)
  float *dA, *dD, *dbias;   // per batch: (b, d, n), (b, d), (b, d)
  float *dBti, *dCti;       // per batch (b, d, n) when time-invariant
  float *dh0;               // (b, d, n)
};

template <int NN, bool BTI, bool CTI>
static void bwd_item(const Problem& p, const float* saved, const float* dout, const float* dlast, int64_t bi,
                     int64_t s, int64_t j0, int64_t j1, float* dBpart, float* dCpart, const Grads& gr) {
  const int n = NN > 0 ? NN : (int)p.n;
  constexpr int NB = NN > 0 ? NN : kMaxN;
  const int64_t nb = j1 - j0;
  std::vector<vf> g(nb * n), dAacc(nb * n, vf{}), dBacc(BTI ? nb * n : 0, vf{}), dCacc(CTI ? nb * n : 0, vf{});
  std::vector<vf> dDacc(nb, vf{}), dbacc(nb, vf{});
  std::vector<vf> hbuf(kChunk * n), abuf(kChunk * n);
  std::vector<vf> dBl(BTI ? 0 : kChunk * n), dCl(CTI ? 0 : kChunk * n);
  std::vector<vf> tiles(9 * kChunk);
  vf *dt = &tiles[0], *sig = dt + kChunk, *uu = sig + kChunk, *zz = uu + kChunk, *go = zz + kChunk;
  vf *yy = go + kChunk, *dy = yy + kChunk, *du = dy + kChunk, *dd = du + kChunk;
  vf Av[NB], Bv[BTI ? NB : 1], Cv[CTI ? NB : 1], hs[NB];
  const int64_t off = bi * p.d * p.l;

  for (int64_t j = j0; j < j1; ++j)
    lane_mat(dlast ? dlast + bi * p.d * n : nullptr, block_at(p, s, j), n, &g[(j - j0) * n]);

  for (int64_t c = p.K - 1; c >= 0; --c) {
    const int64_t t0 = c * kChunk, T = std::min(kChunk, p.l - t0);
    if (!BTI) std::fill(dBl.begin(), dBl.begin() + T * n, vf{});
    if (!CTI) std::fill(dCl.begin(), dCl.begin() + T * n, vf{});
    for (int64_t j = j0; j < j1; ++j) {
      const Block k = block_at(p, s, j);
      vf* gj = &g[(j - j0) * n];
      vf* dAj = &dAacc[(j - j0) * n];
      lane_mat(p.A, k, n, Av);
      if (BTI) lane_mat(p.B, k, n, Bv);
      if (CTI) lane_mat(p.C, k, n, Cv);
      const vf Dv = lane_vec(p.D, k), biasv = lane_vec(p.bias, k);
      const float* Bg = BTI ? nullptr : p.B + (bi * p.gB + k.gBi) * p.l * n;
      const float* Cg = CTI ? nullptr : p.C + (bi * p.gC + k.gCi) * p.l * n;
      lane_mat(saved + (bi * p.K + c) * p.d * n, k, n, hs);
      delta_tile(p, bi, k, t0, T, biasv, dt, sig);
      load_tile(p.u + off, p.l, k, t0, T, uu);
      load_tile(dout + off, p.l, k, t0, T, go);
      {  // the next block of this chunk, else the first block of the previous chunk, is read next
        const bool last_blk = j + 1 == j1;
        if (!last_blk || c > 0) {
          const Block kn = block_at(p, s, last_blk ? j0 : j + 1);
          const int64_t tn = last_blk ? (c - 1) * kChunk : t0, Tn = last_blk ? kChunk : T;
          prefetch_tile(p.delta + off, p.l, kn, tn, Tn);
          prefetch_tile(p.u + off, p.l, kn, tn, Tn);
          prefetch_tile(dout + off, p.l, kn, tn, Tn);
          prefetch_tile(p.z ? p.z + off : nullptr, p.l, kn, tn, Tn);
        }
      }

      // 1. recompute the chunk's states from the saved boundary state (h and Ā kept for step 3)
      vf h[NB];
      for (int jn = 0; jn < n; ++jn) h[jn] = hs[jn];
      for (int64_t t = 0; t < T; ++t) {
        const float* Bt = BTI ? nullptr : Bg + (t0 + t) * n;
        const float* Ct = CTI ? nullptr : Cg + (t0 + t) * n;
        yy[t] = scan_step<NN, BTI, CTI>(n, dt[t], dt[t] * uu[t], Av, Bv, Cv, Bt, Ct, h, &abuf[t * n],
                                        &hbuf[t * n]);
        if (p.D) yy[t] += Dv * uu[t];
      }
      // 2. the gate: out = y · z σ(z);  dy = dout · SiLU(z),  dz = dout · y · σ(z)(1 + z(1 − σ(z)))
      if (p.z) {
        load_tile(p.z + off, p.l, k, t0, T, zz);
        for (int64_t t = 0; t < T; ++t) {
          const vf sz = vsigmoid(zz[t]);
          dy[t] = go[t] * (zz[t] * sz);
          yy[t] = go[t] * yy[t] * sz * (1.0f + zz[t] * (1.0f - sz));  // yy now holds dz
        }
      } else {
        for (int64_t t = 0; t < T; ++t) dy[t] = go[t];
      }
      // 3. reverse recurrence: G_t = g_{t+1→t} + dy_t C_t;  g_{t→t−1} = Ā_t G_t
      vf dD = dDacc[j - j0], db = dbacc[j - j0];
      // Padding lanes share B_t, C_t with the real ones: 0 · inf there is NaN, so their contributions to
      // the shared dB_t, dC_t sums are dropped by a lane mask (only in the super-group's last, ragged block).
      const bool ragged = k.nvalid < W;
      vi real = {};
      for (int i = 0; i < W; ++i) real[i] = i < k.nvalid ? -1 : 0;
      for (int64_t t = T - 1; t >= 0; --t) {
        const vf dtv = dt[t], uv = uu[t], dyv = dy[t], dtu = dtv * uv;
        const float* Bt = BTI ? nullptr : Bg + (t0 + t) * n;
        const float* Ct = CTI ? nullptr : Cg + (t0 + t) * n;
        const vf* hc = &hbuf[t * n];
        const vf* hp = t > 0 ? &hbuf[(t - 1) * n] : hs;
        const vf* ac = &abuf[t * n];
        vf ddtu = {}, dts = {};
        for (int jn = 0; jn < n; ++jn) {
          const vf bj = BTI ? Bv[jn] : splat(Bt[jn]);
          const vf cj = CTI ? Cv[jn] : splat(Ct[jn]);
          const vf G = gj[jn] + dyv * cj;  // dL/dh_t
          if (CTI)
            dCacc[(j - j0) * n + jn] += dyv * hc[jn];
          else
            dCl[t * n + jn] += ragged ? (real != 0 ? dyv * hc[jn] : vf{}) : dyv * hc[jn];
          if (BTI)
            dBacc[(j - j0) * n + jn] += G * dtu;
          else
            dBl[t * n + jn] += ragged ? (real != 0 ? G * dtu : vf{}) : G * dtu;
          ddtu += G * bj;
          const vf sa = G * hp[jn] * ac[jn];  // dL/d(Δ_t A) for this state index
          dts += sa * Av[jn];
          dAj[jn] += sa * dtv;
          gj[jn] = ac[jn] * G;
        }
        const vf ddt = dts + ddtu * uv;  // dL/dΔ_t
        du[t] = p.D ? ddtu * dtv + dyv * Dv : ddtu * dtv;  // no D term without D (as the reference)
        dD += dyv * uv;
        dd[t] = ddt * sig[t];  // through softplus (sig = 1 without it)
        db += dd[t];
      }
      dDacc[j - j0] = dD;
      dbacc[j - j0] = db;
      store_tile(gr.du + off, p.l, k, t0, T, du);
      store_tile(gr.ddelta + off, p.l, k, t0, T, dd);
      if (p.z) store_tile(gr.dz + off, p.l, k, t0, T, yy);
    }
    // lane reduction of this chunk's dB_t, dC_t: once per (t, n) per work item
    if (!BTI)
      for (int64_t i = 0; i < T * n; ++i) dBpart[t0 * n + i] = hsum(dBl[i]);
    if (!CTI)
      for (int64_t i = 0; i < T * n; ++i) dCpart[t0 * n + i] = hsum(dCl[i]);
  }
  for (int64_t j = j0; j < j1; ++j) {
    const Block k = block_at(p, s, j);
    store_mat(gr.dh0 + bi * p.d * n, k, n, &g[(j - j0) * n]);
    store_mat(gr.dA + bi * p.d * n, k, n, &dAacc[(j - j0) * n]);
    if (BTI) store_mat(gr.dBti + bi * p.d * n, k, n, &dBacc[(j - j0) * n]);
    if (CTI) store_mat(gr.dCti + bi * p.d * n, k, n, &dCacc[(j - j0) * n]);
    for (int i = 0; i < k.nvalid; ++i) {
      gr.dD[bi * p.d + k.c0 + i] = dDacc[j - j0][i];
      gr.dbias[bi * p.d + k.c0 + i] = dbacc[j - j0][i];
    }
  }
}

// Work items are handed out dynamically (an atomic counter), not split statically: on a shared machine
// one thread may run at half speed, and a static split would make every call wait for it.
template <class F>
static void parallel_items(int64_t items, const F& fn) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items));
  at::parallel_for(0, workers, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t w = lo; w < hi; ++w)
      for (int64_t i = next++; i < items; i = next++) fn(i);
  });
}

// ---- dispatch on (n, B layout, C layout) -------------------------------------------------------------
template <template <int, bool, bool> class F, typename... Args>
static void dispatch(const Problem& p, Args&&... args) {
  const bool bt = p.B_ti, ct = p.C_ti;
#define SSMKIT_CASE(NN)                                        \
  if (bt && ct) F<NN, true, true>::run(p, args...);            \
  else if (bt) F<NN, true, false>::run(p, args...);            \
  else if (ct) F<NN, false, true>::run(p, args...);            \
  else F<NN, false, false>::run(p, args...);
  if (p.n == 16) {
    SSMKIT_CASE(16)
  } else if (p.n == 4) {
    SSMKIT_CASE(4)
  } else {
    SSMKIT_CASE(0)
  }
#undef SSMKIT_CASE
}

template <int NN, bool BTI, bool CTI>
struct FwdAll {
  static void run(const Problem& p, float* out, float* last, float* saved) {
    const int64_t nbg = p.nbg(), nblk = p.nsg() * nbg;
    parallel_items(p.b * nblk, [&](int64_t i) {
      const int64_t bi = i / nblk, r = i % nblk;
      fwd_block<NN, BTI, CTI>(p, bi, block_at(p, r / nbg, r % nbg), out, last, saved);
    });
  }
};

template <int NN, bool BTI, bool CTI>
struct BwdAll {
  static void run(const Problem& p, const float* saved, const float* dout, const float* dlast, int64_t parts,
                  float* dBpart, float* dCpart, const Grads& gr) {
    const int64_t nbg = p.nbg(), nsg = p.nsg(), items = p.b * nsg * parts, ln = p.l * p.n;
    parallel_items(items, [&](int64_t i) {
      const int64_t bi = i / (nsg * parts), s = (i / parts) % nsg, part = i % parts;
      const int64_t j0 = part * nbg / parts, j1 = (part + 1) * nbg / parts;
      if (j0 == j1) return;
      bwd_item<NN, BTI, CTI>(p, saved, dout, dlast, bi, s, j0, j1, dBpart ? dBpart + i * ln : nullptr,
                             dCpart ? dCpart + i * ln : nullptr, gr);
    });
  }
};

// ---- the machine limit: the forward inner loop on one in-cache tile, same exps and FMAs --------------
template <int NN, bool BTI, bool CTI>
struct LimitAll {
  static void run(const Problem& p, int64_t reps, float* sink) {
    const int nth = at::get_num_threads();
    at::parallel_for(0, nth, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const int n = NN > 0 ? NN : (int)p.n;
        constexpr int NB = NN > 0 ? NN : kMaxN;
        vf h[NB], Av[NB], dt[kChunk], uu[kChunk];
        std::vector<float> Bt(kChunk * n), Ct(kChunk * n);
        for (int j = 0; j < n; ++j) {
          h[j] = vf{};
          Av[j] = splat(-1.0f - j);
        }
        for (int64_t t = 0; t < kChunk; ++t) {
          dt[t] = splat(0.01f + 1e-4f * t);
          uu[t] = splat(0.5f);
          for (int j = 0; j < n; ++j) Bt[t * n + j] = Ct[t * n + j] = 0.1f;
        }
        vf acc = {};
        for (int64_t r = 0; r < reps; ++r)
          for (int64_t t = 0; t < kChunk; ++t)
            acc += scan_step<NN, false, false>(n, dt[t], dt[t] * uu[t], Av, nullptr, nullptr, &Bt[t * n],
                                               &Ct[t * n], h, nullptr, nullptr);
        sink[i] = hsum(acc);
      }
    });
  }
};

static Problem make_problem(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                            const at::Tensor& B, const at::Tensor& C, const c10::optional<at::Tensor>& D,
                            const c10::optional<at::Tensor>& z, const c10::optional<at::Tensor>& bias,
                            const c10::optional<at::Tensor>& h0, bool softplus) {
  auto check = [](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.device().is_cpu(), name,
                " must be a contiguous float32 CPU tensor");
  };
  check(u, "u");
  check(delta, "delta");
  check(A, "A");
  check(B, "B");
  check(C, "C");
  Problem p;
  p.b = u.size(0);
  p.d = u.size(1);
  p.l = u.size(2);
  p.n = A.size(1);
  TORCH_CHECK(p.n >= 1 && p.n <= kMaxN, "d_state must be in [1, ", kMaxN, "], got ", p.n);
  // empty problems never reach the kernel (ssmkit.scan.cpu answers them); d = 0 would divide by zero
  TORCH_CHECK(p.b >= 1 && p.d >= 1 && p.l >= 1, "b, d and l must be >= 1, got ", p.b, ", ", p.d, ", ", p.l);
  p.u = u.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.A = A.data_ptr<float>();
  p.B = B.data_ptr<float>();
  p.C = C.data_ptr<float>();
  auto opt = [&](const c10::optional<at::Tensor>& t, const char* name) -> const float* {
    if (!t.has_value() || !t->defined()) return nullptr;
    check(*t, name);
    return t->data_ptr<float>();
  };
  p.D = opt(D, "D");
  p.z = opt(z, "z");
  p.bias = opt(bias, "delta_bias");
  p.h0 = opt(h0, "initial_state");
  p.softplus = softplus;
  p.B_ti = B.dim() == 2;
  p.C_ti = C.dim() == 2;
  p.gB = p.B_ti ? 1 : B.size(1);  // (b, g, l, n)
  p.gC = p.C_ti ? 1 : C.size(1);
  const int64_t gsB = p.d / p.gB, gsC = p.d / p.gC;
  p.gs = std::gcd(p.B_ti ? p.d : gsB, p.C_ti ? p.d : gsC);
  p.K = (p.l + kChunk - 1) / kChunk;
  return p;
}

}  // namespace ssmkit_scan

using namespace ssmkit_scan;

// Returns (out (b, d, l), last_state (b, d, n), saved (b, K, d, n)).
static std::vector<at::Tensor> fwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                   const at::Tensor& B, const at::Tensor& C, const c10::optional<at::Tensor>& D,
                                   const c10::optional<at::Tensor>& z, const c10::optional<at::Tensor>& bias,
                                   const c10::optional<at::Tensor>& h0, bool softplus) {
  const Problem p = make_problem(u, delta, A, B, C, D, z, bias, h0, softplus);
  auto out = at::empty({p.b, p.d, p.l}, u.options());
  auto last = at::empty({p.b, p.d, p.n}, u.options());
  auto saved = at::empty({p.b, p.K, p.d, p.n}, u.options());
  dispatch<FwdAll>(p, out.data_ptr<float>(), last.data_ptr<float>(), saved.data_ptr<float>());
  return {out, last, saved};
}

// Returns (du, ddelta, dA (d, n), dB, dC (layout of the prepared B, C but (b, g, n, l) / (d, n)),
//          dD (d,), dz, dbias (d,), dh0 (b, d, n)); dz is empty when z is absent.
static std::vector<at::Tensor> bwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                   const at::Tensor& B, const at::Tensor& C, const c10::optional<at::Tensor>& D,
                                   const c10::optional<at::Tensor>& z, const c10::optional<at::Tensor>& bias,
                                   const c10::optional<at::Tensor>& h0, bool softplus, const at::Tensor& saved,
                                   const at::Tensor& dout, const at::Tensor& dlast) {
  const Problem p = make_problem(u, delta, A, B, C, D, z, bias, h0, softplus);
  TORCH_CHECK(dout.is_contiguous() && dout.scalar_type() == at::kFloat, "dout must be contiguous float32");
  TORCH_CHECK(dlast.is_contiguous() && dlast.scalar_type() == at::kFloat, "dlast must be contiguous float32");
  auto o = u.options();
  auto du = at::empty({p.b, p.d, p.l}, o), ddelta = at::empty({p.b, p.d, p.l}, o);
  auto dz = p.z ? at::empty({p.b, p.d, p.l}, o) : at::empty({0}, o);
  auto dA = at::zeros({p.b, p.d, p.n}, o), dD = at::zeros({p.b, p.d}, o), dbias = at::zeros({p.b, p.d}, o);
  auto dh0 = at::zeros({p.b, p.d, p.n}, o);
  auto dBti = p.B_ti ? at::zeros({p.b, p.d, p.n}, o) : at::empty({0}, o);
  auto dCti = p.C_ti ? at::zeros({p.b, p.d, p.n}, o) : at::empty({0}, o);
  // work items: (batch, super-group, part); parts split a super-group's blocks across threads
  const int64_t nth = at::get_num_threads(), rows = p.b * p.nsg();
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(p.nbg(), (4 * nth + rows - 1) / rows));
  const int64_t items = rows * parts;
  auto dBpart = p.B_ti ? at::empty({0}, o) : at::zeros({items, p.l, p.n}, o);
  auto dCpart = p.C_ti ? at::empty({0}, o) : at::zeros({items, p.l, p.n}, o);
  Grads gr{du.data_ptr<float>(),   ddelta.data_ptr<float>(), p.z ? dz.data_ptr<float>() : nullptr,
           dA.data_ptr<float>(),   dD.data_ptr<float>(),     dbias.data_ptr<float>(),
           p.B_ti ? dBti.data_ptr<float>() : nullptr, p.C_ti ? dCti.data_ptr<float>() : nullptr,
           dh0.data_ptr<float>()};
  dispatch<BwdAll>(p, saved.data_ptr<float>(), dout.data_ptr<float>(), dlast.data_ptr<float>(), parts,
                   p.B_ti ? nullptr : dBpart.data_ptr<float>(), p.C_ti ? nullptr : dCpart.data_ptr<float>(), gr);
  // reduce partial dB_t / dC_t of each work item into its group: (items, l, n) -> (b, g, n, l)
  auto reduce_groups = [&](const at::Tensor& part, int64_t g) {
    auto r = at::zeros({p.b, g, p.l, p.n}, o);
    const int64_t gsX = p.d / g;
    for (int64_t i = 0; i < items; ++i) {
      const int64_t bi = i / (p.nsg() * parts), s = (i / parts) % p.nsg();
      auto dst = r[bi][(s * p.gs) / gsX];
      dst.add_(part[i]);
    }
    return r.transpose(2, 3).contiguous();
  };
  auto dB = p.B_ti ? dBti.sum(0) : reduce_groups(dBpart, p.gB);
  auto dC = p.C_ti ? dCti.sum(0) : reduce_groups(dCpart, p.gC);
  return {du, ddelta, dA.sum(0), dB, dC, dD.sum(0), dz, dbias.sum(0), dh0};
}

// Runs the forward inner loop on one in-cache tile `reps` times per thread: the machine's ceiling for
// this kernel (returns a checksum so the work is not optimised away).
static double limit(int64_t n, int64_t reps) {
  TORCH_CHECK(n >= 1 && n <= kMaxN, "n out of range");
  Problem p{};
  p.n = n;
  std::vector<float> sink(at::get_num_threads(), 0.0f);
  dispatch<LimitAll>(p, reps, sink.data());
  return std::accumulate(sink.begin(), sink.end(), 0.0);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &fwd, "fused selective scan forward");
  m.def("bwd", &bwd, "fused selective scan backward (recomputes chunks from saved states)");
  m.def("limit", &limit, "machine-limit microbenchmark (same exps/FMAs, in-cache data)");
  m.attr("chunk") = kChunk;
  m.attr("lanes") = W;
}
