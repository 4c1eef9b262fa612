#pragma once
// Bit-exact comparison of whole runs (taps::StepSignals sequences): where two runs first differ, and a fingerprint
// of a run's signals. The experiment runner uses these for its determinism gate.
#include <algorithm>
#include <cstdint>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <fpf/compare/policies.hpp>
#include <fpf/taps/signals.hpp>

namespace fpf::compare {

// The first place two runs differ, in the order step, then token_id, hidden_states, key_vectors, logprobs, then
// layer and position ascending.
struct Divergence {
  std::size_t step = 0;
  std::string signal;     // "token_id", "hidden_states", "key_vectors", "logprobs.token_ids", "logprobs.log_probs",
                          // "step count", "layers", "positions"
  int layer = 0;          // 0 when the signal has no layer
  int position = 0;       // 0 when the signal has no position
  std::size_t index = 0;  // first differing element
  double a_value = 0, b_value = 0;
  double max_abs_diff = 0;      // over the first differing vector
  double max_abs_diff_run = 0;  // over every vector of the two runs that can be compared

  std::string describe() const {
    std::ostringstream s;
    s.precision(9);
    s << "step " << step << ", " << signal;
    if (layer) s << ", layer_" << layer;
    if (position) s << ", pos_" << position;
    s << ", element " << index << ": " << a_value << " vs " << b_value << " (max |diff| " << max_abs_diff
      << " in this vector, " << max_abs_diff_run << " over the run)";
    return s.str();
  }
};

namespace signals_detail {

inline double vec_max_abs(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() ? max_abs(a, b) : std::numeric_limits<double>::infinity();
}

// Fills d from the first differing element of a and b (same length assumed, or a length mismatch).
inline void locate(const std::vector<float>& a, const std::vector<float>& b, Divergence& d) {
  std::size_t n = std::min(a.size(), b.size()), i = 0;
  while (i < n && std::memcmp(&a[i], &b[i], sizeof(float)) == 0) ++i;
  d.index = i;
  d.a_value = i < a.size() ? a[i] : std::nan("");
  d.b_value = i < b.size() ? b[i] : std::nan("");
  d.max_abs_diff = vec_max_abs(a, b);
}

inline std::optional<Divergence> compare_layer_maps(std::size_t step, const char* name, const taps::LayerPosMap& a,
                                                    const taps::LayerPosMap& b) {
  if (a.size() != b.size() ||
      !std::equal(a.begin(), a.end(), b.begin(), [](auto& x, auto& y) { return x.first == y.first; }))
    return Divergence{step, std::string(name) + " layers"};
  for (const auto& [layer, pa] : a) {
    const auto& pb = b.at(layer);
    for (const auto& [pos, va] : pa) {
      auto it = pb.find(pos);
      if (it == pb.end()) return Divergence{step, std::string(name) + " positions", layer};
      if (!bit_exact(va, it->second)) {
        Divergence d{step, name, layer, pos};
        locate(va, it->second, d);
        return d;
      }
    }
  }
  return std::nullopt;
}

inline double run_max_abs(const std::vector<taps::StepSignals>& a, const std::vector<taps::StepSignals>& b) {
  double m = 0;
  auto maps = [&](const taps::LayerPosMap& x, const taps::LayerPosMap& y) {
    for (const auto& [layer, px] : x) {
      auto ly = y.find(layer);
      if (ly == y.end()) continue;
      for (const auto& [pos, vx] : px) {
        auto vy = ly->second.find(pos);
        if (vy != ly->second.end() && vx.size() == vy->second.size()) m = std::max(m, max_abs(vx, vy->second));
      }
    }
  };
  for (std::size_t s = 0; s < std::min(a.size(), b.size()); ++s) {
    maps(a[s].hidden_states, b[s].hidden_states);
    maps(a[s].key_vectors, b[s].key_vectors);
    for (const auto& [pos, ta] : a[s].logprobs) {
      auto tb = b[s].logprobs.find(pos);
      if (tb != b[s].logprobs.end() && ta.log_probs.size() == tb->second.log_probs.size())
        m = std::max(m, max_abs(ta.log_probs, tb->second.log_probs));
    }
  }
  return m;
}

}  // namespace signals_detail

// nullopt when the two runs are bit-identical (token ids, texts aside, and every signal value).
inline std::optional<Divergence> first_divergence(const std::vector<taps::StepSignals>& a,
                                                  const std::vector<taps::StepSignals>& b) {
  using namespace signals_detail;
  std::optional<Divergence> d;
  for (std::size_t s = 0; s < std::min(a.size(), b.size()) && !d; ++s) {
    const auto &x = a[s], &y = b[s];
    if (x.token_id != y.token_id) {
      d = Divergence{s, "token_id"};
      d->a_value = x.token_id;
      d->b_value = y.token_id;
      break;
    }
    if ((d = compare_layer_maps(s, "hidden_states", x.hidden_states, y.hidden_states))) break;
    if ((d = compare_layer_maps(s, "key_vectors", x.key_vectors, y.key_vectors))) break;
    for (const auto& [pos, tx] : x.logprobs) {
      auto ty = y.logprobs.find(pos);
      if (ty == y.logprobs.end()) {
        d = Divergence{s, "logprobs positions", 0, pos};
        break;
      }
      if (tx.token_ids != ty->second.token_ids) {
        d = Divergence{s, "logprobs.token_ids", 0, pos};
        std::size_t i = 0;
        while (i < std::min(tx.token_ids.size(), ty->second.token_ids.size()) &&
               tx.token_ids[i] == ty->second.token_ids[i])
          ++i;
        d->index = i;
        break;
      }
      if (!bit_exact(tx.log_probs, ty->second.log_probs)) {
        d = Divergence{s, "logprobs.log_probs", 0, pos};
        locate(tx.log_probs, ty->second.log_probs, *d);
        break;
      }
    }
    if (!d && x.logprobs.size() != y.logprobs.size()) d = Divergence{s, "logprobs positions"};
  }
  if (!d && a.size() != b.size()) {
    d = Divergence{std::min(a.size(), b.size()), "step count"};
    d->a_value = double(a.size());
    d->b_value = double(b.size());
  }
  if (d) d->max_abs_diff_run = run_max_abs(a, b);
  return d;
}

// FNV-1a 64 over every stored value of a run in file order (per step: token id, hidden states, key vectors,
// logprob ids and values). Equal fingerprints mean bit-identical signals.
inline std::uint64_t fingerprint(const std::vector<taps::StepSignals>& steps) {
  std::uint64_t h = kFnvOffset;
  auto maps = [&](const taps::LayerPosMap& m) {
    for (const auto& [layer, ps] : m)
      for (const auto& [pos, v] : ps) h = fingerprint(v, h);
  };
  for (const auto& s : steps) {
    h = fnv1a64(&s.token_id, sizeof s.token_id, h);
    maps(s.hidden_states);
    maps(s.key_vectors);
    for (const auto& [pos, t] : s.logprobs) {
      h = fnv1a64(t.token_ids.data(), t.token_ids.size() * sizeof(std::int32_t), h);
      h = fingerprint(t.log_probs, h);
    }
  }
  return h;
}

}  // namespace fpf::compare
