#pragma once
// Comparison policies for two float vectors of the same signal (a = reference, b = candidate). Each is usable on
// its own; the runner and the analysis build on them. Sums are accumulated in double, as numpy does after turning
// the JSON lists into float64 arrays (the seed's compute_l2_distance).
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <span>
#include <string>

#include <fpf/core/error.hpp>

namespace fpf::compare {

inline void check_same_size(std::span<const float> a, std::span<const float> b, const char* what) {
  if (a.size() != b.size())
    throw Error(what,
                "vectors differ in length (" + std::to_string(a.size()) + " vs " + std::to_string(b.size()) + ")");
}

// Same length and the same bits in every element (so -0.0 differs from 0.0, and a NaN equals only the same NaN).
inline bool bit_exact(std::span<const float> a, std::span<const float> b) noexcept {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size_bytes()) == 0);
}

// Euclidean distance ||a - b||.
inline double l2(std::span<const float> a, std::span<const float> b) {
  check_same_size(a, b, "compare::l2");
  double s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    double d = double(a[i]) - double(b[i]);
    s += d * d;
  }
  return std::sqrt(s);
}

inline double norm(std::span<const float> a) noexcept {
  double s = 0;
  for (float x : a) s += double(x) * double(x);
  return std::sqrt(s);
}

// ||a - b|| / ||a||. A zero reference gives 0 when b is zero too, +inf otherwise.
inline double relative_l2(std::span<const float> a, std::span<const float> b) {
  double d = l2(a, b), n = norm(a);
  if (n == 0) return d == 0 ? 0.0 : std::numeric_limits<double>::infinity();
  return d / n;
}

// Cosine similarity a.b / (||a|| ||b||). Two zero vectors are identical (1); one zero vector is orthogonal to
// everything (0).
inline double cosine(std::span<const float> a, std::span<const float> b) {
  check_same_size(a, b, "compare::cosine");
  double dot = 0, na = 0, nb = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    dot += double(a[i]) * double(b[i]);
    na += double(a[i]) * double(a[i]);
    nb += double(b[i]) * double(b[i]);
  }
  if (na == 0 || nb == 0) return na == nb ? 1.0 : 0.0;
  return dot / (std::sqrt(na) * std::sqrt(nb));
}

// max_i |a_i - b_i|.
inline double max_abs(std::span<const float> a, std::span<const float> b) {
  check_same_size(a, b, "compare::max_abs");
  double m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(double(a[i]) - double(b[i])));
  return m;
}

// How many float32 values lie between x and y, plus one (adjacent floats: 1; equal values and +-0: 0). Maps the
// bits to a line where integers order like the floats. A NaN on either side gives UINT64_MAX.
inline std::uint64_t ulp_distance(float x, float y) noexcept {
  if (std::isnan(x) || std::isnan(y)) return std::numeric_limits<std::uint64_t>::max();
  auto ordered = [](float f) {
    std::int64_t i = std::bit_cast<std::int32_t>(f);
    return i < 0 ? std::int64_t(std::numeric_limits<std::int32_t>::min()) - i : i;
  };
  std::int64_t d = ordered(x) - ordered(y);
  return std::uint64_t(d < 0 ? -d : d);
}

// max_i ulp_distance(a_i, b_i).
inline std::uint64_t max_ulp(std::span<const float> a, std::span<const float> b) {
  check_same_size(a, b, "compare::max_ulp");
  std::uint64_t m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, ulp_distance(a[i], b[i]));
  return m;
}

// FNV-1a 64-bit hash of bytes. Fold several tensors by passing the previous hash as `h`.
inline constexpr std::uint64_t kFnvOffset = 14695981039346656037ull;
inline constexpr std::uint64_t kFnvPrime = 1099511628211ull;

inline std::uint64_t fnv1a64(const void* data, std::size_t n, std::uint64_t h = kFnvOffset) noexcept {
  const unsigned char* p = static_cast<const unsigned char*>(data);
  for (std::size_t i = 0; i < n; ++i) {
    h ^= p[i];
    h *= kFnvPrime;
  }
  return h;
}

// Fingerprint of a tensor: FNV-1a 64 of its bytes as they lie in memory (little-endian float32).
inline std::uint64_t fingerprint(std::span<const float> v, std::uint64_t h = kFnvOffset) noexcept {
  return fnv1a64(v.data(), v.size_bytes(), h);
}

inline std::string hex64(std::uint64_t h) {
  static const char* digits = "0123456789abcdef";
  std::string s(16, '0');
  for (int i = 15; i >= 0; --i, h >>= 4) s[std::size_t(i)] = digits[h & 15];
  return s;
}

}  // namespace fpf::compare
