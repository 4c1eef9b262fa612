// Comparison policies on hand-made vectors, and divergence localization between runs.
#include <doctest/doctest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include <fpf/compare/policies.hpp>
#include <fpf/compare/signals.hpp>

using namespace fpf::compare;

TEST_CASE("compare: L2, relative L2, cosine, max-abs on a 3-4-5 triangle") {
  std::vector<float> a{3, 0}, b{0, 4};
  CHECK(l2(a, b) == 5.0);
  CHECK(relative_l2(a, b) == doctest::Approx(5.0 / 3.0));
  CHECK(cosine(a, b) == 0.0);
  CHECK(max_abs(a, b) == 4.0);
  std::vector<float> c{6, 8};  // parallel to {3, 4}
  std::vector<float> d{3, 4};
  CHECK(cosine(c, d) == doctest::Approx(1.0));
  CHECK(relative_l2(d, c) == doctest::Approx(1.0));  // ||(3,4)|| / ||(3,4)||
  CHECK(l2(a, a) == 0.0);
}

TEST_CASE("compare: zero vectors and length mismatch") {
  std::vector<float> z{0, 0}, a{1, 0};
  CHECK(relative_l2(z, z) == 0.0);
  CHECK(std::isinf(relative_l2(z, a)));
  CHECK(cosine(z, z) == 1.0);
  CHECK(cosine(z, a) == 0.0);
  std::vector<float> three{1, 2, 3};
  CHECK_THROWS_AS(l2(a, three), fpf::Error);
  CHECK_FALSE(bit_exact(a, three));
}

TEST_CASE("compare: bit-exact distinguishes -0.0 from 0.0, L2 does not") {
  std::vector<float> p{0.0f}, n{-0.0f};
  CHECK_FALSE(bit_exact(p, n));
  CHECK(l2(p, n) == 0.0);
  CHECK(bit_exact(p, p));
}

TEST_CASE("compare: ULP distance") {
  float one = 1.0f;
  CHECK(ulp_distance(one, std::nextafter(one, 2.0f)) == 1);
  CHECK(ulp_distance(one, 2.0f) == (1u << 23));  // one binade of 2^23 mantissa steps
  CHECK(ulp_distance(0.0f, -0.0f) == 0);
  float tiny = std::numeric_limits<float>::denorm_min();
  CHECK(ulp_distance(tiny, -tiny) == 2);  // -tiny, -0/+0, tiny
  CHECK(ulp_distance(-1.0f, 1.0f) == 2 * std::uint64_t(std::bit_cast<std::uint32_t>(1.0f)));
  CHECK(ulp_distance(std::nanf(""), 1.0f) == std::numeric_limits<std::uint64_t>::max());
  std::vector<float> a{1.0f, 2.0f}, b{std::nextafter(1.0f, 0.0f), 2.0f};
  CHECK(max_ulp(a, b) == 1);
}

TEST_CASE("compare: FNV-1a 64 test vectors and tensor fingerprints") {
  CHECK(fnv1a64("", 0) == 0xcbf29ce484222325ull);
  CHECK(fnv1a64("a", 1) == 0xaf63dc4c8601ec8cull);
  CHECK(fnv1a64("foobar", 6) == 0x85944171f73967e8ull);
  // 1.0f is the bytes 00 00 80 3f in memory (little-endian)
  std::vector<float> v{1.0f};
  const unsigned char bytes[] = {0x00, 0x00, 0x80, 0x3f};
  CHECK(fingerprint(v) == fnv1a64(bytes, 4));
  CHECK(hex64(0xaf63dc4c8601ec8cull) == "af63dc4c8601ec8c");
  CHECK(hex64(1) == "0000000000000001");
}

namespace {
std::vector<fpf::taps::StepSignals> two_steps() {
  std::vector<fpf::taps::StepSignals> steps(2);
  for (int s = 0; s < 2; ++s) {
    steps[s].step = s;
    steps[s].token_id = 10 + s;
    for (int l : {1, 4})
      for (int p : {-2, -1}) {
        steps[s].hidden_states[l][p] = {1.0f, 2.0f, 3.0f};
        steps[s].key_vectors[l][p] = {0.5f, 0.25f};
      }
    steps[s].logprobs[-1] = {{3, 4}, {-0.5f, -1.0f}};
  }
  return steps;
}
}  // namespace

TEST_CASE("compare: first divergence of two runs names step, signal, layer, position, element") {
  auto a = two_steps(), b = two_steps();
  CHECK_FALSE(first_divergence(a, b));
  CHECK(fingerprint(a) == fingerprint(b));

  // flip the lowest mantissa bit of one key value: 0.25 -> 0.25 + 2^-25
  float& k = b[1].key_vectors[4][-2][1];
  k = std::bit_cast<float>(std::bit_cast<std::uint32_t>(k) ^ 1u);
  auto d = first_divergence(a, b);
  REQUIRE(d);
  CHECK(d->step == 1);
  CHECK(d->signal == "key_vectors");
  CHECK(d->layer == 4);
  CHECK(d->position == -2);
  CHECK(d->index == 1);
  CHECK(d->max_abs_diff == std::ldexp(1.0, -25));
  CHECK(d->max_abs_diff_run == std::ldexp(1.0, -25));
  CHECK(fingerprint(a) != fingerprint(b));

  // an earlier, different token wins
  b[0].token_id = 99;
  d = first_divergence(a, b);
  REQUIRE(d);
  CHECK(d->step == 0);
  CHECK(d->signal == "token_id");
  CHECK(d->b_value == 99);

  auto c = two_steps();
  c.pop_back();
  d = first_divergence(a, c);
  REQUIRE(d);
  CHECK(d->signal == "step count");
}
