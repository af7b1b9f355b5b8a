// The anchor updates with an fp32 state, fused into one pass over memory (CPU). Built and loaded by
// warpkit/anchor/fused.py, which also checks on first use that the results are bitwise those of the eager
// torch ops they replace (see that module's docstring for the formulas).
//
// Compiled with -ffp-contract=off: the only fused multiply-add is the explicit std::fma of `lerp`, which
// reproduces ATen's vectorised CPU lerp (`fmadd(weight < 0.5 ? w : w - 1, end - self, weight < 0.5 ? self :
// end)`); kFma = false is the unfused a * b + c of builds whose lerp does not use FMA. Everything else is
// rounded after each operation, as separate torch ops are.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Half.h>
#include <torch/csrc/utils/pybind.h>  // the at::Tensor caster, lighter than torch/extension.h

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kGrain = 1 << 16;  // elements per thread at least (torch's own grain is 32768)

// body(begin, end) over [0, n) in contiguous blocks, on at most torch.get_num_threads() threads (an explicit
// count: this library's OpenMP runtime need not be the one torch.set_num_threads configures)
template <class F>
void parallel(int64_t n, const F& body) {
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / kGrain));
  if (threads == 1) return body(0, n);
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static, 1)
#endif
  for (int64_t t = 0; t < threads; ++t) body(n * t / threads, n * (t + 1) / threads);
}

struct F32 {
  using T = float;
  static inline float load(float v) { return v; }
  static inline float store(float v) { return v; }
};

struct BF16 {  // c10::BFloat16's bits: load is exact, store rounds to nearest even (NaN -> 0x7FC0)
  using T = uint16_t;
  static inline float load(uint16_t v) {
    const uint32_t u = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
  static inline uint16_t store(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (u & 0x7FFFFFFFu) > 0x7F800000u ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
  }
};

struct F16 {  // c10::Half's own conversions (exact load, round to nearest even)
  using T = c10::Half;
  static inline float load(c10::Half v) { return static_cast<float>(v); }
  static inline c10::Half store(float f) { return c10::Half(f); }
};

struct NoOut {  // the state is the only output
  using T = float;
};

template <bool kFma>
inline float lerp(float self, float end, float coeff, bool small) {
  const float diff = end - self;
  const float base = small ? self : end;
  if constexpr (kFma) {
    return std::fma(coeff, diff, base);
  } else {
    return coeff * diff + base;
  }
}

// state <- lerp(state, policy, w); out <- state (rounded to out's dtype)
template <class P, class O, bool kFma>
void ema_range(float* __restrict__ state, const typename P::T* __restrict__ policy,
               typename O::T* __restrict__ out, int64_t begin, int64_t end, float coeff, bool small) {
  for (int64_t i = begin; i < end; ++i) {
    const float r = lerp<kFma>(state[i], P::load(policy[i]), coeff, small);
    state[i] = r;
    if constexpr (!std::is_same_v<O, NoOut>) out[i] = O::store(r);
  }
}

// ema <- lerp(ema, policy, beta); out <- ((policy - theta0) * alpha) + ema (fp32, each op rounded)
template <class P, class O, bool kFma>
void bema_range(float* __restrict__ ema, const typename P::T* __restrict__ theta0,
                const typename P::T* __restrict__ policy, typename O::T* __restrict__ out, int64_t begin,
                int64_t end, float coeff, bool small, float alpha) {
  for (int64_t i = begin; i < end; ++i) {
    const float x = P::load(policy[i]);
    const float m = lerp<kFma>(ema[i], x, coeff, small);
    ema[i] = m;
    const float shift = (x - P::load(theta0[i])) * alpha;
    out[i] = O::store(shift + m);
  }
}

template <class T>
T* ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

void touched(const at::Tensor& t) {  // what torch's in-place ops do: autograd sees the write
  if (!t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
}

template <class F>
void by_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(F32{});
    case at::kBFloat16: return f(BF16{});
    case at::kHalf: return f(F16{});
    default: TORCH_CHECK(false, "warpkit fused anchor: unsupported dtype ", dtype);
  }
}

void check_state(const at::Tensor& state, const at::Tensor& other) {
  TORCH_CHECK(state.device().is_cpu() && state.scalar_type() == at::kFloat && state.is_contiguous(),
              "warpkit fused anchor: the state must be a contiguous fp32 CPU tensor");
  TORCH_CHECK(other.device().is_cpu() && other.is_contiguous() && other.numel() == state.numel(),
              "warpkit fused anchor: every tensor must be a contiguous CPU tensor of the state's size");
}

float coeff_of(float w) { return std::abs(w) < 0.5f ? w : w - 1.0f; }

void ema_(const std::vector<at::Tensor>& state, const std::vector<at::Tensor>& policy,
          const std::vector<at::Tensor>& out, double weight, bool fma) {
  TORCH_CHECK(state.size() == policy.size() && state.size() == out.size(), "warpkit fused anchor: lists");
  const float w = static_cast<float>(weight);  // as ATen's lerp: the weight in the tensors' dtype
  const float coeff = coeff_of(w);
  const bool small = std::abs(w) < 0.5f;
  for (size_t k = 0; k < state.size(); ++k) {
    const at::Tensor &s = state[k], &p = policy[k], &o = out[k];
    check_state(s, p);
    const bool has_out = !o.is_same(s);
    if (has_out) check_state(s, o);
    {
      pybind11::gil_scoped_release no_gil;
      by_dtype(p.scalar_type(), [&](auto pt) {
        using P = decltype(pt);
        auto run = [&](auto ot) {
          using O = decltype(ot);
          float* sp = ptr<float>(s);
          const auto* pp = ptr<const typename P::T>(p);
          auto* op = has_out ? ptr<typename O::T>(o) : nullptr;
          parallel(s.numel(), [&](int64_t b, int64_t e) {
            fma ? ema_range<P, O, true>(sp, pp, op, b, e, coeff, small)
                : ema_range<P, O, false>(sp, pp, op, b, e, coeff, small);
          });
        };
        has_out ? by_dtype(o.scalar_type(), run) : run(NoOut{});
      });
    }
    touched(s);
    if (has_out) touched(o);
  }
}

void bema_(const std::vector<at::Tensor>& ema, const std::vector<at::Tensor>& theta0,
           const std::vector<at::Tensor>& policy, const std::vector<at::Tensor>& out, double beta,
           double alpha, bool fma) {
  TORCH_CHECK(ema.size() == theta0.size() && ema.size() == policy.size() && ema.size() == out.size(),
              "warpkit fused anchor: lists");
  const float w = static_cast<float>(beta);
  const float coeff = coeff_of(w);
  const bool small = std::abs(w) < 0.5f;
  const float a = static_cast<float>(alpha);  // as torch's mul_ by a Python float on an fp32 tensor
  for (size_t k = 0; k < ema.size(); ++k) {
    const at::Tensor &e = ema[k], &t = theta0[k], &p = policy[k], &o = out[k];
    check_state(e, t);
    check_state(e, p);
    check_state(e, o);
    TORCH_CHECK(t.scalar_type() == p.scalar_type(), "warpkit fused anchor: theta0 and policy dtypes");
    {
      pybind11::gil_scoped_release no_gil;
      by_dtype(p.scalar_type(), [&](auto pt) {
        using P = decltype(pt);
        by_dtype(o.scalar_type(), [&](auto ot) {
          using O = decltype(ot);
          float* ep = ptr<float>(e);
          const auto* tp = ptr<const typename P::T>(t);
          const auto* pp = ptr<const typename P::T>(p);
          auto* op = ptr<typename O::T>(o);
          parallel(e.numel(), [&](int64_t b, int64_t n) {
            fma ? bema_range<P, O, true>(ep, tp, pp, op, b, n, coeff, small, a)
                : bema_range<P, O, false>(ep, tp, pp, op, b, n, coeff, small, a);
          });
        });
      });
    }
    touched(e);
    touched(o);
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("ema_", &ema_, "state <- lerp(state, policy, w), out <- state; out_i is state_i: no out");
  m.def("bema_", &bema_, "ema <- lerp(ema, policy, beta), out <- ema + alpha (policy - theta0)");
}
