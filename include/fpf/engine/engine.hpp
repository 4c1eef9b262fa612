#pragma once
// fpf::Engine<Setup>: greedy decoding of a batch of independent sequences with signal taps (DESIGN.md
// "Signals"). The engine owns the decode loop and the tap bookkeeping; the Setup's backend owns the weights, the
// KV cache and the forward pass. The engine never names a concrete policy.
#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include <fpf/backend/interface.hpp>
#include <fpf/core/error.hpp>
#include <fpf/engine/options.hpp>
#include <fpf/engine/setup.hpp>
#include <fpf/io/config.hpp>
#include <fpf/io/safetensors.hpp>
#include <fpf/taps/capture.hpp>
#include <fpf/taps/signals.hpp>

namespace fpf {

template <class S>
class Engine {
  using Model = typename S::backend::template Model<S>;
  static_assert(BackendModel<Model>, "the backend's Model must offer reset() and forward() (backend/interface.hpp)");

 public:
  explicit Engine(const std::filesystem::path& model_dir, const EngineOptions& opts = {})
      : cfg_(io::load_config(model_dir)), ckpt_(io::Checkpoint::open(model_dir)), model_(ckpt_, cfg_, opts) {}

  const io::ModelConfig& config() const { return cfg_; }

  // Greedy-decodes `steps` tokens for every prompt (each an independent sequence) and returns each sequence's
  // signals. Step s feeds prompt + generated[0..s-1] (the whole prompt at step 0, then one token with the KV
  // cache) and records the step's greedy token and the signals at spec.positions counted from the end of what
  // was fed so far; earlier positions keep the values computed when they were processed.
  std::vector<taps::SequenceSignals> generate(const std::vector<std::vector<std::int32_t>>& prompts, int steps,
                                              const taps::TapSpec& spec) {
    validate(prompts, steps, spec);
    const int back = -*std::min_element(spec.positions.begin(), spec.positions.end());  // how far back we look
    const std::size_t B = prompts.size();
    model_.reset(static_cast<int>(B));

    std::vector<taps::SequenceSignals> out(B);
    std::vector<Captured> history(B);           // absolute position -> signals, pruned to the last `back`
    std::vector<std::vector<std::int32_t>> fed(B);  // tokens fed so far
    for (std::size_t b = 0; b < B; ++b) out[b].prompt_ids = prompts[b];

    for (int s = 0; s < steps; ++s) {
      std::vector<Chunk> chunks(B);
      for (std::size_t b = 0; b < B; ++b) {
        const std::size_t start = fed[b].size();
        if (s == 0)
          fed[b] = prompts[b];
        else
          fed[b].push_back(out[b].steps.back().token_id);
        chunks[b] = Chunk{std::span<const std::int32_t>(fed[b]).subspan(start),
                          std::max(0, static_cast<int>(fed[b].size()) - back)};
      }
      std::vector<Captured> cap = model_.forward(chunks, spec);
      for (std::size_t b = 0; b < B; ++b) {
        const int n = static_cast<int>(fed[b].size());
        history[b].merge(cap[b]);
        std::erase_if(history[b], [&](const auto& kv) { return kv.first < n - back; });
        out[b].steps.push_back(assemble(s, n, history[b], spec));
      }
    }
    return out;
  }

 private:
  void validate(const std::vector<std::vector<std::int32_t>>& prompts, int steps, const taps::TapSpec& spec) const {
    if (prompts.empty()) throw Error("prompt", "no sequences given");
    for (const auto& p : prompts)
      if (p.empty()) throw Error("prompt", "a sequence has no tokens");
    if (steps < 1) throw Error("--steps", "must be at least 1");
    for (int l : spec.layers)
      if (l < 1 || l > cfg_.num_hidden_layers)
        throw Error("--layers", "layer " + std::to_string(l) + " is outside 1.." + std::to_string(cfg_.num_hidden_layers) +
                                    " (" + cfg_.file.string() + ": num_hidden_layers)");
    if (spec.positions.empty()) throw Error("--positions", "no positions given");
    for (int p : spec.positions)
      if (p >= 0) throw Error("--positions", "positions count from the end and must be negative (got " + std::to_string(p) + ")");
    if (spec.topk < 1 || spec.topk > cfg_.vocab_size) throw Error("--topk", "must be in 1..vocab_size");
  }

  static taps::StepSignals assemble(int step, int n, const Captured& hist, const taps::TapSpec& spec) {
    taps::StepSignals st;
    st.step = step;
    st.token_id = hist.at(n - 1).argmax;
    for (int p : spec.positions) {
      auto it = hist.find(n + p);
      if (it == hist.end()) continue;  // the sequence is shorter than |p|
      const taps::PositionSignals& ps = it->second;
      for (const auto& [layer, values] : ps.hidden) st.hidden_states[layer][p] = values;
      for (const auto& [layer, values] : ps.keys) st.key_vectors[layer][p] = values;
      st.logprobs[p] = ps.logprobs;
    }
    return st;
  }

  io::ModelConfig cfg_;
  io::Checkpoint ckpt_;
  Model model_;
};

}  // namespace fpf
