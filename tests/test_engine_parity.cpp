// The CPU fp32 engine against Hugging Face transformers (CPU, fp32, eager attention) on every fixture:
// identical greedy tokens and top-10 ids, every hidden state, key vector and top-10 logprob vector within 1e-4
// relative L2, for both attention policies.
#include <doctest/doctest.h>

#include <fpf/fpf.hpp>

#include "reference_signals.hpp"

using namespace fpf;
using fpf::testing::Reference;

namespace {

template <class Attention>
using CpuSetup = Setup<quant::Dense, Attention, par::Single, cpu::Backend>;

struct Worst {
  double hidden = 0, key = 0, logprob = 0;
};

// Checks `got` against the HF reference; returns the largest relative L2 errors seen.
Worst check_against_reference(const taps::SequenceSignals& got, const Reference& ref) {
  Worst w;
  REQUIRE(got.steps.size() == ref.signals.steps.size());
  for (std::size_t s = 0; s < got.steps.size(); ++s) {
    const taps::StepSignals& g = got.steps[s];
    const taps::StepSignals& r = ref.signals.steps[s];
    CAPTURE(s);
    REQUIRE(g.token_id == r.token_id);
    REQUIRE(g.hidden_states.size() == r.hidden_states.size());
    for (const auto& [layer, by_pos] : r.hidden_states)
      for (const auto& [pos, values] : by_pos) {
        CAPTURE(layer);
        CAPTURE(pos);
        const double e_h = testing::rel_l2(g.hidden_states.at(layer).at(pos), values);
        const double e_k = testing::rel_l2(g.key_vectors.at(layer).at(pos), r.key_vectors.at(layer).at(pos));
        CHECK(e_h <= 1e-4);
        CHECK(e_k <= 1e-4);
        w.hidden = std::max(w.hidden, e_h);
        w.key = std::max(w.key, e_k);
      }
    for (const auto& [pos, topk] : r.logprobs) {
      CAPTURE(pos);
      CHECK(g.logprobs.at(pos).token_ids == topk.token_ids);
      const double e = testing::rel_l2(g.logprobs.at(pos).log_probs, topk.log_probs);
      CHECK(e <= 1e-4);
      w.logprob = std::max(w.logprob, e);
    }
  }
  return w;
}


}  // namespace

TEST_CASE("engine parity: CPU fp32 matches Hugging Face on every fixture, eager and flash") {
  for (const std::string& name : testing::fixture_names()) {
    SUBCASE(name.c_str()) {
      const Reference ref = testing::load_reference(name);
      const auto dir = testing::fixture_dir(name);

      Engine<CpuSetup<attn::Eager>> eager(dir);
      Engine<CpuSetup<attn::Flash<4>>> flash(dir);  // tiles of 4 keys: prompts of 12+ tokens span several tiles
      const auto e = eager.generate({ref.signals.prompt_ids}, ref.steps, ref.spec).at(0);
      const auto f = flash.generate({ref.signals.prompt_ids}, ref.steps, ref.spec).at(0);

      const Worst we = check_against_reference(e, ref);
      const Worst wf = check_against_reference(f, ref);
      MESSAGE(name << ": max rel L2 eager hidden " << we.hidden << " key " << we.key << " logprob " << we.logprob
                   << "; flash hidden " << wf.hidden << " key " << wf.key << " logprob " << wf.logprob);
      // Same maths, different order of operations: they must not be bit-identical.
      CHECK_FALSE(e.steps == f.steps);
    }
  }
}
