#pragma once
// Reads tests/fixtures/models/NAME/reference.json (written by make_fixtures.py from Hugging Face) into the same
// taps::SequenceSignals the engine produces, and compares the two with the tolerances.
#include <boost/json.hpp>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <fpf/taps/signals.hpp>

namespace fpf::testing {

inline std::filesystem::path fixture_dir(const std::string& name) {
  return std::filesystem::path(FPF_SOURCE_DIR) / "tests" / "fixtures" / "models" / name;
}

inline const std::vector<std::string>& fixture_names() {
  static const std::vector<std::string> names{"dense_tied", "moe_sparse_step", "moe_no_norm", "moe_bf16_sharded", "moe_real_vocab"};
  return names;
}

struct Reference {
  taps::SequenceSignals signals;
  taps::TapSpec spec;
  int steps = 0;
};

inline std::vector<float> floats(const boost::json::value& v) {
  std::vector<float> out;
  for (const auto& x : v.as_array()) out.push_back(static_cast<float>(x.to_number<double>()));
  return out;
}

inline int suffix_int(std::string_view key) { return std::stoi(std::string(key.substr(key.find('_') + 1))); }

inline Reference load_reference(const std::string& name) {
  std::ifstream f(fixture_dir(name) / "reference.json");
  std::stringstream ss;
  ss << f.rdbuf();
  const boost::json::object root = boost::json::parse(ss.str()).as_object();
  Reference r;
  r.spec.layers.clear();
  for (const auto& v : root.at("prompt_ids").as_array()) r.signals.prompt_ids.push_back(static_cast<std::int32_t>(v.as_int64()));
  for (const auto& v : root.at("layers").as_array()) r.spec.layers.push_back(static_cast<int>(v.as_int64()));
  r.spec.positions.clear();
  for (const auto& v : root.at("positions").as_array()) r.spec.positions.push_back(static_cast<int>(v.as_int64()));
  r.spec.topk = static_cast<int>(root.at("topk").as_int64());
  r.steps = static_cast<int>(root.at("steps_count").as_int64());
  for (const auto& sv : root.at("steps").as_array()) {
    const auto& so = sv.as_object();
    taps::StepSignals st;
    st.step = static_cast<int>(so.at("step").as_int64());
    st.token_id = static_cast<std::int32_t>(so.at("token_id").as_int64());
    for (const char* kind : {"hidden_states", "key_vectors"}) {
      taps::LayerPosMap& m = std::string(kind) == "hidden_states" ? st.hidden_states : st.key_vectors;
      for (const auto& [lk, lv] : so.at(kind).as_object())
        for (const auto& [pk, pv] : lv.as_object()) m[suffix_int(lk)][suffix_int(pk)] = floats(pv);
    }
    for (const auto& [pk, pv] : so.at("logprobs").as_object()) {
      taps::TopK t;
      for (const auto& id : pv.at("token_ids").as_array()) t.token_ids.push_back(static_cast<std::int32_t>(id.as_int64()));
      t.log_probs = floats(pv.at("log_probs"));
      st.logprobs[suffix_int(pk)] = t;
    }
    r.signals.steps.push_back(std::move(st));
  }
  return r;
}

// ||a - b|| / ||b||
inline double rel_l2(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double d = static_cast<double>(a[i]) - b[i];
    num += d * d;
    den += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(num) / std::sqrt(den);
}


// Two runs' signals equal bit for bit (tokens, hidden states, keys, logprobs at every step).
inline bool bit_identical(const taps::SequenceSignals& a, const taps::SequenceSignals& b) {
  if (a.steps.size() != b.steps.size()) return false;
  for (std::size_t s = 0; s < a.steps.size(); ++s) {
    const auto& x = a.steps[s];
    const auto& y = b.steps[s];
    if (x.token_id != y.token_id || x.hidden_states != y.hidden_states || x.key_vectors != y.key_vectors ||
        x.logprobs != y.logprobs)
      return false;
  }
  return true;
}


// Elements of two equally long fp32 vectors whose bits differ (0: bit-identical; -0 and +0 differ).
inline std::size_t bit_differences(const std::vector<float>& a, const std::vector<float>& b) {
  std::size_t n = a.size() == b.size() ? 0 : std::max(a.size(), b.size());
  for (std::size_t i = 0; i < std::min(a.size(), b.size()); ++i)
    n += std::bit_cast<std::uint32_t>(a[i]) != std::bit_cast<std::uint32_t>(b[i]);
  return n;
}

}  // namespace fpf::testing
