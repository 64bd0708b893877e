// Vector math for the fused selective scan: 16 float lanes as a GCC/Clang vector extension type.
//
// The scan is vectorised ACROSS channels: one `vf` holds the same quantity (Δ, h[n], exp(ΔA[n]), ...)
// for 16 consecutive channels. The vector extension lowers to whatever the target has (one zmm register
// with AVX-512, two ymm with AVX2, four xmm with SSE/NEON), so the code stays portable while the hot loop
// is guaranteed to be SIMD (no reliance on the auto-vectoriser or on libmvec).
//
// exp, log, softplus and sigmoid are written here as short polynomials (no table, no libm call):
//   exp(x)  = 2^(k−1) · 2p(r),  k = round(x / ln 2),  r = x − k ln 2 (Cody–Waite split), p = Taylor
//             degree 6 (|r| ≤ ln2/2 → truncation ≤ 1.2e-7 relative, about one float32 ulp). x is clamped to
//             [−87.5, 89]; at the ends 2^(k−1) is 0 (k = −126) or 2^127 (k = 128, and 2p(r)·2^127
//             overflows to +inf exactly where e^x exceeds FLT_MAX). So exp(−inf) = 0, exp(+inf) = +inf,
//             exp(NaN) = NaN (the clamp keeps NaN), as libm's; below x ≈ −87 it gives 0 where libm gives a
//             denormal (absolute error below 1.2e-38). Inside the normal range the value is that of
//             2^k · p(r) bit for bit (doubling every coefficient is exact).
//   log(x)  = e ln 2 + log1p(f),  x = 2^e (1 + f),  1 + f ∈ [√½, √2), log1p(f) = f − f²/2 + f³ P(f)
//             with the classical single-precision minimax P (Cephes' logf coefficients).
//   softplus(x) = max(x, 0) + log1p(exp(−|x|)), log1p(y) = log(1 + y) · y / ((1 + y) − 1) (Goldberg's
//             trick keeps full relative precision for tiny y).
//   sigmoid(x) = 1 / (1 + exp(−x)).
#pragma once

#include <cstdint>

namespace ssmkit_scan {

constexpr int W = 16;  // lanes (channels) per vector

typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));

static inline vf splat(float x) {  // a broadcast (vf{} + x would add +0.0, which is not folded away)
  return vf{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x};
}

static inline vf vmax(vf a, vf b) { return a > b ? a : b; }  // maps to one max instruction
static inline vf vmin(vf a, vf b) { return a < b ? a : b; }

static inline vf vexp(vf x) {
  const vf lo = splat(-87.5f);  // round(lo / ln 2) = −126: 2^(k−1) has a zero exponent field -> 0
  const vf hi = splat(89.0f);   // round(hi / ln 2) = 128: 2^127, and 2p(r)·2^127 = +inf beyond FLT_MAX
  x = x < lo ? lo : x;  // written so that a NaN x stays NaN (one max/min instruction each)
  x = x > hi ? hi : x;
  const float magic = 12582912.0f;  // 1.5 · 2^23: adding it rounds to the nearest integer
  const vf km = x * 1.44269504088896341f + magic;  // bits: those of magic with k in the low mantissa
  const vf k = km - magic;
  vf r = x - k * 0.693145751953125f;  // ln 2 = hi + lo, hi exact in 12 bits so k·hi is exact
  r = r - k * 1.428606765330187045e-06f;
  vf p = splat(2.0f / 720.0f);  // 2·p(r): every Taylor coefficient doubled (exact in binary)
  p = p * r + 2.0f / 120.0f;
  p = p * r + 2.0f / 24.0f;
  p = p * r + 2.0f / 6.0f;
  p = p * r + 1.0f;
  p = p * r + 2.0f;
  p = p * r + 2.0f;
  const vf scale = (vf)(((vi)km + 126) << 23);  // 2^(k−1): (magic's bits + k + 126) << 23 drops magic
  return p * scale;
}

// Natural log for positive, normal x (the only use here: x = 1 + y, y ∈ [0, 1]).
static inline vf vlog(vf x) {
  const vi xi = (vi)x;
  vi e = ((xi >> 23) & 0xff) - 127;
  vf m = (vf)((xi & 0x007fffff) | 0x3f800000);  // mantissa in [1, 2)
  const vi big = m > 1.41421356237f;
  m = big ? m * 0.5f : m;
  e = big ? e + 1 : e;
  const vf f = m - 1.0f;  // in [√½ − 1, √2 − 1)
  const vf f2 = f * f;
  vf p = splat(7.0376836292e-2f);
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  const vf ef = __builtin_convertvector(e, vf);
  vf y = p * f * f2;
  y = y + ef * -2.12194440e-4f;
  y = y - 0.5f * f2;
  return f + y + ef * 0.693359375f;
}

static inline vf vsoftplus(vf x) {
  const vf y = vexp(-(x < 0 ? -x : x));  // exp(−|x|) ∈ (0, 1]
  const vf u = 1.0f + y;
  const vf d = u - 1.0f;
  const vf log1p_y = d == 0 ? y : vlog(u) * (y / (d == 0 ? splat(1.0f) : d));
  return vmax(x, vf{}) + log1p_y;
}

static inline vf vsigmoid(vf x) { return 1.0f / (1.0f + vexp(-x)); }

static inline float hsum(vf v) {
  float s = 0.0f;
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
}

}  // namespace ssmkit_scan
