// The fused decode step's kernels, written once and compiled once per instruction set.
//
// decode.cpp includes this file several times, each time inside its own namespace and under a
// `#pragma GCC target(...)` region, with SSMKIT_VW set to that target's float lanes (16 for AVX-512,
// 8 for AVX2, 4 for the baseline SSE2 / NEON build). The code uses GCC/Clang vector extensions only (no
// intrinsics), so each copy lowers to its target's registers; decode.cpp picks one at run time.
// No include guard, on purpose.
//
// Math (polynomials, no libm call in a hot loop):
//   exp(x)      = 2^k · p(r),  k = round(x / ln 2),  r = x − k ln 2 (two-part ln 2),  p = Taylor degree 7
//                 (|r| ≤ ln 2 / 2: truncation below 2e-8 relative); x clamped to [−87, 88] so 2^k stays a
//                 normal float (exp(x < −87) gives 1.6e-38 instead of a denormal or 0).
//   log(u)      = e ln 2 + 2 atanh(s),  u = 2^e m,  m ∈ [√½, √2),  s = (m − 1) / (m + 1),  |s| ≤ 0.172,
//                 atanh by its odd series to s^9 (truncation below 5e-9).
//   softplus(x) = max(x, 0) + log1p(exp(−|x|)),  log1p(y) = log(1 + y) · y / ((1 + y) − 1) (exact for tiny y).
//   silu(x)     = x / (1 + exp(−x)).
//
// Weight types: float (fp32), uint16_t (bfloat16 bits: fp32 = bits << 16, exact) and int8_t (times a
// per-output-row float scale applied once to the finished dot product).

constexpr int VW = SSMKIT_VW;  // float lanes per vector
constexpr int RT = VW >= 16 ? 4 : 2;  // weight rows per matvec tile (4 x 4 accumulators fit 32 zmm)
constexpr int BT = 4;                 // batch rows per matvec tile

typedef float vf __attribute__((vector_size(VW * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(VW * sizeof(int32_t))));
typedef uint32_t vu __attribute__((vector_size(VW * sizeof(uint32_t))));
typedef uint16_t vh __attribute__((vector_size(VW * sizeof(uint16_t))));
typedef int8_t vb __attribute__((vector_size(VW * sizeof(int8_t))));

static inline vf splat(float x) {
  vf v;
  for (int i = 0; i < VW; ++i) v[i] = x;
  return v;
}
static inline vf loadf(const float* p) {
  vf v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
static inline void storef(float* p, vf v) { __builtin_memcpy(p, &v, sizeof v); }
typedef float vf8 __attribute__((vector_size(8 * sizeof(float))));
typedef float vf4 __attribute__((vector_size(4 * sizeof(float))));
static inline float hsum4(vf4 v) {  // a tree: ((v0 + v2) + (v1 + v3))
  const vf4 a = v + __builtin_shufflevector(v, v, 2, 3, 0, 1);
  return a[0] + a[1];
}
static inline float hsum(vf v) {  // halves added as vectors, then 4 lanes as a tree
#if SSMKIT_VW == 16
  const vf8 h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  return hsum4(__builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7));
#elif SSMKIT_VW == 8
  return hsum4(__builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7));
#else
  return hsum4(v);
#endif
}

// ---- weights: VW consecutive weights as floats, and one weight as a float --------------------------------
static inline vf loadw(const float* p) { return loadf(p); }
// Widening loads: one instruction each with AVX-512 / AVX2 (GCC scalarises __builtin_convertvector from
// 8-bit lanes, and splits the 16-bit one), the portable vector-extension form elsewhere.
static inline vf loadw(const uint16_t* p) {
#if SSMKIT_VW == 16 && defined(SSMKIT_X86)
  const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return (vf)_mm512_slli_epi32(u, 16);
#elif SSMKIT_VW == 8 && defined(SSMKIT_X86)
  const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return (vf)_mm256_slli_epi32(u, 16);
#else
  vh h;
  __builtin_memcpy(&h, p, sizeof h);
  const vu u = __builtin_convertvector(h, vu) << 16;
  return (vf)u;  // same-size vector cast: a bit cast
#endif
}
static inline vf loadw(const int8_t* p) {
#if SSMKIT_VW == 16 && defined(SSMKIT_X86)
  return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif SSMKIT_VW == 8 && defined(SSMKIT_X86)
  int64_t bits;
  __builtin_memcpy(&bits, p, sizeof bits);
  return (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(bits)));
#else
  vb q;
  __builtin_memcpy(&q, p, sizeof q);
  return __builtin_convertvector(__builtin_convertvector(q, vi), vf);
#endif
}
static inline float w1(const float* p) { return *p; }
static inline float w1(const uint16_t* p) {
  const uint32_t u = uint32_t(*p) << 16;
  float f;
  __builtin_memcpy(&f, &u, sizeof f);
  return f;
}
static inline float w1(const int8_t* p) { return float(*p); }

// ---- elementwise math --------------------------------------------------------------------------------
static inline vf vexp(vf x) {
  const vf lo = splat(-87.0f), hi = splat(88.0f);
  x = x < lo ? lo : x;  // a NaN x fails both tests and stays NaN
  x = x > hi ? hi : x;
  const float magic = 12582912.0f;  // 1.5 · 2^23: adding it rounds to the nearest integer
  const vf k = (x * 1.44269504088896341f + magic) - magic;
  vf r = x - k * 0.693145751953125f;  // ln 2 split: the high part has 12 bits, so k · hi is exact
  r = r - k * 1.428606765330187045e-06f;
  vf p = splat(1.0f / 5040.0f);
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const vi ki = __builtin_convertvector(k, vi);
  const vi bits = (ki + 127) << 23;  // 2^k, k in [−126, 127]
  return p * (vf)bits;
}

static inline vf vlog(vf u) {  // u > 0, finite
  const vi bits = (vi)u;
  vi e = ((bits >> 23) & 0xff) - 127;
  vf m = (vf)((bits & 0x7fffff) | 0x3f800000);  // [1, 2)
  const vi big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  e = big ? e + 1 : e;
  const vf s = (m - 1.0f) / (m + 1.0f);
  const vf s2 = s * s;
  vf q = splat(1.0f / 9.0f);
  q = q * s2 + 1.0f / 7.0f;
  q = q * s2 + 1.0f / 5.0f;
  q = q * s2 + 1.0f / 3.0f;
  q = q * s2 + 1.0f;
  return __builtin_convertvector(e, vf) * 0.693147180559945309f + 2.0f * s * q;
}

static inline vf vsoftplus(vf x) {
  const vf ax = x < 0.0f ? -x : x;
  const vf y = vexp(-ax);  // (0, 1]
  const vf u = 1.0f + y;
  const vf d = u - 1.0f;
  const vf l1p = d == 0.0f ? y : vlog(u) * (y / d);
  const vf pos = x > 0.0f ? x : splat(0.0f);
  return x != x ? x : pos + l1p;  // NaN in, NaN out
}

static inline vf vsilu(vf x) { return x / (1.0f + vexp(-x)); }

// out = silu(in) for n floats (may alias), VW at a time; the tail through a zero-padded vector.
static inline void silu_n(int64_t n, const float* in, float* out) {
  int64_t i = 0;
  for (; i + VW <= n; i += VW) storef(out + i, vsilu(loadf(in + i)));
  if (i < n) {
    float buf[VW] = {};
    for (int64_t j = i; j < n; ++j) buf[j - i] = in[j];
    storef(buf, vsilu(loadf(buf)));
    for (int64_t j = i; j < n; ++j) out[j] = buf[j - i];
  }
}

// ---- matrix-vector products ---------------------------------------------------------------------------
// out[r][j] = Σ_k W[r, k] · X[j, k] for R weight rows (stride ldw) and NB batch rows (stride ldx).
template <int R, int NB, class T>
static inline void dot_tile(const T* W, int64_t ldw, int64_t K, const float* X, int64_t ldx, float (&out)[R][NB]) {
  vf acc[R][NB];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NB; ++j) acc[r][j] = splat(0.0f);
  int64_t k = 0;
  if constexpr (std::is_same<T, uint16_t>::value) {
    // bf16 in pairs: one load of 2·VW weights as VW 32-bit lanes, lane i = (w[2i+1] << 16) | w[2i], gives
    // the even weights as `lane << 16` and the odd ones as `lane & 0xffff0000` (one integer op each); X
    // was deinterleaved to match by the caller (bf16_pairs_x): [x0 x2 … | x1 x3 …] per block of 2·VW.
    for (; k + 2 * VW <= K; k += 2 * VW) {
      vf xe[NB], xo[NB];
      for (int j = 0; j < NB; ++j) xe[j] = loadf(X + j * ldx + k), xo[j] = loadf(X + j * ldx + k + VW);
      for (int r = 0; r < R; ++r) {
        vu u;
        __builtin_memcpy(&u, W + r * ldw + k, sizeof u);
        const vf we = (vf)(u << 16), wo = (vf)(u & 0xffff0000u);
        for (int j = 0; j < NB; ++j) {  // two steps, in the order the widened rows use (batch-invariant)
          acc[r][j] += we * xe[j];
          acc[r][j] += wo * xo[j];
        }
      }
    }
  }
  // int8 rows are short (a 4-row tile of d_model = 768 is 3 KiB, inside one page), and the hardware
  // prefetcher ramps up too late on them: ask for the same place two tiles on, one line per row.
  constexpr bool kPrefetch = std::is_same<T, int8_t>::value;
  const int64_t ahead = 2 * R * ldw;
  for (; k + VW <= K; k += VW) {
    if (kPrefetch && (k & 63) == 0)
      for (int r = 0; r < R; ++r) __builtin_prefetch(W + r * ldw + k + ahead);
    vf xv[NB];
    for (int j = 0; j < NB; ++j) xv[j] = loadf(X + j * ldx + k);
    for (int r = 0; r < R; ++r) {
      const vf w = loadw(W + r * ldw + k);
      for (int j = 0; j < NB; ++j) acc[r][j] += w * xv[j];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NB; ++j) {
      float s = hsum(acc[r][j]);
      // The tail fused on purpose: a loop of s += w * x may be vectorised as a multiply then in-order adds
      // for one weight type and stay fused for another, and a row must not depend on the path it took.
      for (int64_t kk = k; kk < K; ++kk) s = __builtin_fmaf(w1(W + r * ldw + kk), X[j * ldx + kk], s);
      out[r][j] = s;
    }
}

// Rows [o0, o0 + R) (starting at Wr) for every batch row: epi(o, j, Σ_k W[o, k] X[j, k] · scale[o]).
template <int R, class T, class Epi>
static inline void rows_tiles(const T* Wr, const float* scale, int64_t K, int64_t o0, const float* X,
                              int64_t nb, const Epi& epi) {
  int64_t j0 = 0;
  auto emit = [&](auto& out, int nbt) {
    for (int r = 0; r < R; ++r) {
      const float sc = scale ? scale[o0 + r] : 1.0f;
      for (int j = 0; j < nbt; ++j) epi(o0 + r, j0 + j, out[r][j] * sc);
    }
  };
  for (; j0 + BT <= nb; j0 += BT) {
    float out[R][BT];
    dot_tile<R, BT>(Wr, K, K, X + j0 * K, K, out);
    emit(out, BT);
  }
  switch (nb - j0) {
    case 3: {
      float out[R][3];
      dot_tile<R, 3>(Wr, K, K, X + j0 * K, K, out);
      emit(out, 3);
      break;
    }
    case 2: {
      float out[R][2];
      dot_tile<R, 2>(Wr, K, K, X + j0 * K, K, out);
      emit(out, 2);
      break;
    }
    case 1: {
      float out[R][1];
      dot_tile<R, 1>(Wr, K, K, X + j0 * K, K, out);
      emit(out, 1);
      break;
    }
    default:
      break;
  }
}

// As rows_tiles from W's rows o0.. . With more batch rows than one tile holds, bf16 / int8 rows are first
// widened once into a per-thread float32 buffer (in L1/L2), so each weight is converted once, not once per
// batch tile; the products are the same (widening is exact).
template <int R, class T, class Epi>
static inline void rows_all_batch(const T* W, const float* scale, int64_t K, int64_t o0, const float* X,
                                  int64_t nb, const Epi& epi) {
  if constexpr (!std::is_same<T, float>::value) {
    if (nb > BT) {
      thread_local std::vector<float> buf;
      if ((int64_t)buf.size() < R * K) buf.resize(R * K);
      for (int r = 0; r < R; ++r) {
        const T* src = W + (o0 + r) * K;
        float* dst = buf.data() + r * K;
        int64_t k = 0;
        if constexpr (std::is_same<T, uint16_t>::value) {  // bf16: in the paired order X was put in
          for (; k + 2 * VW <= K; k += 2 * VW) {
            if (((k * 2) & 63) == 0) __builtin_prefetch(src + k + R * K);
            vu u;
            __builtin_memcpy(&u, src + k, sizeof u);
            storef(dst + k, (vf)(u << 16));
            storef(dst + k + VW, (vf)(u & 0xffff0000u));
          }
        }
        for (; k + VW <= K; k += VW) {
          if (((k * (int64_t)sizeof(T)) & 63) == 0) __builtin_prefetch(src + k + R * K);  // the next tile
          storef(dst + k, loadw(src + k));
        }
        for (; k < K; ++k) dst[k] = w1(src + k);
      }
      rows_tiles<R>(static_cast<const float*>(buf.data()), scale, K, o0, X, nb, epi);
      return;
    }
  }
  rows_tiles<R>(W + o0 * K, scale, K, o0, X, nb, epi);
}

// Y = W X for W (O, K) row-major and X (nb, K) row-major, every (o, j) handed to epi; parallel over rows
// (work items of a few tiles taken from a shared counter, so a thread slowed by a neighbour does less).
// X (nb, K) with each whole block of 2·VW columns deinterleaved (evens, then odds), the tail as it was.
static std::vector<float> bf16_pairs_x(const float* X, int64_t nb, int64_t K) {
  std::vector<float> out(X, X + nb * K);
  for (int64_t j = 0; j < nb; ++j)
    for (int64_t k = 0; k + 2 * VW <= K; k += 2 * VW)
      for (int i = 0; i < VW; ++i) {
        out[j * K + k + i] = X[j * K + k + 2 * i];
        out[j * K + k + VW + i] = X[j * K + k + 2 * i + 1];
      }
  return out;
}

template <class T, class Epi>
static void matvec(const T* W, const float* scale, int64_t O, int64_t K, const float* X, int64_t nb,
                   const Epi& epi) {
  std::vector<float> xpairs;
  if constexpr (std::is_same<T, uint16_t>::value) {  // bf16 rows are read in pairs (dot_tile, rows_all_batch)
    xpairs = bf16_pairs_x(X, nb, K);
    X = xpairs.data();
  }
  const int64_t tiles = O / RT;
  const int64_t per_item = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, K * RT));  // ~32 Ki weights
  const int64_t items = (tiles + per_item - 1) / per_item;
  parallel_items(items, [&](int64_t it) {
    const int64_t t1 = std::min(tiles, (it + 1) * per_item);
    for (int64_t t = it * per_item; t < t1; ++t) rows_all_batch<RT>(W, scale, K, t * RT, X, nb, epi);
  });
  for (int64_t o = tiles * RT; o < O; ++o) rows_all_batch<1>(W, scale, K, o, X, nb, epi);
}

template <class Epi>
static void matvec_any(const Weight& w, const float* X, int64_t nb, const Epi& epi) {
  switch (w.kind) {
    case Kind::f32:
      matvec(static_cast<const float*>(w.ptr), nullptr, w.rows, w.cols, X, nb, epi);
      break;
    case Kind::bf16:
      matvec(static_cast<const uint16_t*>(w.ptr), nullptr, w.rows, w.cols, X, nb, epi);
      break;
    case Kind::i8:
      matvec(static_cast<const int8_t*>(w.ptr), w.scale, w.rows, w.cols, X, nb, epi);
      break;
  }
}

// ---- the pieces of one layer ---------------------------------------------------------------------------
// xn[j] = x[j] / sqrt(mean(x[j]²) + eps) ⊙ g, for nb rows of d.
static void rms_norm(const float* x, const float* g, float eps, int64_t nb, int64_t d, float* xn) {
  for (int64_t j = 0; j < nb; ++j) {
    const float* xr = x + j * d;
    vf acc = splat(0.0f);
    int64_t i = 0;
    for (; i + VW <= d; i += VW) {
      const vf v = loadf(xr + i);
      acc += v * v;
    }
    float ss = hsum(acc);
    for (; i < d; ++i) ss += xr[i] * xr[i];
    const float inv = 1.0f / std::sqrt(ss / float(d) + eps);
    float* out = xn + j * d;
    i = 0;
    for (; i + VW <= d; i += VW) storef(out + i, loadf(xr + i) * inv * loadf(g + i));
    for (; i < d; ++i) out[i] = xr[i] * inv * g[i];
  }
}

// Δ, the scan step, D skip and gate for channels [c0, c1) of batch row j (c0 a multiple of VW):
//   Δ_c = softplus(bias_c + Σ_r dt_w[c, r] δ_r),  h_cn ← exp(Δ_c A_cn) h_cn + Δ_c B_n u_c,
//   y_c = (Σ_n C_n h_cn + D_c u_c) · silu(z_c).
// dtT is dt_proj's weight transposed, (R, e_pad), so Δ for VW channels is R vector FMAs.
template <class T>
static void scan_channels(const Layer& L, const T* dtT, const float* dt_scale, const float* xdbl,
                          const float* u, const float* z, float* h, float* y, int64_t c0, int64_t c1) {
  const int64_t R = L.dt_rank, N = L.d_state, ep = L.e_pad;
  const float* delta_in = xdbl;       // (R,)
  const float* B = xdbl + R;          // (N,)
  const float* C = xdbl + R + N;      // (N,)
  constexpr int64_t kCh = 64;         // channels per pass (kCh floats of Δ and gate on the stack)
  for (int64_t a0 = c0; a0 < c1; a0 += kCh) {
    const int64_t a1 = std::min(c1, a0 + kCh);
    float dt[kCh], gate[kCh];
    for (int64_t c = a0; c < a1; c += VW) {  // a0, kCh multiples of VW; e_pad covers the last vector
      vf acc = splat(0.0f);
      for (int64_t r = 0; r < R; ++r) acc += loadw(dtT + r * ep + c) * delta_in[r];
      if (dt_scale) acc *= loadf(dt_scale + c);
      storef(dt + (c - a0), vsoftplus(acc + loadf(L.dt_bias + c)));
    }
    silu_n(a1 - a0, z + a0, gate);
    for (int64_t c = a0; c < a1; ++c) {
      const float d = dt[c - a0], uc = u[c], du = d * uc;
      const float* A = L.A + c * N;
      float* hc = h + c * N;
      vf acc = splat(0.0f);
      int64_t n = 0;
      for (; n + VW <= N; n += VW) {
        const vf hn = vexp(loadf(A + n) * d) * loadf(hc + n) + du * loadf(B + n);
        storef(hc + n, hn);
        acc += loadf(C + n) * hn;
      }
      if (n < N) {  // the tail through zero-padded vectors: A = 0, h = B = C = 0 in the padding
        float Ab[VW] = {}, hb[VW] = {}, Bb[VW] = {}, Cb[VW] = {};
        for (int64_t i = n; i < N; ++i) Ab[i - n] = A[i], hb[i - n] = hc[i], Bb[i - n] = B[i], Cb[i - n] = C[i];
        const vf hn = vexp(loadf(Ab) * d) * loadf(hb) + du * loadf(Bb);
        acc += loadf(Cb) * hn;
        storef(hb, hn);
        for (int64_t i = n; i < N; ++i) hc[i] = hb[i - n];
      }
      y[c] = (hsum(acc) + L.D[c] * uc) * gate[c - a0];
    }
  }
}

static void scan_any(const Layer& L, const float* xdbl, const float* u, const float* z, float* h, float* y,
                     int64_t c0, int64_t c1) {
  switch (L.dtT.kind) {
    case Kind::f32:
      scan_channels(L, static_cast<const float*>(L.dtT.ptr), nullptr, xdbl, u, z, h, y, c0, c1);
      break;
    case Kind::bf16:
      scan_channels(L, static_cast<const uint16_t*>(L.dtT.ptr), nullptr, xdbl, u, z, h, y, c0, c1);
      break;
    case Kind::i8:
      scan_channels(L, static_cast<const int8_t*>(L.dtT.ptr), L.dtT.scale, xdbl, u, z, h, y, c0, c1);
      break;
  }
}

// Scratch of one step (nb rows each): the in_proj output, the conv output, the scan output, Mamba-2's
// gated output and Mamba's δ, B, C.
struct Scratch {
  float *zx, *u, *y, *ycat, *xdbl;
};

// The conv step of channel c (window: the state's last Kc − 1 inputs, then v); returns the pre-activation.
static inline float conv_step(float* s, const float* w, const float* bias, int64_t c, int64_t Kc, float v) {
  float a = bias ? bias[c] : 0.0f;
  for (int64_t k = 0; k + 1 < Kc; ++k) {
    a += w[k] * s[k + 1];
    s[k] = s[k + 1];
  }
  a += w[Kc - 1] * v;
  s[Kc - 1] = v;
  return a;
}

// One Mamba block on xn (normed), adding its output to hres.
static void mamba1_layer(const Model& M, const Layer& L, int64_t nb, float* cs, float* hs, const float* xn,
                         float* hres, const Scratch& S) {
  const int64_t Dm = M.d_model, E = L.d_inner, N = L.d_state, Kc = M.d_conv, X = L.xp.rows;
  float *u = S.u, *z = S.zx, *y = S.y, *xdbl = S.xdbl;
  // in_proj; the x half goes straight through the conv step, the z half is stored.
  matvec_any(L.in, xn, nb, [&](int64_t o, int64_t j, float v) {
    if (L.in_bias) v += L.in_bias[o];
    if (o < E)
      u[j * E + o] = conv_step(cs + (j * E + o) * Kc, L.conv_w + o * Kc, L.conv_bias, o, Kc, v);
    else
      z[j * E + o - E] = v;
  });
  silu_n(nb * E, u, u);
  matvec_any(L.xp, u, nb, [&](int64_t o, int64_t j, float v) { xdbl[j * X + o] = v; });
  const int64_t blocks = (E + 63) / 64;  // 64 channels per work item
  parallel_items(nb * blocks, [&](int64_t it) {
    const int64_t j = it / blocks, c0 = (it % blocks) * 64, c1 = std::min(E, c0 + 64);
    scan_any(L, xdbl + j * X, u + j * E, z + j * E, hs + j * E * N, y + j * E, c0, c1);
  });
  matvec_any(L.out, y, nb, [&](int64_t o, int64_t j, float v) {
    hres[j * Dm + o] += L.out_bias ? v + L.out_bias[o] : v;
  });
}

static inline float softplus1(float x) { return x > 20.0f ? x : std::log1p(std::exp(x)); }  // torch's threshold

// One Mamba-2 block (Dao & Gu 2024 §7.1), per sequence:
//   [z0, x0, z, xBC, dt] = W_in xn (+ b),  [x, B, C] = silu(conv step of xBC),
//   Δ_h = softplus(dt_h + dt_bias_h) (clamped to dt_limit when set),  per head h of group g:
//   s_h ← exp(Δ_h A_h) s_h + Δ_h x_h B_gᵀ  (headdim, N),  y_h = s_h C_g + D x_h,
//   y = RMSNorm_group(y ⊙ silu(z)) ⊙ w  (or RMSNorm(y) ⊙ w ⊙ silu(z), or y ⊙ silu(z) without the norm),
//   hres += W_out [silu(z0) ⊙ x0, y] (+ b).
static void mamba2_layer(const Model& M, const Layer& L, int64_t nb, float* cs, float* hs, const float* xn,
                         float* hres, const Scratch& S) {
  const int64_t Dm = M.d_model, Kc = M.d_conv, P = L.in.rows, H = L.nheads, Pd = L.headdim;
  const int64_t G = L.ngroups, N = L.d_state, Cd = L.conv_dim, Ds = L.d_ssm, Dl = L.d_mlp;
  const int64_t off_x = 2 * Dl + Ds, off_dt = off_x + Cd;  // in_proj rows: z0 | x0 | z | xBC | dt
  float *zx = S.zx, *u = S.u, *y = S.y, *ycat = S.ycat;
  matvec_any(L.in, xn, nb, [&](int64_t o, int64_t j, float v) {
    if (L.in_bias) v += L.in_bias[o];
    if (o >= off_x && o < off_dt) {
      const int64_t c = o - off_x;
      u[j * Cd + c] = conv_step(cs + (j * Cd + c) * Kc, L.conv_w + c * Kc, L.conv_bias, c, Kc, v);
    } else {
      zx[j * P + o] = v;
    }
  });
  silu_n(nb * Cd, u, u);
  const int64_t heads_per_group = H / G;
  parallel_items(nb * H, [&](int64_t it) {
    const int64_t j = it / H, hh = it % H, g = hh / heads_per_group;
    float dt = softplus1(zx[j * P + off_dt + hh] + L.dt_bias[hh]);
    if (L.dt_clamp) dt = std::min(std::max(dt, L.dt_lo), L.dt_hi);
    const vf dA = splat(std::exp(dt * L.A[hh]));
    const float* x = u + j * Cd + hh * Pd;
    const float* B = u + j * Cd + Ds + g * N;
    const float* C = u + j * Cd + Ds + G * N + g * N;
    float* sh = hs + (j * H + hh) * Pd * N;
    float* yh = y + j * Ds + hh * Pd;
    for (int64_t pi = 0; pi < Pd; ++pi) {
      const float xv = x[pi], dx = dt * xv;
      float* s = sh + pi * N;
      vf acc = splat(0.0f);
      int64_t n = 0;
      for (; n + VW <= N; n += VW) {
        const vf sn = dA * loadf(s + n) + dx * loadf(B + n);
        storef(s + n, sn);
        acc += loadf(C + n) * sn;
      }
      float a = hsum(acc);
      for (; n < N; ++n) {
        s[n] = dA[0] * s[n] + dx * B[n];
        a += C[n] * s[n];
      }
      yh[pi] = a + (L.D_per_channel ? L.D[hh * Pd + pi] : L.D[hh]) * xv;
    }
  });
  for (int64_t j = 0; j < nb; ++j) {
    float* zr = zx + j * P;  // z0 at 0, x0 at Dl, z at 2 Dl (no longer needed as they are: SiLU in place)
    float* z = zr + 2 * Dl;
    silu_n(Dl, zr, zr);
    silu_n(Ds, z, z);
    float* out = ycat + j * L.d_inner;
    for (int64_t c = 0; c < Dl; ++c) out[c] = zr[c] * zr[Dl + c];
    const float* yr = y + j * Ds;
    float* yo = out + Dl;
    if (!L.gnorm) {  // no norm: the gate goes into the SSD output
      for (int64_t c = 0; c < Ds; ++c) yo[c] = yr[c] * z[c];
      continue;
    }
    for (int64_t c = 0; c < Ds; ++c) yo[c] = L.norm_before_gate ? yr[c] : yr[c] * z[c];
    for (int64_t g0 = 0; g0 < Ds; g0 += L.norm_group) {
      float ss = 0.0f;
      for (int64_t c = g0; c < g0 + L.norm_group; ++c) ss += yo[c] * yo[c];
      const float inv = 1.0f / std::sqrt(ss / float(L.norm_group) + L.gnorm_eps);
      for (int64_t c = g0; c < g0 + L.norm_group; ++c) {
        yo[c] = yo[c] * inv * L.gnorm[c];
        if (L.norm_before_gate) yo[c] *= z[c];
      }
    }
  }
  matvec_any(L.out, ycat, nb, [&](int64_t o, int64_t j, float v) {
    hres[j * Dm + o] += L.out_bias ? v + L.out_bias[o] : v;
  });
}

// One token through every layer, the final norm and the head, for nb sequences.
static void step(const Model& M, const int64_t* ids, int64_t nb, float* const* conv, float* const* ssm,
                 float* logits) {
  const int64_t Dm = M.d_model;
  std::vector<float> buf(nb * (2 * Dm + M.max_in + M.max_conv + 2 * M.max_inner + M.max_xdbl));
  float* hres = buf.data();      // (nb, Dm) the residual stream, float32
  float* xn = hres + nb * Dm;    // (nb, Dm) normed
  Scratch S;
  S.zx = xn + nb * Dm;              // (nb, in_proj rows)
  S.u = S.zx + nb * M.max_in;       // (nb, conv_dim) conv branch: pre-activation, then silu
  S.y = S.u + nb * M.max_conv;      // (nb, d_inner) scan output
  S.ycat = S.y + nb * M.max_inner;  // (nb, d_inner) Mamba-2: [MLP part, gated and normed y]
  S.xdbl = S.ycat + nb * M.max_inner;  // (nb, R + 2N) Mamba: δ, B, C
  for (int64_t j = 0; j < nb; ++j) embed_row(M.embed, ids[j], hres + j * Dm);
  for (size_t li = 0; li < M.layers.size(); ++li) {
    const Layer& L = M.layers[li];
    rms_norm(hres, L.norm, M.eps, nb, Dm, xn);
    if (L.kind == 1)
      mamba1_layer(M, L, nb, conv[li], ssm[li], xn, hres, S);
    else
      mamba2_layer(M, L, nb, conv[li], ssm[li], xn, hres, S);
  }
  rms_norm(hres, M.norm_f, M.eps, nb, Dm, xn);
  const int64_t V = M.head.rows;
  matvec_any(M.head, xn, nb, [&](int64_t o, int64_t j, float v) { logits[j * V + o] = v; });
}

// y (nb, O) = x (nb, K) Wᵀ: the matrix-vector product alone (tests and the bandwidth benchmark).
static void gemv(const Weight& w, const float* x, int64_t nb, float* y) {
  const int64_t O = w.rows;
  matvec_any(w, x, nb, [&](int64_t o, int64_t j, float v) { y[j * O + o] = v; });
}
