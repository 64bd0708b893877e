// The fused decode step of a Mamba language model on the CPU: one call per token for the whole model.
//
// Reference: Gu & Dao 2023 (arXiv 2312.00752) §3.4 and Alg. 2 (the selective SSM), one recurrent step
// (Mamba-2 blocks, Dao & Gu 2024 arXiv 2405.21060 §7: see step_mamba2 in decode_kernels.h):
//   per layer, with h the float32 residual stream of one sequence (d_model),
//     xn        = RMSNorm(h) ⊙ g                                   (d_model)
//     [x, z]    = W_in xn (+ b_in)                                 (2 d_inner)
//     u         = silu(conv_b + Σ_k conv_w[:, k] · [state[:, 1:], x][:, k])   the conv step; state ← window
//     [δ, B, C] = W_x u                                            (R + 2N)
//     Δ         = softplus(W_dt δ + b_dt)                          (d_inner)
//     s         ← exp(Δ A) ⊙ s + (Δ u) B^T                         (d_inner, N) float32, in place
//     y         = (s C + D ⊙ u) ⊙ silu(z)                          (d_inner)
//     h         ← h + W_out y (+ b_out)
//   then logits = W_head (RMSNorm(h) ⊙ g_f).
// The Python side is ssmkit/engine/decode.py; the module path (MambaLM.forward with a cache) is the slow
// twin the tests compare with.
//
// Glossary: d_model Dm, d_inner E, d_state N, dt_rank R, d_conv Kc, nb batch rows, V padded vocabulary;
// `Weight` one weight matrix (fp32, bf16 or int8 + per-row scales); `Layer` one block's packed tensors.
//
// Matrix-vector products: a tile of RT weight rows × 4 batch rows is accumulated in registers, so every
// weight is read from memory once per step whatever the batch (the tile's rows stay in L1 while the batch
// rows pass), and bf16 / int8 weights are widened to fp32 in registers. Activations and states stay fp32.
//
// Instruction sets: decode_kernels.h is compiled three times (AVX-512, AVX2 + FMA, baseline) under
// `#pragma GCC target`, and `step` picks the best one the CPU reports (__builtin_cpu_supports), or the one
// asked for. The file itself is compiled without -march, so the baseline copy runs on any x86-64 CPU.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

namespace py = pybind11;

namespace ssmkit_decode {

enum class Kind { f32, bf16, i8 };

struct Weight {
  at::Tensor t, s;  // kept alive; s: (rows,) float32 scales for int8, else undefined
  Kind kind = Kind::f32;
  const void* ptr = nullptr;
  const float* scale = nullptr;
  int64_t rows = 0, cols = 0;
};

// A Mamba (kind 1) or Mamba-2 (kind 2) block. Mamba-2 leaves xp / dtT empty and dt_rank 0; its A, dt_bias
// are per head, D per head or per channel; conv_dim = d_ssm + 2 ngroups d_state channels are convolved.
struct Layer {
  int kind = 1;
  const float *norm, *in_bias, *conv_w, *conv_bias, *dt_bias, *A, *D, *out_bias;
  Weight in, xp, dtT, out;
  int64_t d_inner, d_state, dt_rank, e_pad;
  // Mamba-2 only
  const float* gnorm = nullptr;  // (d_ssm,) the gated RMSNorm's weight; null without rmsnorm
  int64_t nheads = 0, headdim = 0, ngroups = 0, d_ssm = 0, d_mlp = 0, conv_dim = 0, norm_group = 0;
  bool D_per_channel = false, norm_before_gate = false, dt_clamp = false;
  float gnorm_eps = 1e-5f, dt_lo = 0.0f, dt_hi = 0.0f;
};

struct Model {
  std::vector<Layer> layers;
  std::vector<at::Tensor> keep;  // the float32 tensors the raw pointers above point into
  Weight embed, head;
  const float* norm_f = nullptr;
  float eps = 1e-5f;
  int64_t d_model = 0, d_conv = 0;
  // the largest per-layer sizes, for the step's buffers
  int64_t max_in = 0, max_conv = 0, max_inner = 0, max_xdbl = 0;
};

// Work items are taken from a shared counter, not split statically: on a shared machine one thread may
// run at half speed, and a static split would make every call wait for it.
template <class F>
static void parallel_items(int64_t items, const F& fn) {
  if (items <= 0) return;
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items));
  if (workers == 1) {
    for (int64_t i = 0; i < items; ++i) fn(i);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t w = lo; w < hi; ++w)
      for (int64_t i = next++; i < items; i = next++) fn(i);
  });
}

static inline float bf16_to_f32(uint16_t b) {
  const uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// One embedding row as float32 (int8 rows times their scale).
static void embed_row(const Weight& w, int64_t id, float* out) {
  const int64_t d = w.cols;
  switch (w.kind) {
    case Kind::f32: {
      const float* p = static_cast<const float*>(w.ptr) + id * d;
      std::memcpy(out, p, d * sizeof(float));
      break;
    }
    case Kind::bf16: {
      const uint16_t* p = static_cast<const uint16_t*>(w.ptr) + id * d;
      for (int64_t i = 0; i < d; ++i) out[i] = bf16_to_f32(p[i]);
      break;
    }
    case Kind::i8: {
      const int8_t* p = static_cast<const int8_t*>(w.ptr) + id * d;
      const float s = w.scale[id];
      for (int64_t i = 0; i < d; ++i) out[i] = float(p[i]) * s;
      break;
    }
  }
}

#if defined(__x86_64__) || defined(__i386__)
#define SSMKIT_X86 1
#endif
#ifdef SSMKIT_X86
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace avx512 {
#define SSMKIT_VW 16
#include "decode_kernels.h"
#undef SSMKIT_VW
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#define SSMKIT_VW 8
#include "decode_kernels.h"
#undef SSMKIT_VW
}  // namespace avx2
#pragma GCC pop_options
#endif

namespace generic {
#define SSMKIT_VW 4
#include "decode_kernels.h"
#undef SSMKIT_VW
}  // namespace generic

// ---- instruction-set dispatch ---------------------------------------------------------------------------
static bool has_isa(const std::string& isa) {
#ifdef SSMKIT_X86
  __builtin_cpu_init();
  if (isa == "avx512") return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                              __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return isa == "generic";
}

static std::vector<std::string> available_isas() {
  std::vector<std::string> out;
  for (const char* isa : {"avx512", "avx2", "generic"})
    if (has_isa(isa)) out.push_back(isa);
  return out;
}

static std::string best_isa() { return available_isas().front(); }

// ---- packing ----------------------------------------------------------------------------------------------
// scale_per_column: the scales belong to the columns (the transposed dt_proj), else to the rows.
static Weight make_weight(const at::Tensor& t, const at::Tensor& scale, const char* what,
                          bool scale_per_column = false) {
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous() && t.device().is_cpu(), what,
              ": expected a contiguous 2-D CPU tensor, got shape ", t.sizes());
  Weight w;
  w.t = t;
  w.rows = t.size(0);
  w.cols = t.size(1);
  w.ptr = t.data_ptr();
  if (t.scalar_type() == at::kFloat) {
    w.kind = Kind::f32;
  } else if (t.scalar_type() == at::kBFloat16) {
    w.kind = Kind::bf16;
  } else if (t.scalar_type() == at::kChar) {
    TORCH_CHECK(scale.defined() && scale.numel() == (scale_per_column ? w.cols : w.rows) && scale.scalar_type() == at::kFloat &&
                    scale.is_contiguous(),
                what, ": int8 weights need one float32 scale per ", scale_per_column ? "column" : "row");
    w.kind = Kind::i8;
    w.s = scale;
    w.scale = scale.data_ptr<float>();
  } else {
    TORCH_CHECK(false, what, ": weight dtype must be float32, bfloat16 or int8, got ", t.scalar_type());
  }
  return w;
}

class Decoder {
 public:
  // layers: per Mamba layer [norm (Dm), in_w (2E, Dm), in_s, in_b, conv_w (E, Kc), conv_b, x_w (R+2N, E),
  //   x_s, dtT (R, e_pad), dtT_s (e_pad), dt_b (e_pad), A (E, N), D (E), out_w (Dm, E), out_s, out_b];
  //   per Mamba-2 layer [norm (Dm), in_w (P, Dm), in_s, in_b, conv_w (conv_dim, Kc), conv_b, dt_b (H),
  //   A (H), D (H or d_ssm), gnorm_w (d_ssm or empty), out_w (Dm, d_inner), out_s, out_b], with params =
  //   [nheads, headdim, ngroups, d_state, d_mlp, norm_before_gate, gnorm_eps, dt_lo, dt_hi, dt_clamp]
  //   (empty for a Mamba layer). Float tensors float32 contiguous; an absent bias or scale is empty.
  Decoder(const std::vector<std::vector<at::Tensor>>& layers, const std::vector<std::vector<double>>& params,
          const at::Tensor& embed, const at::Tensor& embed_s, const at::Tensor& norm_f,
          const at::Tensor& head, const at::Tensor& head_s, double eps, int64_t d_conv) {
    auto f32 = [&](const at::Tensor& t, int64_t n, const char* what) -> const float* {
      if (!t.defined() || t.numel() == 0) return nullptr;
      TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == n, what,
                  ": expected ", n, " contiguous float32 values, got ", t.sizes(), " ", t.scalar_type());
      M.keep.push_back(t);
      return t.data_ptr<float>();
    };
    auto opt = [](const at::Tensor& t) { return t.numel() ? t : at::Tensor(); };
    M.embed = make_weight(embed, opt(embed_s), "embedding");
    M.head = make_weight(head, opt(head_s), "lm_head");
    M.d_model = M.embed.cols;
    TORCH_CHECK(M.head.cols == M.d_model, "lm_head: expected ", M.d_model, " columns");
    M.norm_f = f32(norm_f, M.d_model, "norm_f");
    M.eps = float(eps);
    M.d_conv = d_conv;
    TORCH_CHECK(params.size() == layers.size(), "one params list per layer");
    for (size_t li = 0; li < layers.size(); ++li) {
      const auto& t = layers[li];
      const auto& q = params[li];
      Layer L{};
      if (q.empty()) {
        TORCH_CHECK(t.size() == 16, "each Mamba layer needs 16 tensors, got ", t.size());
        L.kind = 1;
        L.in = make_weight(t[1], opt(t[2]), "in_proj");
        L.xp = make_weight(t[6], opt(t[7]), "x_proj");
        L.dtT = make_weight(t[8], opt(t[9]), "dt_proj (transposed)", true);
        L.out = make_weight(t[13], opt(t[14]), "out_proj");
        const int64_t E = L.in.rows / 2;
        L.d_inner = E;
        L.dt_rank = L.dtT.rows;
        L.e_pad = L.dtT.cols;
        L.d_state = (L.xp.rows - L.dt_rank) / 2;
        TORCH_CHECK(L.in.cols == M.d_model && L.xp.cols == E && L.out.rows == M.d_model && L.out.cols == E &&
                        L.e_pad >= E && L.e_pad % 16 == 0,
                    "inconsistent layer shapes");
        L.norm = f32(t[0], M.d_model, "norm");
        L.in_bias = f32(t[3], 2 * E, "in_proj.bias");
        L.conv_w = f32(t[4], E * d_conv, "conv1d.weight");
        L.conv_bias = f32(t[5], E, "conv1d.bias");
        L.dt_bias = f32(t[10], L.e_pad, "dt_proj.bias");
        L.A = f32(t[11], E * L.d_state, "A");
        L.D = f32(t[12], E, "D");
        L.out_bias = f32(t[15], M.d_model, "out_proj.bias");
        TORCH_CHECK(L.norm && L.conv_w && L.dt_bias && L.A && L.D, "missing layer tensors");
        L.conv_dim = E;
      } else {
        TORCH_CHECK(t.size() == 13 && q.size() == 10, "each Mamba-2 layer needs 13 tensors and 10 params");
        L.kind = 2;
        L.nheads = int64_t(q[0]), L.headdim = int64_t(q[1]), L.ngroups = int64_t(q[2]);
        L.d_state = int64_t(q[3]), L.d_mlp = int64_t(q[4]);
        L.norm_before_gate = q[5] != 0.0, L.gnorm_eps = float(q[6]);
        L.dt_lo = float(q[7]), L.dt_hi = float(q[8]), L.dt_clamp = q[9] != 0.0;
        L.in = make_weight(t[1], opt(t[2]), "in_proj");
        L.out = make_weight(t[10], opt(t[11]), "out_proj");
        const int64_t H = L.nheads, Pd = L.headdim, G = L.ngroups, N = L.d_state;
        TORCH_CHECK(H > 0 && Pd > 0 && G > 0 && H % G == 0 && N > 0 && L.d_mlp >= 0, "bad Mamba-2 params");
        L.d_ssm = H * Pd;
        L.d_inner = L.d_ssm + L.d_mlp;
        L.conv_dim = L.d_ssm + 2 * G * N;
        TORCH_CHECK(L.in.cols == M.d_model && L.in.rows == 2 * L.d_inner + 2 * G * N + H &&
                        L.out.rows == M.d_model && L.out.cols == L.d_inner,
                    "inconsistent Mamba-2 layer shapes");
        L.norm = f32(t[0], M.d_model, "norm");
        L.in_bias = f32(t[3], L.in.rows, "in_proj.bias");
        L.conv_w = f32(t[4], L.conv_dim * d_conv, "conv1d.weight");
        L.conv_bias = f32(t[5], L.conv_dim, "conv1d.bias");
        L.dt_bias = f32(t[6], H, "dt_bias");
        L.A = f32(t[7], H, "A");
        L.D_per_channel = t[8].numel() == L.d_ssm && L.d_ssm != H;
        L.D = f32(t[8], L.D_per_channel ? L.d_ssm : H, "D");
        L.gnorm = f32(t[9], L.d_ssm, "norm.weight");
        L.norm_group = L.d_ssm / G;
        L.out_bias = f32(t[12], M.d_model, "out_proj.bias");
        TORCH_CHECK(L.norm && L.conv_w && L.dt_bias && L.A && L.D, "missing layer tensors");
      }
      M.max_in = std::max(M.max_in, L.in.rows);
      M.max_conv = std::max(M.max_conv, L.conv_dim);
      M.max_inner = std::max(M.max_inner, L.d_inner);
      M.max_xdbl = std::max(M.max_xdbl, L.kind == 1 ? L.xp.rows : int64_t(0));
      M.layers.push_back(L);
    }
  }

  // The tensors whose values the packed weights were made from (the model's parameters and buffers):
  // `current()` is false once any of them has new data, dtype or version (an in-place update).
  void set_sources(const std::vector<at::Tensor>& sources) {
    sources_ = sources;
    signature_.clear();
    for (const auto& t : sources_) signature_.push_back(signature_of(t));
  }
  bool current() const {
    for (size_t i = 0; i < sources_.size(); ++i)
      if (signature_of(sources_[i]) != signature_[i]) return false;
    return true;
  }

  // One token for every sequence. ids (nb,) int64; states: the cache's per-layer state objects (with
  // float32 contiguous conv_state (nb, conv_dim, Kc) and ssm_state (nb, E, N) for Mamba or (nb, nheads,
  // headdim, N) for Mamba-2, updated in place — any other
  // state tensor is first replaced, on the object, by a float32 contiguous copy). Returns (nb, V) logits.
  at::Tensor step(const at::Tensor& ids, const py::list& states, const std::string& isa) {
    TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == at::kLong, "ids must be a 1-D int64 tensor");
    const int64_t nb = ids.size(0);
    TORCH_CHECK((int64_t)py::len(states) == (int64_t)M.layers.size(), "expected ", M.layers.size(),
                " layer states, got ", py::len(states));
    auto idc = ids.contiguous();
    std::vector<float*> conv(M.layers.size()), ssm(M.layers.size());
    for (size_t i = 0; i < M.layers.size(); ++i) {
      py::object s = states[i];
      const Layer& L = M.layers[i];
      conv[i] = state_ptr(s, "conv_state", {nb, L.conv_dim, M.d_conv});
      ssm[i] = L.kind == 1 ? state_ptr(s, "ssm_state", {nb, L.d_inner, L.d_state})
                           : state_ptr(s, "ssm_state", {nb, L.nheads, L.headdim, L.d_state});
    }
    auto logits = at::empty({nb, M.head.rows}, at::kFloat);
    const std::string use = isa == "auto" ? best_isa() : isa;
    TORCH_CHECK(has_isa(use), "instruction set ", use, " is not available on this CPU");
    const int64_t* id = idc.data_ptr<int64_t>();
    for (int64_t j = 0; j < nb; ++j)
      TORCH_CHECK(id[j] >= 0 && id[j] < M.embed.rows, "token id ", id[j], " is outside the embedding's [0, ",
                  M.embed.rows, ")");
    float* out = logits.data_ptr<float>();
    {
      py::gil_scoped_release nogil;
#ifdef SSMKIT_X86
      if (use == "avx512")
        avx512::step(M, id, nb, conv.data(), ssm.data(), out);
      else if (use == "avx2")
        avx2::step(M, id, nb, conv.data(), ssm.data(), out);
      else
#endif
        generic::step(M, id, nb, conv.data(), ssm.data(), out);
    }
    return logits;
  }

 private:
  Model M;
  std::vector<at::Tensor> sources_;
  std::vector<std::array<int64_t, 3>> signature_;

  static std::array<int64_t, 3> signature_of(const at::Tensor& t) {
    const int64_t version = t.is_inference() ? 0 : int64_t(t._version());
    return {reinterpret_cast<int64_t>(t.data_ptr()), version, int64_t(t.scalar_type())};
  }

  static float* state_ptr(py::object& s, const char* name, std::vector<int64_t> shape) {
    at::Tensor t = s.attr(name).cast<at::Tensor>();
    TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), name, ": expected shape ", at::IntArrayRef(shape),
                ", got ", t.sizes());
    if (t.scalar_type() != at::kFloat || !t.is_contiguous() || t.requires_grad() || !t.device().is_cpu()) {
      t = t.detach().to(at::kCPU, at::kFloat).contiguous().clone();
      s.attr(name) = t;
    }
    return t.data_ptr<float>();
  }
};

// y = x Wᵀ through the step's matrix-vector product: weight (O, K) float32 / bfloat16 / int8 (+ scales),
// x (nb, K) float32 -> y (nb, O) float32.
static at::Tensor gemv(const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& x,
                       const std::string& isa) {
  const Weight w = make_weight(weight, scale.numel() ? scale : at::Tensor(), "weight");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.cols && x.scalar_type() == at::kFloat, "x must be (nb, ", w.cols,
              ") float32");
  auto xc = x.contiguous();
  const int64_t nb = xc.size(0);
  auto y = at::empty({nb, w.rows}, at::kFloat);
  const std::string use = isa == "auto" ? best_isa() : isa;
  TORCH_CHECK(has_isa(use), "instruction set ", use, " is not available on this CPU");
  py::gil_scoped_release nogil;
#ifdef SSMKIT_X86
  if (use == "avx512")
    avx512::gemv(w, xc.data_ptr<float>(), nb, y.data_ptr<float>());
  else if (use == "avx2")
    avx2::gemv(w, xc.data_ptr<float>(), nb, y.data_ptr<float>());
  else
#endif
    generic::gemv(w, xc.data_ptr<float>(), nb, y.data_ptr<float>());
  return y;
}

}  // namespace ssmkit_decode

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<ssmkit_decode::Decoder>(m, "Decoder")
      .def(py::init<const std::vector<std::vector<at::Tensor>>&, const std::vector<std::vector<double>>&,
                    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                    const at::Tensor&, double, int64_t>())
      .def("step", &ssmkit_decode::Decoder::step, "one fused decode step for every sequence")
      .def("set_sources", &ssmkit_decode::Decoder::set_sources, "the tensors the packing was made from")
      .def("current", &ssmkit_decode::Decoder::current, "whether none of those tensors has changed");
  m.def("gemv", &ssmkit_decode::gemv, "y = x W^T through the fused step's matrix-vector product");
  m.def("available_isas", &ssmkit_decode::available_isas, "instruction sets this CPU runs, best first");
}
