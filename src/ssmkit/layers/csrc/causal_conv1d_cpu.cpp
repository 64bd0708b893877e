// Causal depthwise conv1d + SiLU on the CPU, forward and backward (ssmkit.layers.conv; formulas there).
//
// One (batch row, channel) time series at a time, parallel over rows with at::parallel_for. Each pass
// over time is a unit-stride loop the compiler vectorises (K taps as K vectorised passes over an L1-sized
// row buffer; SiLU through the vectorised expf of -ffast-math/libmvec). The forward keeps nothing but its
// inputs: the backward recomputes the pre-activation a from x (K FMAs per element), so no (b, d, l)
// activation is stored besides x itself.
//
// Layouts: x (b, d, l) with unit stride in time (any batch/channel strides); weight (d, K) contiguous;
// bias (d,) or empty; history (b, d, K-1) contiguous or empty. float32 only.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// exp's argument is capped here: under -ffast-math (finite-math-only) an overflowing expf (a < −88.7)
// may come back as inf or garbage and a / (1 + inf) as NaN. SiLU(a) for a < −88 is below 1e-36 anyway.
constexpr float kExpMax = 88.f;

// Non-finite pre-activations get PyTorch's answers, decided on the bits (under -ffast-math the compiler
// may assume isinf/isnan false): SiLU(+inf) = +inf, SiLU(−inf) = −inf · 0 = NaN, SiLU(NaN) = NaN, and
// SiLU'(a) = NaN for all three (σ(a)(1 + a(1 − σ(a))) meets inf · 0).
inline uint32_t bits(float a) {
  uint32_t b;
  std::memcpy(&b, &a, sizeof b);
  return b;
}
inline float nan_value() {
  const uint32_t b = 0x7fc00000u;
  float a;
  std::memcpy(&a, &b, sizeof a);
  return a;
}
inline bool nonfinite(float a) { return (bits(a) & 0x7fffffffu) >= 0x7f800000u; }
constexpr uint32_t kNegInf = 0xff800000u;  // the bits of −inf

// a[t] = bias + sum_k w[k] * xp[t + k],  xp = [hist (K-1), x (l)]; rows computed into `a` (length l).
inline void preact(const float* x, const float* hist, const float* w, float bias, int64_t K, int64_t l,
                   float* a) {
  for (int64_t t = 0; t < l; ++t) a[t] = bias;
  for (int64_t k = 0; k < K; ++k) {
    const float wk = w[k];
    const int64_t shift = K - 1 - k;  // a[t] += wk * x[t - shift]
    const int64_t t0 = std::min(shift, l);
    for (int64_t t = 0; t < t0; ++t) {  // the first `shift` steps read the history
      const int64_t s = t - shift;      // in [-(K-1), -1]
      if (hist) a[t] += wk * hist[K - 1 + s];
    }
    const float* xs = x - shift;
#pragma omp simd
    for (int64_t t = t0; t < l; ++t) a[t] += wk * xs[t];
  }
}

void check(const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == torch::kFloat32 && x.stride(2) == 1,
              "x must be float32 (b, d, l) with unit time stride");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == torch::kFloat32 && w.size(0) == x.size(1),
              "weight must be float32 contiguous (d, K)");
}

}  // namespace

torch::Tensor fwd(torch::Tensor x, torch::Tensor w, torch::Tensor bias, torch::Tensor hist) {
  check(x, w);
  const int64_t b = x.size(0), d = x.size(1), l = x.size(2), K = w.size(1);
  const bool has_bias = bias.numel() > 0, has_hist = hist.numel() > 0;
  auto y = torch::empty({b, d, l}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = has_bias ? bias.data_ptr<float>() : nullptr;
  const float* hp = has_hist ? hist.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t sxb = x.stride(0), sxc = x.stride(1);
  at::parallel_for(0, b * d, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t ib = r / d, c = r % d;
      float* a = yp + r * l;
      preact(xp + ib * sxb + c * sxc, hp ? hp + r * (K - 1) : nullptr, wp + c * K, bp ? bp[c] : 0.f, K, l, a);
#pragma omp simd
      for (int64_t t = 0; t < l; ++t) {  // +inf and NaN come out right by themselves; −inf needs the select
        const float v = a[t], y = v / (1.f + std::exp(std::min(-v, kExpMax)));
        a[t] = bits(v) == kNegInf ? nan_value() : y;
      }
    }
  });
  return y;
}

// Returns dx (b, d, l), dw (d, K), dbias (d,) [empty without bias], dhist (b, d, K-1) [empty without history].
std::vector<torch::Tensor> bwd(torch::Tensor x, torch::Tensor w, torch::Tensor bias, torch::Tensor hist,
                               torch::Tensor gy) {
  check(x, w);
  gy = gy.contiguous();
  const int64_t b = x.size(0), d = x.size(1), l = x.size(2), K = w.size(1);
  const bool has_bias = bias.numel() > 0, has_hist = hist.numel() > 0;
  auto dx = torch::empty({b, d, l}, x.options());
  auto dwb = torch::zeros({b, d, K}, x.options());  // per batch row, summed below (no races)
  auto dbb = torch::zeros({b, d}, x.options());
  auto dh = has_hist ? torch::zeros({b, d, K - 1}, x.options()) : torch::empty({0}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = has_bias ? bias.data_ptr<float>() : nullptr;
  const float* hp = has_hist ? hist.data_ptr<float>() : nullptr;
  const float* gp = gy.data_ptr<float>();
  float* dxp = dx.data_ptr<float>();
  float* dwp = dwb.data_ptr<float>();
  float* dbp = dbb.data_ptr<float>();
  float* dhp = has_hist ? dh.data_ptr<float>() : nullptr;
  const int64_t sxb = x.stride(0), sxc = x.stride(1);
  at::parallel_for(0, b * d, 16, [&](int64_t lo, int64_t hi) {
    std::vector<float> buf(l);
    float* g = buf.data();
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t ib = r / d, c = r % d;
      const float* xr = xp + ib * sxb + c * sxc;
      const float* hr = hp ? hp + r * (K - 1) : nullptr;
      const float* wr = wp + c * K;
      preact(xr, hr, wr, bp ? bp[c] : 0.f, K, l, g);
      const float* gyr = gp + r * l;
      float db = 0.f;
#pragma omp simd reduction(+ : db)
      for (int64_t t = 0; t < l; ++t) {  // g' = gy * SiLU'(a) = gy * σ(a) (1 + a (1 - σ(a)))
        const float a = g[t];
        const float s = 1.f / (1.f + std::exp(std::min(-a, kExpMax)));
        g[t] = nonfinite(a) ? nan_value() : gyr[t] * s * (1.f + a * (1.f - s));
        db += g[t];
      }
      dbp[r] = db;
      float* dxr = dxp + r * l;
      for (int64_t t = 0; t < l; ++t) dxr[t] = 0.f;
      for (int64_t k = 0; k < K; ++k) {
        const float wk = wr[k];
        const int64_t shift = K - 1 - k;  // a[t] used x[t - shift]
        const int64_t t0 = std::min(shift, l);
        float acc = 0.f;
        for (int64_t t = 0; t < t0; ++t) {
          const int64_t s = t - shift;
          if (hr) {
            acc += g[t] * hr[K - 1 + s];
            dhp[r * (K - 1) + K - 1 + s] += wk * g[t];
          }
        }
        const float* xs = xr - shift;
        float* dxs = dxr - shift;
#pragma omp simd reduction(+ : acc)
        for (int64_t t = t0; t < l; ++t) {
          acc += g[t] * xs[t];
          dxs[t] += wk * g[t];
        }
        dwp[r * K + k] = acc;
      }
    }
  });
  auto dw = dwb.sum(0);
  auto db = has_bias ? dbb.sum(0) : torch::empty({0}, x.options());
  return {dx, dw, db, dh};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &fwd, "causal depthwise conv1d + SiLU forward");
  m.def("bwd", &bwd, "causal depthwise conv1d + SiLU backward (recomputes the pre-activation)");
}
