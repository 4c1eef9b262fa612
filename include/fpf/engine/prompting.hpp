#pragma once
// The bridge between text and the engine: prompts built by the text layer become engine token ids, and a run's
// prompt and greedy tokens get their text back for the experiment file (prompt_text, token_text).
#include <cstdint>
#include <span>
#include <vector>

#include <fpf/taps/signals.hpp>
#include <fpf/text/tokenizer.hpp>

namespace fpf {

inline std::vector<std::int32_t> engine_ids(std::span<const text::TokenId> ids) {
  return {ids.begin(), ids.end()};
}

// Fills prompt_text and every step's token_text of each sequence.
inline void attach_text(const text::Tokenizer& tok, std::vector<taps::SequenceSignals>& seqs) {
  for (taps::SequenceSignals& s : seqs) {
    const std::vector<text::TokenId> prompt(s.prompt_ids.begin(), s.prompt_ids.end());
    s.prompt_text = tok.decode(prompt);
    for (taps::StepSignals& st : s.steps) {
      const text::TokenId id = static_cast<text::TokenId>(st.token_id);
      st.token_text = tok.decode(std::span<const text::TokenId>(&id, 1));
    }
  }
}

}  // namespace fpf
