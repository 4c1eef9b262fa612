#pragma once
// fpf::text::Tokenizer: the byte-level BPE tokenizer of Qwen2/Qwen3 read from a Hugging Face tokenizer.json, giving
// the same ids as HF `tokenizers`. The pipeline, in HF's order:
//   1. added tokens (<|im_start|>, <think>, ...) are found on the raw text, leftmost-longest, before anything else;
//   2. each stretch between them is NFC-normalized (utf8proc);
//   3. split into pre-tokens by the Split regex (PCRE2 with UTF+UCP; \s is rewritten to Unicode White_Space, which
//      is what Oniguruma, the engine HF uses, means by \s; PCRE2's own \s also matches U+180E);
//   4. each pre-token's bytes are mapped to GPT-2's byte alphabet and merged by BPE rank, with a cache per pre-token.
// decode() maps ids back to bytes and repairs invalid UTF-8 the way HF does (U+FFFD per maximal invalid subpart).
// Configurations this class does not implement (other normalizers, byte fallback, lstrip/rstrip added tokens, ...)
// are rejected when loading, naming the field, so that a tokenizer.json never silently gives different ids.
#include <fpf/core/error.hpp>
#include <fpf/text/utf8.hpp>

#include <boost/json.hpp>

#ifndef PCRE2_CODE_UNIT_WIDTH
#define PCRE2_CODE_UNIT_WIDTH 8
#endif
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cstring>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace fpf::text {

using TokenId = std::uint32_t;

namespace detail {

inline void append_utf8(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

// Decodes one code point of valid UTF-8 at s[i] and advances i.
inline char32_t next_code_point(std::string_view s, std::size_t& i) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  const int n = b0 < 0x80 ? 1 : b0 < 0xE0 ? 2 : b0 < 0xF0 ? 3 : 4;
  char32_t cp = n == 1 ? b0 : n == 2 ? (b0 & 0x1F) : n == 3 ? (b0 & 0x0F) : (b0 & 0x07);
  for (int k = 1; k < n; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
  i += static_cast<std::size_t>(n);
  return cp;
}

// GPT-2's byte-to-unicode map: printable Latin-1 bytes stand for themselves, the other 68 bytes map to U+0100,
// U+0101, ... in increasing byte order (so ' ' -> 'Ġ' U+0120 and '\n' -> 'Ċ' U+010A).
inline std::array<char32_t, 256> byte_to_unicode() {
  std::array<char32_t, 256> map{};
  char32_t next = 256;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    map[static_cast<std::size_t>(b)] = printable ? static_cast<char32_t>(b) : next++;
  }
  return map;
}

// Unicode White_Space, the set Oniguruma's \s matches on UTF-8 text (HF tokenizers compile the Split pattern with
// Oniguruma). Written as the inside of a PCRE2 character class.
inline constexpr std::string_view kWhiteSpaceClass =
    R"(\x{09}-\x{0D}\x{20}\x{85}\x{A0}\x{1680}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F}\x{205F}\x{3000})";

// Rewrites \s and \S of a regex to explicit White_Space classes, inside and outside [...] classes.
inline std::string translate_whitespace_classes(std::string_view pattern, const std::string& where) {
  std::string out;
  bool in_class = false;
  for (std::size_t i = 0; i < pattern.size(); ++i) {
    const char c = pattern[i];
    if (c == '\\' && i + 1 < pattern.size()) {
      const char e = pattern[++i];
      if (e == 's') {
        out += in_class ? std::string(kWhiteSpaceClass) : "[" + std::string(kWhiteSpaceClass) + "]";
      } else if (e == 'S') {
        if (in_class) throw Error(where, "\\S inside a character class is not supported");
        out += "[^" + std::string(kWhiteSpaceClass) + "]";
      } else {
        out += c;
        out += e;
      }
      continue;
    }
    if (c == '[' && !in_class) {
      in_class = true;
      out += c;
      // A ']' right after '[' or '[^' is a literal member, not the end of the class.
      if (i + 1 < pattern.size() && pattern[i + 1] == '^') out += pattern[++i];
      if (i + 1 < pattern.size() && pattern[i + 1] == ']') out += pattern[++i];
      continue;
    }
    if (c == ']' && in_class) in_class = false;
    out += c;
  }
  return out;
}

// Merge rules keyed by the pair of token ids: an open-addressing hash table, because this lookup is the inner loop
// of BPE. Capacity is a power of two at most half full; the empty key is all ones (ids are < 2^31).
class MergeTable {
 public:
  struct Rule {
    std::uint32_t rank;
    TokenId merged;
  };

  void reserve(std::size_t rules) {
    std::size_t cap = 16;
    while (cap < rules * 2) cap <<= 1;
    keys_.assign(cap, kEmpty);
    rules_.assign(cap, Rule{});
    shift_ = 64 - static_cast<int>(std::countr_zero(cap));
  }

  // Returns false if the pair is already present (the first rule, the lower rank, wins, as in HF).
  bool insert(TokenId left, TokenId right, Rule rule) {
    const std::uint64_t key = pack(left, right);
    for (std::size_t slot = index(key);; slot = (slot + 1) & (keys_.size() - 1)) {
      if (keys_[slot] == key) return false;
      if (keys_[slot] == kEmpty) {
        keys_[slot] = key;
        rules_[slot] = rule;
        return true;
      }
    }
  }

  const Rule* find(TokenId left, TokenId right) const noexcept {
    const std::uint64_t key = pack(left, right);
    for (std::size_t slot = index(key);; slot = (slot + 1) & (keys_.size() - 1)) {
      if (keys_[slot] == key) return &rules_[slot];
      if (keys_[slot] == kEmpty) return nullptr;
    }
  }

 private:
  static constexpr std::uint64_t kEmpty = ~std::uint64_t{0};
  static std::uint64_t pack(TokenId l, TokenId r) noexcept { return (std::uint64_t{l} << 32) | r; }
  std::size_t index(std::uint64_t key) const noexcept {
    return static_cast<std::size_t>((key * 0x9E3779B97F4A7C15ull) >> shift_);  // Fibonacci hashing
  }
  std::vector<std::uint64_t> keys_;
  std::vector<Rule> rules_;
  int shift_ = 60;
};

// BPE results per pre-token (its raw bytes -> its ids): an open-addressing table over two arenas, so that a lookup
// is one hash of a short string, one probe and one memcmp, and an insert allocates nothing per word. Keys are at
// most 64 KiB and results at most 64 Ki ids (the caller caches short words only).
class WordCache {
 public:
  // A multiply-xorshift hash over 8-byte words; never 0 (0 marks an empty slot). The last partial word is read as
  // overlapping fixed-size loads (wyhash's trick): a variable-length copy would stall the load that follows it.
  static std::uint64_t hash(std::string_view key) noexcept {
    const char* p = key.data();
    const std::size_t n = key.size();
    const auto load8 = [](const char* q) { std::uint64_t w; std::memcpy(&w, q, 8); return w; };
    const auto load4 = [](const char* q) { std::uint32_t w; std::memcpy(&w, q, 4); return std::uint64_t{w}; };
    std::uint64_t h = (n + 1) * 0x9E3779B97F4A7C15ull;
    std::size_t i = 0;
    for (; i + 8 <= n; i += 8) {
      h = (h ^ load8(p + i)) * 0xBF58476D1CE4E5B9ull;
      h ^= h >> 31;
    }
    std::uint64_t tail = 0;
    if (n >= 8) {
      tail = load8(p + n - 8);
    } else if (n >= 4) {
      tail = (load4(p) << 32) | load4(p + n - 4);
    } else if (n > 0) {
      tail = (std::uint64_t{static_cast<unsigned char>(p[0])} << 16) |
             (std::uint64_t{static_cast<unsigned char>(p[n / 2])} << 8) | static_cast<unsigned char>(p[n - 1]);
    }
    h = (h ^ tail) * 0x94D049BB133111EBull;
    h ^= h >> 29;
    return h | 1;
  }

  // Starts loading the slot of hash h: a table larger than the CPU cache otherwise stalls every lookup.
  void prefetch(std::uint64_t h) const noexcept {
    if (!slots_.empty()) __builtin_prefetch(&slots_[index(h)]);
  }

  // h must be hash(key).
  std::optional<std::span<const TokenId>> find(std::string_view key, std::uint64_t h) const noexcept {
    if (slots_.empty()) return std::nullopt;
    for (std::size_t i = index(h);; i = (i + 1) & (slots_.size() - 1)) {
      const Slot& s = slots_[i];
      if (s.hash == 0) return std::nullopt;
      if (s.hash == h && s.key_len == key.size() && std::memcmp(keys_.data() + s.key_off, key.data(), key.size()) == 0)
        return std::span<const TokenId>(ids_.data() + s.ids_off, s.ids_len);
    }
  }

  // h must be hash(key).
  void insert(std::string_view key, std::uint64_t h, std::span<const TokenId> ids) {
    if ((used_ + 1) * 2 > slots_.size()) rehash(slots_.empty() ? 1024 : slots_.size() * 2);
    std::size_t i = index(h);
    while (slots_[i].hash != 0) i = (i + 1) & (slots_.size() - 1);
    slots_[i] = {h, static_cast<std::uint32_t>(keys_.size()), static_cast<std::uint32_t>(ids_.size()),
                 static_cast<std::uint16_t>(key.size()), static_cast<std::uint16_t>(ids.size())};
    keys_.append(key);
    ids_.insert(ids_.end(), ids.begin(), ids.end());
    ++used_;
  }

  std::size_t size() const noexcept { return used_; }
  void clear() noexcept {
    slots_.clear();
    keys_.clear();
    ids_.clear();
    used_ = 0;
  }

 private:
  struct Slot {
    std::uint64_t hash;  // 0: empty
    std::uint32_t key_off, ids_off;
    std::uint16_t key_len, ids_len;
  };

  std::size_t index(std::uint64_t h) const noexcept {
    return static_cast<std::size_t>((h * 0x9E3779B97F4A7C15ull) >> shift_);  // Fibonacci hashing
  }

  void rehash(std::size_t capacity) {
    std::vector<Slot> old(capacity, Slot{});
    old.swap(slots_);
    shift_ = 64 - std::countr_zero(capacity);
    for (const Slot& s : old) {
      if (s.hash == 0) continue;
      std::size_t i = index(s.hash);
      while (slots_[i].hash != 0) i = (i + 1) & (slots_.size() - 1);
      slots_[i] = s;
    }
  }

  std::vector<Slot> slots_;
  std::string keys_;
  std::vector<TokenId> ids_;
  std::size_t used_ = 0;
  int shift_ = 64;
};

struct StringHash {
  using is_transparent = void;
  std::size_t operator()(std::string_view s) const noexcept { return std::hash<std::string_view>{}(s); }
};

// Checked access to tokenizer.json fields; errors read "FILE: field.path: what".
struct JsonReader {
  std::string file;

  [[noreturn]] void fail(const std::string& field, const std::string& what) const {
    throw Error(file + ": " + field, what);
  }
  const boost::json::object& object(const boost::json::value& v, const std::string& field) const {
    if (!v.is_object()) fail(field, "expected an object");
    return v.get_object();
  }
  const boost::json::value& at(const boost::json::object& o, std::string_view key, const std::string& field) const {
    const auto* v = o.if_contains(key);
    if (!v) fail(field.empty() ? std::string(key) : field + "." + std::string(key), "missing");
    return *v;
  }
  std::string_view string(const boost::json::value& v, const std::string& field) const {
    if (!v.is_string()) fail(field, "expected a string");
    return v.get_string();
  }
  bool boolean(const boost::json::value& v, const std::string& field) const {
    if (!v.is_bool()) fail(field, "expected true or false");
    return v.get_bool();
  }
  TokenId id(const boost::json::value& v, const std::string& field) const {
    constexpr std::int64_t kLimit = std::int64_t{1} << 31;
    if (v.is_int64() && v.get_int64() >= 0 && v.get_int64() < kLimit) return static_cast<TokenId>(v.get_int64());
    if (v.is_uint64() && v.get_uint64() < static_cast<std::uint64_t>(kLimit)) return static_cast<TokenId>(v.get_uint64());
    fail(field, "expected a token id (an integer from 0 to 2^31-1)");
  }
  // The "type" of a component object, or "" for null.
  std::string_view type(const boost::json::value& v, const std::string& field) const {
    if (v.is_null()) return {};
    return string(at(object(v, field), "type", field), field + ".type");
  }
};

inline std::string read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path.string(), "cannot open file");
  std::string data;
  in.seekg(0, std::ios::end);
  const auto size = in.tellg();
  if (size < 0) throw Error(path.string(), "cannot read file");
  data.resize(static_cast<std::size_t>(size));
  in.seekg(0);
  in.read(data.data(), static_cast<std::streamsize>(data.size()));
  if (!in) throw Error(path.string(), "cannot read file");
  return data;
}

}  // namespace detail

class Tokenizer {
 public:
  // Loads DIR/tokenizer.json (the layout of a Hugging Face model directory).
  static Tokenizer from_dir(const std::filesystem::path& dir) { return from_file(dir / "tokenizer.json"); }

  static Tokenizer from_file(const std::filesystem::path& tokenizer_json) {
    Tokenizer t;
    t.load(tokenizer_json.string(), detail::read_file(tokenizer_json));
    return t;
  }

  // From the text of a tokenizer.json; `name` is used in error messages.
  static Tokenizer from_json(std::string_view json, const std::string& name = "tokenizer.json") {
    Tokenizer t;
    t.load(name, json);
    return t;
  }

  Tokenizer(Tokenizer&&) noexcept = default;
  Tokenizer& operator=(Tokenizer&&) noexcept = default;

  // Token ids of `text` (valid UTF-8, else fpf::Error). Like HF `encode(text, add_special_tokens=False)`; for Qwen
  // add_special_tokens=True adds nothing either.
  std::vector<TokenId> encode(std::string_view text) const {
    std::vector<TokenId> ids;
    ids.reserve(text.size() / 3 + 8);
    encode_into(text, ids);
    return ids;
  }

  // Appends the ids of `text` to `out`.
  void encode_into(std::string_view text, std::vector<TokenId>& out) const {
    check_utf8(text, "input text");
    std::lock_guard lock(scratch_->mutex);
    std::size_t pos = 0;
    while (true) {
      const auto [start, length, id] = find_added_token(text, pos);
      encode_segment(text.substr(pos, std::min(start, text.size()) - pos), out);
      if (start == std::string_view::npos) break;
      out.push_back(id);
      pos = start + length;
    }
  }

  // Text of `ids`: their bytes joined, invalid UTF-8 repaired as HF does (a token may hold part of a character).
  std::string decode(std::span<const TokenId> ids, bool skip_special_tokens = false) const {
    return utf8_lossy(decode_bytes(ids, skip_special_tokens));
  }

  // The raw bytes of `ids` (may end inside a multi-byte character).
  std::string decode_bytes(std::span<const TokenId> ids, bool skip_special_tokens = false) const {
    std::string out;
    for (const TokenId id : ids) {
      if (id >= bytes_.size() || !known_[id])
        throw Error("token ids", "unknown token id " + std::to_string(id) + " (vocabulary size " +
                                     std::to_string(bytes_.size()) + ")");
      if (skip_special_tokens && special_[id]) continue;
      out += bytes_[id];
    }
    return out;
  }

  // The token's text as tokenizer.json spells it (byte-level alphabet for model tokens), or nullopt.
  std::optional<std::string_view> id_to_token(TokenId id) const {
    if (id >= tokens_.size() || !known_[id]) return std::nullopt;
    return std::string_view(tokens_[id]);
  }
  std::optional<TokenId> token_to_id(std::string_view token) const {
    if (const auto it = added_ids_.find(token); it != added_ids_.end()) return it->second;
    if (const auto it = vocab_.find(token); it != vocab_.end()) return it->second;
    return std::nullopt;
  }
  // One more than the largest id (model vocabulary and added tokens): 151669 for Qwen3.
  std::size_t vocab_size() const noexcept { return tokens_.size(); }
  bool is_special(TokenId id) const noexcept { return id < special_.size() && special_[id]; }

  // Lower level steps, public for tests and the fuzz target.
  // The pre-tokens of an already normalized text without added tokens (views into `normalized`).
  std::vector<std::string_view> pre_tokenize(std::string_view normalized) const {
    check_utf8(normalized, "input text");
    std::lock_guard lock(scratch_->mutex);
    std::vector<std::string_view> pieces;
    for_each_piece(normalized, [&](std::string_view p) { pieces.push_back(p); });
    return pieces;
  }
  // BPE of one pre-token's raw bytes, bypassing the cache.
  std::vector<TokenId> encode_word(std::string_view bytes) const {
    std::lock_guard lock(scratch_->mutex);
    std::vector<TokenId> out;
    bpe(bytes, out);
    return out;
  }
  // Rank of the merge rule (left, right) (its position in model.merges), or nullopt.
  std::optional<std::uint32_t> merge_rank(TokenId left, TokenId right) const {
    if (const auto* r = merges_.find(left, right)) return r->rank;
    return std::nullopt;
  }
  // Id of the single-byte token for byte b.
  TokenId byte_token(unsigned char b) const noexcept { return byte_ids_[b]; }
  // Forgets cached BPE results (for cold-cache benchmarks).
  void clear_cache() const {
    std::lock_guard lock(scratch_->mutex);
    scratch_->cache.clear();
  }

 private:
  Tokenizer() : scratch_(std::make_unique<Scratch>()) {}

  struct AddedToken {
    std::string content;
    TokenId id;
  };
  struct AddedMatch {
    std::size_t start;  // npos: none
    std::size_t length;
    TokenId id;
  };
  struct Symbol {
    TokenId id;
    std::int32_t prev, next;  // -1 at the ends
    bool alive;
  };
  struct Candidate {
    std::uint32_t rank;
    std::uint32_t pos;
    TokenId merged;
  };
  // Pre-tokens up to this size are cached; longer ones rarely repeat. The cache is dropped when it grows too large
  // (bounded memory on adversarial input).
  static constexpr std::size_t kMaxCachedWordBytes = 64;
  static constexpr std::size_t kMaxCachedWords = 1u << 20;
  static constexpr std::size_t kPieceBatch = 64;

  struct PcreFree {
    void operator()(pcre2_code_8* p) const noexcept { pcre2_code_free_8(p); }
    void operator()(pcre2_match_data_8* p) const noexcept { pcre2_match_data_free_8(p); }
    void operator()(pcre2_match_context_8* p) const noexcept { pcre2_match_context_free_8(p); }
    void operator()(pcre2_jit_stack_8* p) const noexcept { pcre2_jit_stack_free_8(p); }
  };

  // Mutable state of encode(): buffers reused across calls and the BPE cache. One mutex guards it; encode() takes it
  // once per call, so one Tokenizer serializes concurrent encodes (use one Tokenizer per thread to run in parallel).
  struct Scratch {
    std::mutex mutex;
    std::unique_ptr<pcre2_match_data_8, PcreFree> match;
    std::unique_ptr<pcre2_match_context_8, PcreFree> context;
    std::unique_ptr<pcre2_jit_stack_8, PcreFree> jit_stack;
    std::string normalized;
    std::vector<Symbol> symbols;
    std::vector<Candidate> heap;
    detail::WordCache cache;
    std::vector<std::string_view> pieces;  // a batch of pre-tokens
    std::vector<std::uint64_t> hashes;     // their cache hashes
  };

  void load(const std::string& file, std::string_view json) {
    detail::JsonReader r{file};
    boost::json::monotonic_resource arena;
    boost::system::error_code ec;
    const boost::json::value root = boost::json::parse(json, ec, &arena);
    if (ec) r.fail("(document)", "not valid JSON: " + ec.message());
    const auto& top = r.object(root, "(document)");

    check_pipeline(r, top);
    const auto& model = r.object(r.at(top, "model", ""), "model");
    load_vocab(r, r.object(r.at(model, "vocab", "model"), "model.vocab"));
    load_added_tokens(r, top);
    load_merges(r, model);
    compile_split_regex(r, top);
  }

  // Accepts exactly the pipeline this class implements (Qwen2/Qwen3's) and rejects anything else by name.
  void check_pipeline(const detail::JsonReader& r, const boost::json::object& top) {
    const auto norm_type = r.type(r.at(top, "normalizer", ""), "normalizer");
    if (norm_type == "NFC") {
      nfc_ = true;
    } else if (!norm_type.empty()) {
      r.fail("normalizer.type", "unsupported normalizer '" + std::string(norm_type) + "' (supported: NFC or null)");
    }
    const auto& pre = r.at(top, "pre_tokenizer", "");
    if (r.type(pre, "pre_tokenizer") != "Sequence") r.fail("pre_tokenizer.type", "expected Sequence [Split, ByteLevel]");
    const auto& steps = r.at(r.object(pre, "pre_tokenizer"), "pretokenizers", "pre_tokenizer");
    if (!steps.is_array() || steps.get_array().size() != 2)
      r.fail("pre_tokenizer.pretokenizers", "expected two steps: Split then ByteLevel");
    const auto& byte_level = r.object(steps.get_array()[1], "pre_tokenizer.pretokenizers[1]");
    if (r.type(steps.get_array()[1], "pre_tokenizer.pretokenizers[1]") != "ByteLevel")
      r.fail("pre_tokenizer.pretokenizers[1].type", "expected ByteLevel");
    for (const char* flag : {"add_prefix_space", "use_regex"}) {
      if (const auto* v = byte_level.if_contains(flag);
          v && r.boolean(*v, std::string("pre_tokenizer.pretokenizers[1].") + flag))
        r.fail(std::string("pre_tokenizer.pretokenizers[1].") + flag, "only false is supported");
    }
    if (r.type(r.at(top, "decoder", ""), "decoder") != "ByteLevel") r.fail("decoder.type", "expected ByteLevel");
    // A ByteLevel post-processor adds no tokens; others (TemplateProcessing) would add BOS/EOS.
    if (const auto* post = top.if_contains("post_processor"); post && !post->is_null() &&
                                                              r.type(*post, "post_processor") != "ByteLevel")
      r.fail("post_processor.type", "only ByteLevel or null is supported");
    for (const char* off : {"truncation", "padding"})
      if (const auto* v = top.if_contains(off); v && !v->is_null()) r.fail(off, "only null is supported");

    const auto& model = r.object(r.at(top, "model", ""), "model");
    if (r.string(r.at(model, "type", "model"), "model.type") != "BPE") r.fail("model.type", "expected BPE");
    for (const char* flag : {"byte_fallback", "ignore_merges", "fuse_unk"}) {
      if (const auto* v = model.if_contains(flag); v && !v->is_null() && r.boolean(*v, std::string("model.") + flag))
        r.fail(std::string("model.") + flag, "only false is supported");
    }
    for (const char* affix : {"continuing_subword_prefix", "end_of_word_suffix"}) {
      if (const auto* v = model.if_contains(affix); v && !v->is_null() && !r.string(*v, std::string("model.") + affix).empty())
        r.fail(std::string("model.") + affix, "only an empty affix is supported");
    }
    if (const auto* v = model.if_contains("dropout"); v && !v->is_null()) r.fail("model.dropout", "only null is supported");
  }

  void load_vocab(const detail::JsonReader& r, const boost::json::object& vocab) {
    const auto to_unicode = detail::byte_to_unicode();
    std::array<int, 512> unicode_to_byte;
    unicode_to_byte.fill(-1);
    for (int b = 0; b < 256; ++b) unicode_to_byte[to_unicode[static_cast<std::size_t>(b)]] = b;

    vocab_.reserve(vocab.size());
    for (const auto& [key, value] : vocab) {
      const std::string field = "model.vocab[\"" + std::string(key) + "\"]";
      const TokenId id = r.id(value, field);
      if (!vocab_.emplace(std::string(key), id).second) r.fail(field, "duplicate token");
      grow(id);
      if (known_[id]) r.fail(field, "id " + std::to_string(id) + " used twice");
      // Model tokens are spelled in the byte alphabet; map each character back to its byte.
      std::string bytes;
      const std::string_view text = key;
      if (first_invalid_utf8(text) != std::string_view::npos) r.fail(field, "token is not valid UTF-8");
      for (std::size_t i = 0; i < text.size();) {
        const char32_t cp = detail::next_code_point(text, i);
        if (cp >= unicode_to_byte.size() || unicode_to_byte[cp] < 0)
          r.fail(field, "character U+" + std::to_string(static_cast<std::uint32_t>(cp)) +
                            " is not in the byte-level alphabet");
        bytes.push_back(static_cast<char>(unicode_to_byte[cp]));
      }
      tokens_[id] = std::string(key);
      bytes_[id] = std::move(bytes);
      known_[id] = true;
    }
    for (int b = 0; b < 256; ++b) {
      std::string symbol;
      detail::append_utf8(symbol, to_unicode[static_cast<std::size_t>(b)]);
      const auto it = vocab_.find(symbol);
      if (it == vocab_.end()) r.fail("model.vocab", "missing the byte-level token for byte " + std::to_string(b));
      byte_ids_[static_cast<std::size_t>(b)] = it->second;
    }
  }

  void load_added_tokens(const detail::JsonReader& r, const boost::json::object& top) {
    const auto* list = top.if_contains("added_tokens");
    if (!list || list->is_null()) return;
    if (!list->is_array()) r.fail("added_tokens", "expected an array");
    std::size_t index = 0;
    for (const auto& item : list->get_array()) {
      const std::string field = "added_tokens[" + std::to_string(index++) + "]";
      const auto& o = r.object(item, field);
      AddedToken t{std::string(r.string(r.at(o, "content", field), field + ".content")),
                   r.id(r.at(o, "id", field), field + ".id")};
      if (t.content.empty()) r.fail(field + ".content", "empty added token");
      if (first_invalid_utf8(t.content) != std::string_view::npos) r.fail(field + ".content", "not valid UTF-8");
      for (const char* flag : {"lstrip", "rstrip", "single_word", "normalized"}) {
        if (const auto* v = o.if_contains(flag); v && r.boolean(*v, field + "." + flag))
          r.fail(field + "." + flag, "only false is supported");
      }
      const bool special = o.contains("special") && r.boolean(o.at("special"), field + ".special");
      grow(t.id);
      if (known_[t.id] && tokens_[t.id] != t.content) r.fail(field + ".id", "id already used by another token");
      tokens_[t.id] = t.content;
      bytes_[t.id] = t.content;
      known_[t.id] = true;
      special_[t.id] = special;
      added_ids_[t.content] = t.id;
      added_first_byte_[static_cast<unsigned char>(t.content[0])] = true;
      added_.push_back(std::move(t));
    }
    // Longest first, so that the first token matching at a position is the leftmost-longest match (as HF).
    std::stable_sort(added_.begin(), added_.end(),
                     [](const AddedToken& a, const AddedToken& b) { return a.content.size() > b.content.size(); });
  }

  void load_merges(const detail::JsonReader& r, const boost::json::object& model) {
    const auto& v = r.at(model, "merges", "model");
    if (!v.is_array()) r.fail("model.merges", "expected an array");
    const auto& merges = v.get_array();
    merges_.reserve(merges.size());
    std::string joined;  // left + right, reused
    for (std::size_t rank = 0; rank < merges.size(); ++rank) {
      const std::string field = "model.merges[" + std::to_string(rank) + "]";
      // Newer files store ["a", "b"]; older ones "a b".
      std::string_view left, right;
      if (merges[rank].is_array() && merges[rank].get_array().size() == 2) {
        left = r.string(merges[rank].get_array()[0], field);
        right = r.string(merges[rank].get_array()[1], field);
      } else if (merges[rank].is_string()) {
        const std::string_view s = merges[rank].get_string();
        const auto space = s.find(' ');
        if (space == std::string_view::npos || s.find(' ', space + 1) != std::string_view::npos)
          r.fail(field, "expected \"left right\"");
        left = s.substr(0, space);
        right = s.substr(space + 1);
      } else {
        r.fail(field, "expected [\"left\", \"right\"] or \"left right\"");
      }
      const auto l = vocab_.find(left), rt = vocab_.find(right);
      if (l == vocab_.end() || rt == vocab_.end()) r.fail(field, "merges a token that is not in model.vocab");
      joined.assign(left).append(right);
      const auto merged = vocab_.find(joined);
      if (merged == vocab_.end()) r.fail(field, "the merged token is not in model.vocab");
      merges_.insert(l->second, rt->second, {static_cast<std::uint32_t>(rank), merged->second});
    }
  }

  void compile_split_regex(const detail::JsonReader& r, const boost::json::object& top) {
    const std::string field = "pre_tokenizer.pretokenizers[0]";
    const auto& split = r.object(r.at(top, "pre_tokenizer", "").get_object().at("pretokenizers").get_array()[0], field);
    if (r.string(r.at(split, "type", field), field + ".type") != "Split") r.fail(field + ".type", "expected Split");
    if (r.string(r.at(split, "behavior", field), field + ".behavior") != "Isolated")
      r.fail(field + ".behavior", "only Isolated is supported");
    if (r.boolean(r.at(split, "invert", field), field + ".invert")) r.fail(field + ".invert", "only false is supported");
    const auto& pattern = r.object(r.at(split, "pattern", field), field + ".pattern");
    const auto* regex = pattern.if_contains("Regex");
    if (!regex) r.fail(field + ".pattern", "only a Regex pattern is supported");
    const std::string source = detail::translate_whitespace_classes(r.string(*regex, field + ".pattern.Regex"),
                                                                     r.file + ": " + field + ".pattern.Regex");
    int error = 0;
    PCRE2_SIZE offset = 0;
    regex_.reset(pcre2_compile_8(reinterpret_cast<PCRE2_SPTR8>(source.data()), source.size(), PCRE2_UTF | PCRE2_UCP,
                                 &error, &offset, nullptr));
    if (!regex_) {
      PCRE2_UCHAR8 message[256];
      pcre2_get_error_message_8(error, message, sizeof message);
      r.fail(field + ".pattern.Regex",
             "cannot compile (" + std::string(reinterpret_cast<const char*>(message)) + " at offset " +
                 std::to_string(offset) + ")");
    }
    // JIT when the platform has it; pcre2_match gives the same matches otherwise.
    jit_ = pcre2_jit_compile_8(regex_.get(), PCRE2_JIT_COMPLETE) == 0;
    scratch_->match.reset(pcre2_match_data_create_from_pattern_8(regex_.get(), nullptr));
    scratch_->context.reset(pcre2_match_context_create_8(nullptr));
    if (jit_) {
      // Long runs (e.g. 100k spaces) need more than PCRE2's default 32 KiB JIT stack.
      scratch_->jit_stack.reset(pcre2_jit_stack_create_8(32 * 1024, 8 * 1024 * 1024, nullptr));
      pcre2_jit_stack_assign_8(scratch_->context.get(), nullptr, scratch_->jit_stack.get());
    }
  }

  void grow(TokenId id) {
    if (id >= tokens_.size()) {
      tokens_.resize(id + 1);
      bytes_.resize(id + 1);
      known_.resize(id + 1, false);
      special_.resize(id + 1, false);
    }
  }

  // Leftmost-longest added token at or after `from` (HF matches them with Aho-Corasick, LeftmostLongest).
  AddedMatch find_added_token(std::string_view text, std::size_t from) const noexcept {
    if (added_.empty()) return {std::string_view::npos, 0, 0};
    for (std::size_t i = from; i < text.size(); ++i) {
      if (!added_first_byte_[static_cast<unsigned char>(text[i])]) continue;
      const std::string_view rest = text.substr(i);
      for (const auto& t : added_)
        if (rest.starts_with(t.content)) return {i, t.content.size(), t.id};
    }
    return {std::string_view::npos, 0, 0};
  }

  // Normalize, pre-tokenize and BPE one stretch of text that holds no added token. Caller holds the mutex.
  void encode_segment(std::string_view segment, std::vector<TokenId>& out) const {
    if (segment.empty()) return;
    std::string_view normalized = segment;
    if (nfc_) {
      auto& buffer = scratch_->normalized;
      buffer.clear();
      append_nfc(segment, buffer);
      normalized = buffer;
    }
    // Pre-tokens go through the cache in batches: hashing a batch and prefetching its slots first lets the
    // memory accesses of many lookups overlap.
    auto& batch = scratch_->pieces;
    const auto flush = [&] {
      auto& hashes = scratch_->hashes;
      hashes.resize(batch.size());
      for (std::size_t i = 0; i < batch.size(); ++i) {
        hashes[i] = detail::WordCache::hash(batch[i]);
        scratch_->cache.prefetch(hashes[i]);
      }
      for (std::size_t i = 0; i < batch.size(); ++i) bpe_cached(batch[i], hashes[i], out);
      batch.clear();
    };
    batch.clear();
    for_each_piece(normalized, [&](std::string_view piece) {
      batch.push_back(piece);
      if (batch.size() == kPieceBatch) flush();
    });
    flush();
  }

  // Calls f(piece) for each regex match and each gap between matches ("Isolated" split). Caller holds the mutex.
  template <class F>
  void for_each_piece(std::string_view text, F&& f) const {
    auto* md = scratch_->match.get();
    const auto* subject = reinterpret_cast<PCRE2_SPTR8>(text.data());
    std::size_t gap = 0;  // start of the text not yet handed to f
    std::size_t pos = 0;  // where the next search starts
    while (pos < text.size()) {
      // The text was checked once as a whole; PCRE2 need not check it again on every call.
      const int rc = jit_ ? pcre2_jit_match_8(regex_.get(), subject, text.size(), pos, PCRE2_NO_UTF_CHECK, md,
                                              scratch_->context.get())
                          : pcre2_match_8(regex_.get(), subject, text.size(), pos, PCRE2_NO_UTF_CHECK, md,
                                          scratch_->context.get());
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) {
        PCRE2_UCHAR8 message[256];
        pcre2_get_error_message_8(rc, message, sizeof message);
        throw Error("pre-tokenizer", "regex match failed: " + std::string(reinterpret_cast<const char*>(message)));
      }
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer_8(md);
      const std::size_t start = ov[0], end = ov[1];
      if (end == start) {
        // An empty match splits nothing: search again from the next character.
        if (start >= text.size()) break;
        pos = start;
        detail::next_code_point(text, pos);
        continue;
      }
      if (start > gap) f(text.substr(gap, start - gap));
      f(text.substr(start, end - start));
      gap = pos = end;
    }
    if (gap < text.size()) f(text.substr(gap));
  }

  // BPE of one pre-token through the cache; h is WordCache::hash(word).
  void bpe_cached(std::string_view word, std::uint64_t h, std::vector<TokenId>& out) const {
    if (word.size() == 1) {
      out.push_back(byte_ids_[static_cast<unsigned char>(word[0])]);
      return;
    }
    if (word.size() > kMaxCachedWordBytes) {
      bpe(word, out);
      return;
    }
    auto& cache = scratch_->cache;
    if (const auto hit = cache.find(word, h)) {
      out.insert(out.end(), hit->begin(), hit->end());
      return;
    }
    const std::size_t before = out.size();
    bpe(word, out);
    if (cache.size() >= kMaxCachedWords) cache.clear();
    cache.insert(word, h, std::span<const TokenId>(out.data() + before, out.size() - before));
  }

  // Byte-level BPE of one pre-token, appended to out: the same algorithm as HF's Word::merge_all: a min-heap of
  // candidate merges ordered by (rank, position); stale candidates are skipped when popped. Caller holds the mutex.
  void bpe(std::string_view word, std::vector<TokenId>& out) const {
    auto& sym = scratch_->symbols;
    auto& heap = scratch_->heap;
    if (word.empty()) return;
    sym.clear();
    heap.clear();
    const auto n = static_cast<std::int32_t>(word.size());
    for (std::int32_t i = 0; i < n; ++i)
      sym.push_back({byte_ids_[static_cast<unsigned char>(word[static_cast<std::size_t>(i)])], i - 1,
                     i + 1 < n ? i + 1 : -1, true});
    // std heap functions build a max-heap; "later" = higher rank, then higher position.
    const auto later = [](const Candidate& a, const Candidate& b) {
      return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos;
    };
    const auto push = [&](std::int32_t pos, TokenId left, TokenId right) {
      if (const auto* rule = merges_.find(left, right)) {
        heap.push_back({rule->rank, static_cast<std::uint32_t>(pos), rule->merged});
        std::push_heap(heap.begin(), heap.end(), later);
      }
    };
    for (std::int32_t i = 0; i + 1 < n; ++i) push(i, sym[static_cast<std::size_t>(i)].id, sym[static_cast<std::size_t>(i) + 1].id);

    while (!heap.empty()) {
      std::pop_heap(heap.begin(), heap.end(), later);
      const Candidate top = heap.back();
      heap.pop_back();
      Symbol& cur = sym[top.pos];
      if (!cur.alive || cur.next < 0) continue;
      Symbol& right = sym[static_cast<std::size_t>(cur.next)];
      const auto* rule = merges_.find(cur.id, right.id);
      if (!rule || rule->merged != top.merged) continue;  // stale: a neighbour changed since this was queued
      cur.id = top.merged;
      right.alive = false;
      cur.next = right.next;
      if (cur.next >= 0) sym[static_cast<std::size_t>(cur.next)].prev = static_cast<std::int32_t>(top.pos);
      if (cur.prev >= 0) push(cur.prev, sym[static_cast<std::size_t>(cur.prev)].id, cur.id);
      if (cur.next >= 0) push(static_cast<std::int32_t>(top.pos), cur.id, sym[static_cast<std::size_t>(cur.next)].id);
    }
    for (std::int32_t i = 0; i >= 0; i = sym[static_cast<std::size_t>(i)].next) out.push_back(sym[static_cast<std::size_t>(i)].id);
  }

  // Model: read-only after loading.
  std::unordered_map<std::string, TokenId, detail::StringHash, std::equal_to<>> vocab_;
  std::unordered_map<std::string, TokenId, detail::StringHash, std::equal_to<>> added_ids_;
  std::vector<std::string> tokens_;  // id -> text as in tokenizer.json
  std::vector<std::string> bytes_;   // id -> raw bytes
  std::vector<bool> known_, special_;
  std::array<TokenId, 256> byte_ids_{};
  detail::MergeTable merges_;
  std::vector<AddedToken> added_;  // longest first
  std::array<bool, 256> added_first_byte_{};
  bool nfc_ = false;
  std::unique_ptr<pcre2_code_8, PcreFree> regex_;
  bool jit_ = false;
  std::unique_ptr<Scratch> scratch_;
};

}  // namespace fpf::text
