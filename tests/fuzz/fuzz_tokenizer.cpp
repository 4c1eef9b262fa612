// Fuzz target for fpf::text::Tokenizer (libFuzzer interface; tests/fuzz/standalone_driver.cpp runs it without
// libFuzzer). On arbitrary bytes it checks:
//   - invalid UTF-8 is rejected with fpf::Error (never a crash), and its lossy repair is valid UTF-8;
//   - every id is in the vocabulary; decode(encode(x)) == NFC(x) when x holds no added token; encoding is idempotent:
//     encode(decode(encode(x))) == encode(x); the cache never changes ids;
//   - BPE of each pre-token equals a naive reference BPE (repeatedly merge the lowest-ranked adjacent pair, leftmost
//     first), written here independently of the heap-based implementation.
// The tokenizer is data/qwen3-tokenizer of the source tree, or $FPF_FUZZ_TOKENIZER.
#include <fpf/core/error.hpp>
#include <fpf/text/tokenizer.hpp>
#include <fpf/text/utf8.hpp>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace {

using fpf::text::TokenId;
using fpf::text::Tokenizer;

const Tokenizer& tokenizer() {
  static const Tokenizer tok = [] {
    const char* env = std::getenv("FPF_FUZZ_TOKENIZER");
    return Tokenizer::from_dir(env && *env ? std::string(env) : std::string(FPF_SOURCE_DIR) + "/data/qwen3-tokenizer");
  }();
  return tok;
}

[[noreturn]] void fail(const char* what, std::string_view input) {
  std::fprintf(stderr, "fuzz_tokenizer: %s (input of %zu bytes)\n", what, input.size());
  std::abort();
}

// The textbook BPE loop: find the adjacent pair with the lowest merge rank (leftmost on ties), merge it, repeat.
std::vector<TokenId> reference_bpe(const Tokenizer& tok, std::string_view bytes) {
  std::vector<TokenId> ids;
  for (const char c : bytes) ids.push_back(tok.byte_token(static_cast<unsigned char>(c)));
  while (ids.size() > 1) {
    std::optional<std::uint32_t> best;
    std::size_t at = 0;
    for (std::size_t i = 0; i + 1 < ids.size(); ++i) {
      const auto rank = tok.merge_rank(ids[i], ids[i + 1]);
      if (rank && (!best || *rank < *best)) best = rank, at = i;
    }
    if (!best) break;
    const std::string merged = std::string(*tok.id_to_token(ids[at])) + std::string(*tok.id_to_token(ids[at + 1]));
    ids[at] = *tok.token_to_id(merged);
    ids.erase(ids.begin() + static_cast<std::ptrdiff_t>(at) + 1);
  }
  return ids;
}

bool holds_added_token_text(std::string_view s) {
  return s.find("<|") != std::string_view::npos || s.find("<t") != std::string_view::npos ||
         s.find("</") != std::string_view::npos;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const Tokenizer& tok = tokenizer();
  std::string text(reinterpret_cast<const char*>(data), size);

  if (fpf::text::first_invalid_utf8(text) != std::string_view::npos) {
    bool rejected = false;
    try {
      (void)tok.encode(text);
    } catch (const fpf::Error&) {
      rejected = true;
    }
    if (!rejected) fail("invalid UTF-8 was accepted", text);
    text = fpf::text::utf8_lossy(text);
    if (fpf::text::first_invalid_utf8(text) != std::string_view::npos) fail("utf8_lossy gave invalid UTF-8", text);
  }

  const auto ids = tok.encode(text);
  for (const TokenId id : ids)
    if (id >= tok.vocab_size()) fail("id out of range", text);
  const std::string back = tok.decode(ids);
  if (!holds_added_token_text(text) && back != fpf::text::nfc(text)) fail("decode(encode(x)) != NFC(x)", text);
  if (tok.encode(back) != ids) fail("encode(decode(encode(x))) != encode(x)", text);
  tok.clear_cache();
  if (tok.encode(text) != ids) fail("ids changed with a cold cache", text);

  // BPE of each pre-token against the reference (bounded: the reference is quadratic).
  if (!holds_added_token_text(text) && text.size() <= 4096) {
    const std::string normalized = fpf::text::nfc(text);
    for (const auto piece : tok.pre_tokenize(normalized))
      if (piece.size() <= 256 && tok.encode_word(piece) != reference_bpe(tok, piece))
        fail("BPE differs from the reference BPE", text);
  }
  return 0;
}
