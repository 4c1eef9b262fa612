#pragma once
// Helpers for the CUDA tests: seeded random host data, device round trips, rel L2, storage-type rounding.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include <fpf/backend/cuda/common.cuh>

namespace fpf::cuda::testing {

inline std::vector<float> randn(std::size_t n, std::uint32_t seed, float scale = 1.0f) {
  std::mt19937 g(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = d(g);
  return v;
}

// Host value of T <-> float (exact widening; narrowing rounds to nearest even, as the device does).
template <class T> inline T to_t(float x);
template <> inline float to_t<float>(float x) { return x; }
template <> inline bf16 to_t<bf16>(float x) { return std::bit_cast<bf16>(f32_to_bf16(x)); }
template <> inline fp16 to_t<fp16>(float x) { return std::bit_cast<fp16>(f32_to_f16(x)); }
inline float to_host_f(float x) { return x; }
inline float to_host_f(bf16 x) { return bf16_to_f32(std::bit_cast<std::uint16_t>(x)); }
inline float to_host_f(fp16 x) { return f16_to_f32(std::bit_cast<std::uint16_t>(x)); }

// Rounds v to T in place (so the CPU reference sees exactly the GPU's inputs) and returns the T copy.
template <class T>
std::vector<T> round_to(std::vector<float>& v) {
  std::vector<T> t(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) t[i] = to_t<T>(v[i]), v[i] = to_host_f(t[i]);
  return t;
}

template <class T>
DeviceBuffer<T> to_device(const std::vector<T>& h) {
  DeviceBuffer<T> d(h.size() ? h.size() : 1);
  if (!h.empty()) d.upload(h.data(), h.size());
  return d;
}

template <class T>
std::vector<float> to_host(const DeviceBuffer<T>& d, std::size_t n) {
  FPF_CUDA(cudaDeviceSynchronize());
  const std::vector<T> t = d.download(n);
  std::vector<float> out(n);
  for (std::size_t i = 0; i < n; ++i) out[i] = to_host_f(t[i]);
  return out;
}

inline double rel_l2(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    const double d = static_cast<double>(a[i]) - b[i];
    num += d * d;
    den += static_cast<double>(b[i]) * b[i];
  }
  return den == 0 ? std::sqrt(num) : std::sqrt(num / den);
}

// The tolerance an op's output is tested against: fp32 1e-5 relative (the issue's bound; fp32 accumulation in a
// different order lands near 1e-7). bf16/fp16: the inputs are exactly representable (the CPU reference sees the
// rounded values), accumulation is fp32, and the output is rounded once to T, so each element is within the unit
// roundoff u of T (bf16 2^-8 = 3.9e-3, fp16 2^-11 = 4.9e-4) of the fp32 result; the bound is u (rel L2 <= max
// element error) plus fp32-order slack.
template <class T> constexpr double tolerance();
template <> constexpr double tolerance<float>() { return 1e-5; }
template <> constexpr double tolerance<bf16>() { return 3.9e-3 + 1e-5; }
template <> constexpr double tolerance<fp16>() { return 4.9e-4 + 1e-5; }

}  // namespace fpf::cuda::testing
