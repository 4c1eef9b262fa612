#pragma once
// What a backend hands back for one processed token position: the signals of the tapped layers and the
// position's top-k logprobs. The engine keeps these per absolute position and assembles StepSignals from them,
// so signals of earlier positions are the values computed when those tokens were processed (never recomputed).
#include <cstdint>
#include <map>
#include <span>
#include <vector>

#include <fpf/backend/cpu/ops.hpp>
#include <fpf/taps/signals.hpp>

namespace fpf::taps {

struct PositionSignals {
  std::map<int, std::vector<float>> hidden;  // layer (1-based) -> hidden_size values
  std::map<int, std::vector<float>> keys;    // layer (1-based) -> kv_heads * head_dim values
  TopK logprobs;
  std::int32_t argmax = -1;                  // greedy token from this position's logits (ties to the lowest id)
};

// Fills the logprob part of a PositionSignals from a row of logits (fp32, full vocabulary).
inline void set_logits(PositionSignals& ps, std::span<const float> logits, int topk) {
  std::vector<float> lp(logits.size());
  cpu::log_softmax(logits, lp);
  ps.argmax = cpu::argmax(logits);
  ps.logprobs.token_ids = cpu::topk_indices(lp, static_cast<std::size_t>(topk));
  ps.logprobs.log_probs.clear();
  for (std::int32_t id : ps.logprobs.token_ids) ps.logprobs.log_probs.push_back(lp[static_cast<std::size_t>(id)]);
}

}  // namespace fpf::taps
