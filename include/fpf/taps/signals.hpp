#pragma once
// The signals one decode run produces, exactly as DESIGN.md "Signals" defines them. This is the whole interface
// between an engine (any Setup, any backend) and everything that observes it: the experiment runner, the JSON
// schema, the comparisons and the analysis never see more than these types.
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace fpf::taps {

// Which signals to capture. layers are 1-based block indices (layer_k = residual after block k, before the final
// norm), already resolved ("last" -> num_hidden_layers). positions count from the end of the sequence fed so far
// (-1 = last token fed at that step).
struct TapSpec {
  std::vector<int> layers{1, 2, 4, 12};
  std::vector<int> positions{-3, -2, -1};
  int topk = 10;
};

struct TopK {
  std::vector<std::int32_t> token_ids;  // sorted by log_prob descending, ties to the lower id
  std::vector<float> log_probs;         // log_softmax over the full vocabulary, fp32
  friend bool operator==(const TopK&, const TopK&) = default;
};

// layer (1-based) -> position (negative) -> values
using LayerPosMap = std::map<int, std::map<int, std::vector<float>>>;

struct StepSignals {
  int step = 0;
  std::int32_t token_id = 0;    // the step's greedy token
  std::string token_text;       // decoded text of token_id (empty when no tokenizer is at hand)
  LayerPosMap hidden_states;    // hidden_size values each
  LayerPosMap key_vectors;      // num_kv_heads * head_dim values each, head-major
  std::map<int, TopK> logprobs;  // position -> top-k
  // Equal values (floats compared as numbers: -0 == +0); compare::first_divergence is the bit-exact check.
  friend bool operator==(const StepSignals&, const StepSignals&) = default;
};

// One sequence's run: the prompt it was given and one entry per decode step.
struct SequenceSignals {
  std::vector<std::int32_t> prompt_ids;
  std::string prompt_text;
  std::vector<StepSignals> steps;
};

}  // namespace fpf::taps
