#pragma once
// What the engine asks of a backend's model (cpu::Backend::Model, cuda::Backend::Model, ...):
//
//   Model(const io::Checkpoint&, const io::ModelConfig&, const EngineOptions&)   load the weights
//   void reset(int batch)                                                     start `batch` empty sequences
//   std::vector<Captured> forward(std::span<const Chunk>, const taps::TapSpec&)  feed one chunk per sequence
//
// forward appends each chunk to its sequence's KV cache and returns, per sequence, the signals of the positions
// from chunk.capture_from on: the tapped layers' hidden states and keys, and the top-k logprobs and greedy token.
#include <concepts>
#include <cstdint>
#include <map>
#include <span>
#include <vector>

#include <fpf/taps/capture.hpp>
#include <fpf/taps/signals.hpp>

namespace fpf {

// One sequence's input for one forward call: its next tokens (the prompt at step 0, one token later) and the
// first absolute position whose signals the engine wants back.
struct Chunk {
  std::span<const std::int32_t> tokens;
  int capture_from = 0;
};

// Signals of the captured positions of one sequence, by absolute position.
using Captured = std::map<int, taps::PositionSignals>;

template <class M>
concept BackendModel = requires(M m, std::span<const Chunk> chunks, const taps::TapSpec& spec) {
  m.reset(1);
  { m.forward(chunks, spec) } -> std::same_as<std::vector<Captured>>;
};

}  // namespace fpf
