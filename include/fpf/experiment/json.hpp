#pragma once
// Reading and writing experiment files (schema.hpp) as JSON.
//
// Floats: every float32 is written as its own shortest round-trip decimal (std::to_chars(float)) and read back
// as the float nearest to that decimal, so a reader gets the identical bits (-0.0 and subnormals included). We do
// not let a JSON library go through double: printing a float as a double gives 17 digits ("0.10000000149011612"),
// and parsing a decimal to double and then rounding to float can round twice.
//
// Reading uses a small strict JSON scanner (RFC 8259: literals, numbers, strings with escapes, UTF-8 checked) that
// fills a flat token "tape" and converts every number to float32 on the way (Scanner::number). It replaced
// Boost.JSON's basic_parser here: that parser converts every number to double first (wasted work on ~5 million
// numbers per file, and in Boost 1.81 not correctly rounded), and reading a real-size file took ~4x longer with
// it. The analysis results JSON still uses Boost.JSON.
//
// NaN and +-Inf have no JSON form. Policy: they are rejected. Writing throws fpf::Error naming the value's field
// (e.g. "runs[2].decode_steps[4].hidden_states.layer_12.pos_-1[17]"); a file holding NaN/Infinity tokens is not JSON
// and reading it fails like any other syntax error. docs/experiments.md repeats this.
//
// Strings are written as valid UTF-8: a byte sequence that is not UTF-8 (a token text cut inside a multi-byte
// character) becomes U+FFFD, which is what Hugging Face's decode prints for it too.
//
// Files are written atomically: to "<file>.tmp.<pid>" in the same folder, flushed to disk, then renamed over the
// target, so a reader never sees half a file.
#include <algorithm>
#include <bit>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include <unistd.h>

#include <fpf/core/error.hpp>
#include <fpf/experiment/schema.hpp>

namespace fpf::experiment {

// =============================================================================================================
// Reading: the scanner fills a flat "tape" of tokens; Node walks it with the path for error messages.
// =============================================================================================================
namespace json_detail {

enum class Kind : std::uint8_t { Null, Bool, Number, String, Key, Array, Object, NumArray };

inline const char* kind_name(Kind k) {
  switch (k) {
    case Kind::Null: return "null";
    case Kind::Bool: return "a boolean";
    case Kind::Number: return "a number";
    case Kind::String:
    case Kind::Key: return "a string";
    case Kind::Array: return "an array";
    case Kind::Object: return "an object";
    case Kind::NumArray: return "an array";
  }
  return "?";
}

// One token. Number: a = offset, b = length of its text in the source, f = its float32 value. String/Key: a = index
// into Tape::strings. Bool: a = 0/1. Array/Object: a = index one past the container's last token, b = element
// count. NumArray (a long array of numbers, a signal vector): a = first index in Tape::floats, b = element count,
// c = offset of its '[' in the source; it has no element tokens.
struct Token {
  Kind kind;
  bool float_ok = false;  // Number: f is the text's float32 value; NumArray: every element is a float32
  std::uint32_t a = 0;
  std::uint32_t b = 0;
  float f = 0;
  std::uint32_t c = 0;
};

struct Tape {
  std::string_view source;
  std::vector<Token> tokens;
  std::vector<std::string> strings;
  std::vector<float> floats;  // the values of every NumArray

  std::string_view number_text(const Token& t) const { return source.substr(t.a, t.b); }
  // f(index, text) for each element of a NumArray, found again in the source (which the scanner has validated).
  template <class F>
  void number_texts(const Token& arr, F&& f) const {
    const char* p = source.data() + arr.c + 1;
    for (std::uint32_t k = 0; k < arr.b; ++k) {
      while (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t' || *p == ',') ++p;
      const char* start = p;
      while ((*p >= '0' && *p <= '9') || *p == '-' || *p == '+' || *p == '.' || *p == 'e' || *p == 'E') ++p;
      f(k, std::string_view(start, std::size_t(p - start)));
    }
  }
  // Index of the token after the value starting at i.
  std::uint32_t skip(std::uint32_t i) const {
    const Token& t = tokens[i];
    return (t.kind == Kind::Array || t.kind == Kind::Object) ? t.a : i + 1;
  }
};

// Length of the valid UTF-8 sequence at s[0..n), or 0 when it is not one (overlong forms, surrogates and code
// points above U+10FFFF are invalid).
inline std::size_t utf8_sequence_length(const unsigned char* s, std::size_t n) {
  unsigned char c = s[0];
  std::size_t len = c < 0x80                 ? 1
                    : c >= 0xC2 && c <= 0xDF ? 2
                    : c >= 0xE0 && c <= 0xEF ? 3
                    : c >= 0xF0 && c <= 0xF4 ? 4
                                             : 0;
  if (len == 0 || len > n) return 0;
  for (std::size_t k = 1; k < len; ++k)
    if ((s[k] & 0xC0) != 0x80) return 0;
  if (len >= 3) {
    unsigned char c1 = s[1];
    if ((c == 0xE0 && c1 < 0xA0) || (c == 0xED && c1 >= 0xA0) || (c == 0xF0 && c1 < 0x90) || (c == 0xF4 && c1 >= 0x90))
      return 0;
  }
  return len;
}

inline void append_utf8(std::string& o, std::uint32_t cp) {
  if (cp < 0x80) {
    o += char(cp);
  } else if (cp < 0x800) {
    o += char(0xC0 | (cp >> 6));
    o += char(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    o += char(0xE0 | (cp >> 12));
    o += char(0x80 | ((cp >> 6) & 0x3F));
    o += char(0x80 | (cp & 0x3F));
  } else {
    o += char(0xF0 | (cp >> 18));
    o += char(0x80 | ((cp >> 12) & 0x3F));
    o += char(0x80 | ((cp >> 6) & 0x3F));
    o += char(0x80 | (cp & 0x3F));
  }
}

// A strict recursive-descent JSON scanner that appends tokens to a Tape.
class Scanner {
 public:
  Scanner(Tape& tape, std::string_view text, const std::string& file)
      : tape_(tape), begin_(text.data()), p_(text.data()), end_(text.data() + text.size()), file_(file) {}

  void document() {
    value(0);
    ws();
    if (p_ != end_) fail("unexpected data after the JSON value");
  }

 private:
  static constexpr int kMaxDepth = 64;
  static constexpr std::uint32_t kPackMin = 16;  // arrays of at least this many numbers are packed

  [[noreturn, gnu::cold, gnu::noinline]] void fail(const std::string& what) const {
    std::size_t line = 1, col = 1;
    for (const char* q = begin_; q < p_ && q < end_; ++q) {
      if (*q == '\n')
        ++line, col = 1;
      else
        ++col;
    }
    std::string path = path_at_error();
    throw Error(path.empty() ? file_ : file_ + ": " + path,
                "invalid JSON at line " + std::to_string(line) + ", column " + std::to_string(col) + ": " + what);
  }
  [[noreturn, gnu::cold, gnu::noinline]] void fail_incomplete() const { fail("incomplete JSON (the file ends early)"); }
  void need_more() const {
    if (p_ == end_) [[unlikely]]
      fail_incomplete();
  }
  void ws() {
    while (p_ != end_ && (*p_ == ' ' || *p_ == '\n' || *p_ == '\r' || *p_ == '\t')) ++p_;
  }
  void expect(char c, const char* what) {
    ws();
    need_more();
    if (*p_ != c) fail(what);
    ++p_;
  }

  void value(int depth) {
    ws();
    need_more();
    switch (*p_) {
      case '{': return container(Kind::Object, depth);
      case '[': return container(Kind::Array, depth);
      case '"': return string(Kind::String);
      case 't': return literal("true", Token{Kind::Bool, false, 1});
      case 'f': return literal("false", Token{Kind::Bool, false, 0});
      case 'n': return literal("null", Token{Kind::Null});
      default:
        if (*p_ == '-' || (*p_ >= '0' && *p_ <= '9')) return number();
        fail(std::string("unexpected character '") + *p_ + "'");
    }
  }

  void container(Kind kind, int depth) {
    if (depth >= kMaxDepth) fail("nesting deeper than " + std::to_string(kMaxDepth));
    const bool object = kind == Kind::Object;
    const char close = object ? '}' : ']';
    const std::uint32_t open_at = std::uint32_t(p_ - begin_);
    ++p_;
    std::uint32_t start = std::uint32_t(tape_.tokens.size());
    tape_.tokens.push_back({kind});
    open_.push_back(start);
    std::uint32_t n = 0;
    ws();
    need_more();
    if (*p_ == close) {
      ++p_;
    } else {
      for (;;) {
        if (object) {
          ws();
          need_more();
          if (*p_ != '"') fail("expected a member name in quotes");
          string(Kind::Key);
          expect(':', "expected ':' after a member name");
        }
        value(depth + 1);
        ++n;
        ws();
        need_more();
        if (*p_ == ',') {
          ++p_;
          continue;
        }
        if (*p_ == close) {
          ++p_;
          break;
        }
        fail(object ? "expected ',' or '}'" : "expected ',' or ']'");
      }
    }
    open_.pop_back();
    if (!object && n >= kPackMin && tape_.tokens.size() == start + 1 + n && pack_numbers(start, n, open_at)) return;
    tape_.tokens[start].a = std::uint32_t(tape_.tokens.size());
    tape_.tokens[start].b = n;
  }

  // A long array of numbers (a signal vector) becomes one NumArray token with its values in Tape::floats; the
  // element tokens are dropped again, so the tape stays small and in cache (reading is memory-bound otherwise).
  bool pack_numbers(std::uint32_t start, std::uint32_t n, std::uint32_t open_at) {
    auto& tk = tape_.tokens;
    bool all_float = true;
    for (std::size_t i = start + 1; i < tk.size(); ++i) {
      if (tk[i].kind != Kind::Number) return false;
      all_float = all_float && tk[i].float_ok;
    }
    Token arr{Kind::NumArray, all_float, std::uint32_t(tape_.floats.size()), n, 0, open_at};
    for (std::size_t i = start + 1; i < tk.size(); ++i) tape_.floats.push_back(tk[i].f);
    tk.resize(start);
    tk.push_back(arr);
    return true;
  }

  void literal(std::string_view word, Token t) {
    std::size_t avail = std::size_t(end_ - p_);
    if (avail < word.size() && word.starts_with(std::string_view(p_, avail))) {
      p_ = end_;
      need_more();  // a literal cut off by the end of the file
    }
    if (avail < word.size() || std::string_view(p_, word.size()) != word)
      fail("unexpected character '" + std::string(1, *p_) + "'");
    p_ += word.size();
    tape_.tokens.push_back(t);
  }

  // Checks the JSON number grammar and converts to float32 in one pass. Most signal values (at most 15
  // significant digits, decimal exponent within +-22) take Clinger's fast path: the digits as an integer w and
  // w * 10^e (or w / 10^-e) in double are both exact inputs, so the double is correctly rounded; rounding it on to
  // float gives the float nearest the decimal unless the double lies exactly halfway between two floats (then, and
  // outside the normal float range, std::from_chars decides). This is 3-4x faster than from_chars alone.
  void number() {
    static constexpr double kPow10[] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,  1e8,  1e9,  1e10, 1e11,
                                        1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};
    const char* start = p_;
    const char* q = p_;
    auto digit = [&] { return q != end_ && *q >= '0' && *q <= '9'; };
    bool negative = *q == '-';
    if (negative) ++q;
    if (!digit()) fail("invalid number");
    std::uint64_t w = 0;  // the first (up to 15) significant digits
    int significant = 0, exp10 = 0;
    bool exact = true;  // w * 10^exp10 is the number's exact value (no nonzero digit dropped)
    if (*q == '0') {
      ++q;
      if (digit()) fail("invalid number: leading zero");
    } else {
      for (; digit(); ++q) {
        if (significant < 15)
          w = w * 10 + std::uint64_t(*q - '0'), ++significant;
        else
          exact = exact && *q == '0', ++exp10;
      }
    }
    if (q != end_ && *q == '.') {
      ++q;
      if (!digit()) fail("invalid number: digits must follow '.'");
      for (; digit(); ++q) {
        if (significant < 15) {
          w = w * 10 + std::uint64_t(*q - '0');
          significant += w != 0;  // zeros before the first nonzero digit are not significant
          --exp10;
        } else {
          exact = exact && *q == '0';
        }
      }
    }
    if (q != end_ && (*q == 'e' || *q == 'E')) {
      ++q;
      bool neg_exp = q != end_ && *q == '-';
      if (q != end_ && (*q == '+' || *q == '-')) ++q;
      if (!digit()) fail("invalid number: digits must follow the exponent");
      int e = 0;
      while (digit()) e = std::min(e * 10 + (*q++ - '0'), 100000);
      exp10 += neg_exp ? -e : e;
    }
    p_ = q;
    Token t{Kind::Number, false, std::uint32_t(start - begin_), std::uint32_t(q - start)};
    if (exact && exp10 >= -22 && exp10 <= 22) {
      double d = exp10 < 0 ? double(w) / kPow10[-exp10] : double(w) * kPow10[exp10];
      bool halfway = (std::bit_cast<std::uint64_t>(d) & 0x1FFFFFFFull) == 0x10000000ull;  // 29 dropped bits
      if (d == 0 || (d >= double(std::numeric_limits<float>::min()) && d <= double(std::numeric_limits<float>::max()) &&
                     !halfway)) {
        t.f = negative ? -float(d) : float(d);
        t.float_ok = true;
      }
    }
    if (!t.float_ok) {
      auto [end, ec] = std::from_chars(start, q, t.f);
      t.float_ok = ec == std::errc() && end == q;
    }
    push(t);
  }

  // The tape's push_back, kept inline in the scanner's hot loop.
  void push(const Token& t) {
    auto& tk = tape_.tokens;
    if (tk.size() == tk.capacity()) [[unlikely]]
      tk.reserve(2 * tk.capacity() + 64);
    tk.push_back(t);
  }

  void string(Kind kind) {
    ++p_;  // opening quote
    std::string out;
    for (;;) {
      // copy the run of plain ASCII characters in one go
      const char* run = p_;
      while (p_ != end_ && *p_ != '"' && *p_ != '\\' && static_cast<unsigned char>(*p_) >= 0x20 &&
             static_cast<unsigned char>(*p_) < 0x80)
        ++p_;
      out.append(run, p_);
      need_more();
      unsigned char c = static_cast<unsigned char>(*p_);
      if (c == '"') {
        ++p_;
        break;
      }
      if (c < 0x20) fail("control character in a string (must be escaped)");
      if (c >= 0x80) {
        std::size_t len = utf8_sequence_length(reinterpret_cast<const unsigned char*>(p_), std::size_t(end_ - p_));
        if (!len) fail("invalid UTF-8 in a string");
        out.append(p_, len);
        p_ += len;
        continue;
      }
      ++p_;  // backslash
      need_more();
      switch (*p_++) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          std::uint32_t cp = hex4();
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            if (end_ - p_ < 2 || p_[0] != '\\' || p_[1] != 'u') fail("unpaired surrogate in a \\u escape");
            p_ += 2;
            std::uint32_t lo = hex4();
            if (lo < 0xDC00 || lo > 0xDFFF) fail("unpaired surrogate in a \\u escape");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
            fail("unpaired surrogate in a \\u escape");
          }
          append_utf8(out, cp);
          break;
        }
        default: --p_, fail("invalid escape in a string");
      }
    }
    tape_.tokens.push_back({kind, false, std::uint32_t(tape_.strings.size())});
    tape_.strings.push_back(std::move(out));
  }

  std::uint32_t hex4() {
    std::uint32_t v = 0;
    for (int i = 0; i < 4; ++i) {
      need_more();
      char c = *p_;
      int d = c >= '0' && c <= '9'   ? c - '0'
              : c >= 'a' && c <= 'f' ? c - 'a' + 10
              : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                     : -1;
      if (d < 0) fail("invalid \\u escape");
      v = v * 16 + std::uint32_t(d);
      ++p_;
    }
    return v;
  }

  // The path of the value being scanned, rebuilt from the open containers (only on error).
  std::string path_at_error() const {
    std::string path;
    const auto& tk = tape_.tokens;
    for (std::size_t level = 0; level < open_.size(); ++level) {
      std::uint32_t c = open_[level];
      bool child_is_open = level + 1 < open_.size();
      std::uint32_t i = c + 1, n = 0;
      std::string last_key;
      while (i < tk.size()) {
        if (tk[i].kind == Kind::Key) last_key = tape_.strings[tk[i].a], ++i;
        if (i >= tk.size()) break;
        ++n;
        bool open_child = (tk[i].kind == Kind::Array || tk[i].kind == Kind::Object) && tk[i].a == 0;
        if (open_child) break;
        i = tape_.skip(i);
      }
      if (tk[c].kind == Kind::Array) {
        std::uint32_t index = child_is_open ? n - 1 : n;
        path += "[" + std::to_string(index) + "]";
      } else if (!last_key.empty()) {
        path += (path.empty() ? "" : ".") + last_key;
      }
    }
    return path;
  }

  Tape& tape_;
  const char* begin_;
  const char* p_;
  const char* end_;
  const std::string& file_;
  std::vector<std::uint32_t> open_;  // tape indices of the containers not closed yet
};

// A link in the path from the document root to a value: printed only when an error is reported.
struct PathLink {
  const PathLink* parent = nullptr;
  std::string_view key;     // member name, or empty for an array element
  std::int64_t index = -1;  // array element index, or -1
};

inline void append_path(std::string& out, const PathLink* l) {
  if (!l) return;
  append_path(out, l->parent);
  if (l->index >= 0) {
    out += '[';
    out += std::to_string(l->index);
    out += ']';
  } else if (!l->key.empty()) {
    if (!out.empty()) out += '.';
    out += l->key;
  }
}

// A value in the tape, with the path to it. A Node refers to its parent's path: use it while the parent lives.
class Node {
 public:
  Node(const Tape& tape, const std::string& file, std::uint32_t tok, PathLink link)
      : tape_(&tape), file_(&file), tok_(tok), link_(link) {}

  Kind kind() const { return tok().kind; }
  std::string path() const {
    std::string p;
    append_path(p, &link_);
    return p;
  }
  [[noreturn]] void fail(const std::string& what) const {
    std::string p = path();
    throw Error(p.empty() ? *file_ : *file_ + ": " + p, what);
  }
  void expect(Kind k) const {
    if (kind() != k && !(k == Kind::String && kind() == Kind::Key) && !(k == Kind::Array && kind() == Kind::NumArray))
      fail(std::string("expected ") + kind_name(k) + ", found " + kind_name(kind()));
  }

  std::optional<Node> find(std::string_view key) const {
    expect(Kind::Object);
    for (std::uint32_t i = tok_ + 1; i < tok().a; i = tape_->skip(i + 1)) {
      const std::string& k = tape_->strings[tape_->tokens[i].a];
      if (k == key) return Node(*tape_, *file_, i + 1, PathLink{&link_, k});
    }
    return std::nullopt;
  }
  Node at(std::string_view key) const {
    if (auto n = find(key)) return *n;
    PathLink missing{&link_, key};
    std::string p;
    append_path(p, &missing);
    throw Error(*file_ + ": " + p, "missing field");
  }
  // f(std::string_view key, const Node& value) for each member, in file order.
  template <class F>
  void members(F&& f) const {
    expect(Kind::Object);
    for (std::uint32_t i = tok_ + 1; i < tok().a; i = tape_->skip(i + 1)) {
      const std::string& k = tape_->strings[tape_->tokens[i].a];
      f(std::string_view(k), Node(*tape_, *file_, i + 1, PathLink{&link_, k}));
    }
  }
  // f(std::size_t index, const Node& value) for each element.
  // (A long number array has no element nodes: read it with floats() or ints().)
  template <class F>
  void items(F&& f) const {
    if (kind() == Kind::NumArray) fail("expected an array of objects or strings, found an array of numbers");
    expect(Kind::Array);
    std::size_t n = 0;
    for (std::uint32_t i = tok_ + 1; i < tok().a; i = tape_->skip(i), ++n)
      f(n, Node(*tape_, *file_, i, PathLink{&link_, {}, std::int64_t(n)}));
  }
  std::size_t size() const {
    if (kind() != Kind::Array && kind() != Kind::Object && kind() != Kind::NumArray) expect(Kind::Array);
    return tok().b;
  }

  std::string str() const {
    expect(Kind::String);
    return tape_->strings[tok().a];
  }
  bool boolean() const {
    expect(Kind::Bool);
    return tok().a != 0;
  }
  template <class Int = std::int64_t>
  Int integer() const {
    expect(Kind::Number);
    std::string_view t = tape_->number_text(tok());
    Int v{};
    auto [p, ec] = std::from_chars(t.data(), t.data() + t.size(), v);
    if (ec == std::errc::result_out_of_range) fail("integer " + std::string(t) + " is out of range");
    if (ec != std::errc() || p != t.data() + t.size()) fail("expected an integer, found " + std::string(t));
    return v;
  }
  double number() const {
    expect(Kind::Number);
    std::string_view t = tape_->number_text(tok());
    double v = 0;
    auto [p, ec] = std::from_chars(t.data(), t.data() + t.size(), v);
    if (ec != std::errc() || p != t.data() + t.size()) fail("number " + std::string(t) + " is out of range");
    return v;
  }
  bool is_integer_text() const {
    return kind() == Kind::Number && tape_->number_text(tok()).find_first_of(".eE") == std::string_view::npos;
  }
  // An array of float32 values, each parsed from its own text (bit-exact).
  void floats(std::vector<float>& out) const {
    expect(Kind::Array);
    if (kind() == Kind::NumArray) {
      const Token& t = tok();
      if (!t.float_ok)
        tape_->number_texts(t, [&](std::uint32_t k, std::string_view s) {
          float v;
          auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
          if (ec != std::errc() || p != s.data() + s.size())
            element(k).fail("number " + std::string(s) + " is not representable as float32");
        });
      out.assign(tape_->floats.begin() + t.a, tape_->floats.begin() + t.a + t.b);
      return;
    }
    out.resize(tok().b);
    std::size_t n = 0;
    for (std::uint32_t i = tok_ + 1; i < tok().a; i = tape_->skip(i), ++n) {
      const Token& t = tape_->tokens[i];
      if (t.kind != Kind::Number || !t.float_ok) {
        Node element(*tape_, *file_, i, PathLink{&link_, {}, std::int64_t(n)});
        element.expect(Kind::Number);
        element.fail("number " + std::string(tape_->number_text(t)) + " is not representable as float32");
      }
      out[n] = t.f;
    }
  }
  void ints(std::vector<std::int32_t>& out) const {
    out.clear();
    out.reserve(size());
    if (kind() == Kind::NumArray) {
      tape_->number_texts(tok(), [&](std::uint32_t k, std::string_view s) {
        std::int32_t v = 0;
        auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
        if (ec != std::errc() || p != s.data() + s.size())
          element(k).fail("expected an integer, found " + std::string(s));
        out.push_back(v);
      });
      return;
    }
    items([&](std::size_t, const Node& v) { out.push_back(v.integer<std::int32_t>()); });
  }

 private:
  const Token& tok() const { return tape_->tokens[tok_]; }
  // A NumArray element, for error messages (it names the element's path; its token is the array's).
  Node element(std::uint32_t k) const { return Node(*tape_, *file_, tok_, PathLink{&link_, {}, std::int64_t(k)}); }
  const Tape* tape_;
  const std::string* file_;
  std::uint32_t tok_;
  PathLink link_;
};

// A parsed document: owns the text and the tape.
struct Document {
  std::string file;  // name used in error messages
  std::string text;
  Tape tape;
  Node root() const { return Node(tape, file, 0, PathLink{}); }
};

inline std::unique_ptr<Document> parse_document(std::string text, std::string file) {
  auto doc = std::make_unique<Document>();
  doc->file = std::move(file);
  doc->text = std::move(text);
  if (doc->text.size() >= std::numeric_limits<std::uint32_t>::max())
    throw Error(doc->file, "file larger than 4 GiB is not supported");
  doc->tape.source = doc->text;
  doc->tape.tokens.reserve(4096);
  doc->tape.floats.reserve(doc->text.size() / 10);
  Scanner(doc->tape, doc->text, doc->file).document();
  return doc;
}

}  // namespace json_detail

// ---- reading the schema -------------------------------------------------------------------------------------
namespace json_detail {

inline int to_int(const Node& n) { return n.integer<int>(); }

inline ExtractionConfig read_extraction(const Node& n) {
  ExtractionConfig e;
  std::vector<std::int32_t> v;
  Node layers = n.at("layers");
  layers.ints(v);
  for (int k : v)
    if (k < 1) layers.fail("layers are 1-based block indices, got " + std::to_string(k));
  e.layers.assign(v.begin(), v.end());
  Node positions = n.at("positions");
  positions.ints(v);
  for (int p : v)
    if (p >= 0) positions.fail("positions count from the end and are negative, got " + std::to_string(p));
  e.positions.assign(v.begin(), v.end());
  auto positive = [&](const char* key) {
    Node v = n.at(key);
    int x = to_int(v);
    if (x < 0) v.fail("must not be negative");
    return x;
  };
  e.hidden_dim = positive("hidden_dim");
  e.key_dim = positive("key_dim");
  e.top_k_logprobs = positive("top_k_logprobs");
  return e;
}

inline Metadata read_metadata(const Node& n) {
  Metadata m;
  m.experiment_type = n.at("experiment_type").str();
  m.variable_tested = n.at("variable_tested").str();
  m.model = n.at("model").str();
  m.model_size = n.at("model_size").str();
  m.architecture = n.at("architecture").str();
  m.sequence_length = n.at("sequence_length").integer();
  m.decode_steps = to_int(n.at("decode_steps"));
  m.extraction_config = read_extraction(n.at("extraction_config"));
  m.date_created = n.at("date_created").str();
  return m;
}

inline VariableValue read_variable_value(const Node& n) {
  switch (n.kind()) {
    case Kind::Null: return std::monostate{};
    case Kind::Bool: return n.boolean();
    case Kind::String: return n.str();
    case Kind::Number:
      if (n.is_integer_text()) return n.integer();
      return n.number();
    default: n.fail("expected a number, string, boolean or null");
  }
}

inline Configuration read_configuration(const Node& n) {
  Configuration c;
  c.config_id = n.at("config_id").str();
  c.hardware = n.at("hardware").str();
  c.provider = n.at("provider").str();
  c.variable_value = read_variable_value(n.at("variable_value"));
  Node fp = n.at("fixed_params");
  c.fixed_params.compile = fp.at("compile").boolean();
  c.fixed_params.attention_impl = fp.at("attention_impl").str();
  c.fixed_params.quantization = fp.at("quantization").str();
  c.fixed_params.tp_size = to_int(fp.at("tp_size"));
  c.fixed_params.ep_size = to_int(fp.at("ep_size"));
  c.fixed_params.concurrent_streams = fp.at("concurrent_streams").boolean();
  n.members([&](std::string_view key, const Node& v) {
    if (key.size() > 8 && key.ends_with("_version")) c.versions[std::string(key)] = v.str();
  });
  auto opt_str = [&](const char* key, std::string& out) {
    if (auto v = n.find(key)) out = v->str();
  };
  opt_str("fpf_commit", c.fpf_commit);
  opt_str("gpu_name", c.gpu_name);
  opt_str("gpu_driver", c.gpu_driver);
  opt_str("compiler", c.compiler);
  opt_str("build_flags", c.build_flags);
  opt_str("backend", c.backend);
  opt_str("precision", c.precision);
  if (auto v = n.find("batch_size")) c.batch_size = to_int(*v);
  if (auto t = n.find("timing")) {
    c.timing = Timing{to_int(t->at("reps")), t->at("runtime_seconds_mean").number(),
                      t->at("runtime_seconds_variance").number()};
  }
  if (auto d = n.find("determinism")) {
    c.determinism =
        Determinism{to_int(d->at("reps_compared")), d->at("bit_exact").boolean(), d->at("signals_fnv1a64").str()};
    if (auto f = d->find("first_difference")) c.determinism->first_difference = f->str();
  }
  return c;
}

// "layer_12" -> 12, "pos_-3" -> -3; anything else is an error naming the key.
inline int parse_suffix(const Node& parent, std::string_view key, std::string_view prefix) {
  int v = 0;
  const char* b = key.data() + prefix.size();
  const char* e = key.data() + key.size();
  if (!key.starts_with(prefix) || std::from_chars(b, e, v).ptr != e || b == e)
    parent.fail("unexpected key \"" + std::string(key) + "\" (expected " + std::string(prefix) + "<int>)");
  return v;
}

// A key must be listed in extraction_config (a layer or position the experiment did not ask for is an error).
inline void check_listed(const Node& value, int k, const std::vector<int>& expected, const char* config_field) {
  if (std::find(expected.begin(), expected.end(), k) == expected.end())
    value.fail(std::string("not in experiment_metadata.extraction_config.") + config_field);
}

// Every key listed in extraction_config must be present.
template <class Map>
void check_present(const Node& n, const Map& got, const std::vector<int>& expected, const char* prefix) {
  for (int k : expected)
    if (!got.count(k)) n.at(std::string(prefix) + std::to_string(k));  // throws "missing field" with the path
}

inline void read_layer_map(const Node& n, const ExtractionConfig& ec, int dim, const char* dim_name,
                           taps::LayerPosMap& out) {
  n.members([&](std::string_view lkey, const Node& layer) {
    int k = parse_suffix(n, lkey, "layer_");
    check_listed(layer, k, ec.layers, "layers");
    auto& positions = out[k];
    layer.members([&](std::string_view pkey, const Node& vec) {
      int p = parse_suffix(layer, pkey, "pos_");
      check_listed(vec, p, ec.positions, "positions");
      auto& v = positions[p];
      vec.floats(v);
      if (int(v.size()) != dim)
        vec.fail("has " + std::to_string(v.size()) + " values, experiment_metadata.extraction_config." + dim_name +
                 " is " + std::to_string(dim));
    });
    check_present(layer, positions, ec.positions, "pos_");
  });
  check_present(n, out, ec.layers, "layer_");
}

inline taps::StepSignals read_step(const Node& n, const ExtractionConfig& ec) {
  taps::StepSignals s;
  s.step = to_int(n.at("step"));
  s.token_id = n.at("token_id").integer<std::int32_t>();
  s.token_text = n.at("token_text").str();
  read_layer_map(n.at("hidden_states"), ec, ec.hidden_dim, "hidden_dim", s.hidden_states);
  read_layer_map(n.at("key_vectors"), ec, ec.key_dim, "key_dim", s.key_vectors);
  Node lp = n.at("logprobs");
  lp.members([&](std::string_view pkey, const Node& entry) {
    int p = parse_suffix(lp, pkey, "pos_");
    check_listed(entry, p, ec.positions, "positions");
    taps::TopK& t = s.logprobs[p];
    entry.at("token_ids").ints(t.token_ids);
    Node probs = entry.at("log_probs");
    probs.floats(t.log_probs);
    if (int(t.token_ids.size()) != ec.top_k_logprobs)
      entry.at("token_ids")
          .fail("has " + std::to_string(t.token_ids.size()) +
                " ids, experiment_metadata.extraction_config.top_k_logprobs is " + std::to_string(ec.top_k_logprobs));
    if (t.log_probs.size() != t.token_ids.size())
      probs.fail("has " + std::to_string(t.log_probs.size()) + " values but token_ids has " +
                 std::to_string(t.token_ids.size()));
  });
  check_present(lp, s.logprobs, ec.positions, "pos_");
  return s;
}

inline Run read_run(const Node& n, const ExtractionConfig& ec) {
  Run r;
  r.config_id = n.at("config_id").str();
  r.rep_id = to_int(n.at("rep_id"));
  r.timestamp = n.at("timestamp").str();
  r.runtime_seconds = n.at("runtime_seconds").number();
  r.prompt_text = n.at("prompt_text").str();
  if (auto ids = n.find("prompt_ids")) ids->ints(r.prompt_ids);
  n.at("decode_steps").items([&](std::size_t i, const Node& step) {
    r.decode_steps.push_back(read_step(step, ec));
    if (r.decode_steps.back().step != int(i))
      step.at("step").fail("is " + std::to_string(r.decode_steps.back().step) + ", expected " + std::to_string(i) +
                           " (steps in order from 0)");
  });
  return r;
}

}  // namespace json_detail

// Parses an experiment file's text; `name` is used in error messages (usually the file's path).
inline ExperimentFile parse_experiment(std::string text, const std::string& name) {
  using namespace json_detail;
  auto doc = parse_document(std::move(text), name);
  Node root = doc->root();
  root.expect(Kind::Object);
  ExperimentFile f;
  f.experiment_metadata = read_metadata(root.at("experiment_metadata"));
  const ExtractionConfig& ec = f.experiment_metadata.extraction_config;
  Node configs = root.at("configurations");
  configs.items([&](std::size_t, const Node& c) {
    f.configurations.push_back(read_configuration(c));
    for (std::size_t j = 0; j + 1 < f.configurations.size(); ++j)
      if (f.configurations[j].config_id == f.configurations.back().config_id)
        c.at("config_id").fail("\"" + f.configurations.back().config_id + "\" appears twice");
  });
  root.at("runs").items([&](std::size_t, const Node& r) {
    f.runs.push_back(read_run(r, ec));
    const Run& run = f.runs.back();
    if (!f.find_configuration(run.config_id))
      r.at("config_id").fail("\"" + run.config_id + "\" is not in configurations");
    for (std::size_t j = 0; j + 1 < f.runs.size(); ++j)
      if (f.runs[j].config_id == run.config_id && f.runs[j].rep_id == run.rep_id)
        r.at("rep_id").fail("rep " + std::to_string(run.rep_id) + " of \"" + run.config_id + "\" appears twice");
  });
  return f;
}

inline std::string read_text_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path.string(), "cannot open for reading");
  std::string text;
  in.seekg(0, std::ios::end);
  text.resize(std::size_t(in.tellg()));
  in.seekg(0);
  in.read(text.data(), std::streamsize(text.size()));
  if (!in) throw Error(path.string(), "read failed");
  return text;
}

inline ExperimentFile read_experiment(const std::filesystem::path& path) {
  return parse_experiment(read_text_file(path), path.string());
}

// =============================================================================================================
// Writing
// =============================================================================================================
namespace json_detail {

inline void put_string(std::string& o, std::string_view s) {
  static const char* hex = "0123456789abcdef";
  o += '"';
  for (std::size_t i = 0; i < s.size();) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      if (c == '"' || c == '\\')
        o += '\\', o += char(c);
      else if (c == '\n')
        o += "\\n";
      else if (c == '\t')
        o += "\\t";
      else if (c == '\r')
        o += "\\r";
      else if (c < 0x20)
        o += "\\u00", o += hex[c >> 4], o += hex[c & 15];
      else
        o += char(c);
      ++i;
      continue;
    }
    // A byte that does not start a valid UTF-8 sequence becomes U+FFFD.
    std::size_t len = utf8_sequence_length(reinterpret_cast<const unsigned char*>(s.data() + i), s.size() - i);
    bool ok = len != 0;
    if (ok) {
      o.append(s.substr(i, len));
      i += len;
    } else {
      o += "\xEF\xBF\xBD";
      ++i;
    }
  }
  o += '"';
}

template <class T>
void put_int(std::string& o, T v) {
  char buf[24];
  auto r = std::to_chars(buf, buf + sizeof buf, v);
  o.append(buf, r.ptr);
}

// where() builds the field's path, only called when the value cannot be written.
template <class Where>
void put_double(std::string& o, double v, Where&& where) {
  if (!std::isfinite(v)) throw Error(where(), "NaN/Inf cannot be written to JSON (see docs/experiments.md)");
  char buf[32];
  auto r = std::to_chars(buf, buf + sizeof buf, v);
  o.append(buf, r.ptr);
}

template <class Where>
void put_floats(std::string& o, std::span<const float> v, Where&& where) {
  o += '[';
  char buf[24];
  for (std::size_t i = 0; i < v.size(); ++i) {
    if (!std::isfinite(v[i]))
      throw Error(where() + "[" + std::to_string(i) + "]",
                  "NaN/Inf cannot be written to JSON (see docs/experiments.md)");
    if (i) o += ',';
    auto r = std::to_chars(buf, buf + sizeof buf, v[i]);
    o.append(buf, r.ptr);
  }
  o += ']';
}

template <class T>
void put_ints(std::string& o, const std::vector<T>& v) {
  o += '[';
  for (std::size_t i = 0; i < v.size(); ++i) {
    if (i) o += ',';
    put_int(o, v[i]);
  }
  o += ']';
}

// An object being written: "{", then one member per key(), then close() writes "}". Members go one per line,
// indented by two spaces per level.
class ObjectWriter {
 public:
  ObjectWriter(std::string& o, int depth) : o_(o), depth_(depth) { o_ += '{'; }
  std::string& key(std::string_view k) {
    if (!first_) o_ += ',';
    first_ = false;
    newline(depth_ + 1);
    put_string(o_, k);
    o_ += ": ";
    return o_;
  }
  void close() {
    if (!first_) newline(depth_);
    o_ += '}';
  }
  int depth() const { return depth_; }

 private:
  void newline(int d) {
    o_ += '\n';
    o_.append(std::size_t(2 * d), ' ');
  }
  std::string& o_;
  int depth_;
  bool first_ = true;
};

// An array of objects: "[", items one per line, "]".
template <class Range, class WriteItem>
void put_object_array(std::string& o, int depth, const Range& items, WriteItem&& write_item) {
  o += '[';
  std::size_t i = 0;
  for (const auto& item : items) {
    o += i ? ",\n" : "\n";
    o.append(std::size_t(2 * (depth + 1)), ' ');
    write_item(item, i++);
  }
  if (i) {
    o += '\n';
    o.append(std::size_t(2 * depth), ' ');
  }
  o += ']';
}

inline void put_variable_value(std::string& o, const VariableValue& v, const std::string& where) {
  std::visit(
      [&](const auto& x) {
        using T = std::decay_t<decltype(x)>;
        if constexpr (std::is_same_v<T, std::monostate>)
          o += "null";
        else if constexpr (std::is_same_v<T, bool>)
          o += x ? "true" : "false";
        else if constexpr (std::is_same_v<T, std::int64_t>)
          put_int(o, x);
        else if constexpr (std::is_same_v<T, double>)
          put_double(o, x, [&] { return where; });
        else
          put_string(o, x);
      },
      v);
}

inline void put_metadata(std::string& o, const Metadata& m, int depth) {
  ObjectWriter w(o, depth);
  put_string(w.key("experiment_type"), m.experiment_type);
  put_string(w.key("variable_tested"), m.variable_tested);
  put_string(w.key("model"), m.model);
  put_string(w.key("model_size"), m.model_size);
  put_string(w.key("architecture"), m.architecture);
  put_int(w.key("sequence_length"), m.sequence_length);
  put_int(w.key("decode_steps"), m.decode_steps);
  ObjectWriter e(w.key("extraction_config"), depth + 1);
  put_ints(e.key("layers"), m.extraction_config.layers);
  put_ints(e.key("positions"), m.extraction_config.positions);
  put_int(e.key("hidden_dim"), m.extraction_config.hidden_dim);
  put_int(e.key("key_dim"), m.extraction_config.key_dim);
  put_int(e.key("top_k_logprobs"), m.extraction_config.top_k_logprobs);
  e.close();
  put_string(w.key("date_created"), m.date_created);
  w.close();
}

inline void put_configuration(std::string& o, const Configuration& c, int depth, std::size_t index) {
  std::string where = "configurations[" + std::to_string(index) + "]";
  ObjectWriter w(o, depth);
  put_string(w.key("config_id"), c.config_id);
  put_string(w.key("hardware"), c.hardware);
  put_string(w.key("provider"), c.provider);
  put_variable_value(w.key("variable_value"), c.variable_value, where + ".variable_value");
  for (const auto& [k, v] : c.versions) put_string(w.key(k), v);
  {
    const FixedParams& fp = c.fixed_params;
    ObjectWriter f(w.key("fixed_params"), depth + 1);
    f.key("compile") += fp.compile ? "true" : "false";
    put_string(f.key("attention_impl"), fp.attention_impl);
    put_string(f.key("quantization"), fp.quantization);
    put_int(f.key("tp_size"), fp.tp_size);
    put_int(f.key("ep_size"), fp.ep_size);
    f.key("concurrent_streams") += fp.concurrent_streams ? "true" : "false";
    f.close();
  }
  auto opt_str = [&](const char* key, const std::string& v) {
    if (!v.empty()) put_string(w.key(key), v);
  };
  opt_str("fpf_commit", c.fpf_commit);
  opt_str("gpu_name", c.gpu_name);
  opt_str("gpu_driver", c.gpu_driver);
  opt_str("compiler", c.compiler);
  opt_str("build_flags", c.build_flags);
  opt_str("backend", c.backend);
  opt_str("precision", c.precision);
  if (c.batch_size) put_int(w.key("batch_size"), c.batch_size);
  if (c.timing) {
    ObjectWriter t(w.key("timing"), depth + 1);
    put_int(t.key("reps"), c.timing->reps);
    put_double(t.key("runtime_seconds_mean"), c.timing->runtime_seconds_mean, [&] { return where + ".timing"; });
    put_double(t.key("runtime_seconds_variance"), c.timing->runtime_seconds_variance,
               [&] { return where + ".timing"; });
    t.close();
  }
  if (c.determinism) {
    ObjectWriter d(w.key("determinism"), depth + 1);
    put_int(d.key("reps_compared"), c.determinism->reps_compared);
    d.key("bit_exact") += c.determinism->bit_exact ? "true" : "false";
    put_string(d.key("signals_fnv1a64"), c.determinism->signals_fnv1a64);
    if (!c.determinism->first_difference.empty())
      put_string(d.key("first_difference"), c.determinism->first_difference);
    d.close();
  }
  w.close();
}

template <class Where>
void put_layer_map(std::string& o, const taps::LayerPosMap& m, int depth, Where&& where) {
  ObjectWriter w(o, depth);
  for (const auto& [layer, positions] : m) {
    std::string lkey = "layer_" + std::to_string(layer);
    ObjectWriter l(w.key(lkey), depth + 1);
    for (const auto& [pos, values] : positions) {
      std::string pkey = "pos_" + std::to_string(pos);
      put_floats(l.key(pkey), values, [&] { return where() + "." + lkey + "." + pkey; });
    }
    l.close();
  }
  w.close();
}

inline void put_step(std::string& o, const taps::StepSignals& s, int depth, const std::string& where) {
  ObjectWriter w(o, depth);
  put_int(w.key("step"), s.step);
  put_int(w.key("token_id"), s.token_id);
  put_string(w.key("token_text"), s.token_text);
  put_layer_map(w.key("hidden_states"), s.hidden_states, depth + 1, [&] { return where + ".hidden_states"; });
  put_layer_map(w.key("key_vectors"), s.key_vectors, depth + 1, [&] { return where + ".key_vectors"; });
  ObjectWriter lp(w.key("logprobs"), depth + 1);
  for (const auto& [pos, topk] : s.logprobs) {
    std::string pkey = "pos_" + std::to_string(pos);
    ObjectWriter t(lp.key(pkey), depth + 2);
    put_ints(t.key("token_ids"), topk.token_ids);
    put_floats(t.key("log_probs"), topk.log_probs, [&] { return where + ".logprobs." + pkey + ".log_probs"; });
    t.close();
  }
  lp.close();
  w.close();
}

inline void put_run(std::string& o, const Run& r, int depth, std::size_t index) {
  std::string where = "runs[" + std::to_string(index) + "]";
  ObjectWriter w(o, depth);
  put_string(w.key("config_id"), r.config_id);
  put_int(w.key("rep_id"), r.rep_id);
  put_string(w.key("timestamp"), r.timestamp);
  put_double(w.key("runtime_seconds"), r.runtime_seconds, [&] { return where + ".runtime_seconds"; });
  put_string(w.key("prompt_text"), r.prompt_text);
  if (!r.prompt_ids.empty()) put_ints(w.key("prompt_ids"), r.prompt_ids);
  put_object_array(w.key("decode_steps"), depth + 1, r.decode_steps, [&](const taps::StepSignals& s, std::size_t i) {
    put_step(o, s, depth + 2, where + ".decode_steps[" + std::to_string(i) + "]");
  });
  w.close();
}

}  // namespace json_detail

// The file's JSON text (ends with a newline). Throws fpf::Error naming the field of a NaN/Inf value.
inline std::string to_json_text(const ExperimentFile& f) {
  using namespace json_detail;
  std::string o;
  std::size_t floats = 0;
  for (const Run& r : f.runs)
    for (const auto& s : r.decode_steps) {
      for (const auto& [l, ps] : s.hidden_states)
        for (const auto& [p, v] : ps) floats += v.size();
      for (const auto& [l, ps] : s.key_vectors)
        for (const auto& [p, v] : ps) floats += v.size();
    }
  o.reserve(4096 + floats * 13);
  ObjectWriter w(o, 0);
  put_metadata(w.key("experiment_metadata"), f.experiment_metadata, 1);
  put_object_array(w.key("configurations"), 1, f.configurations,
                   [&](const Configuration& c, std::size_t i) { put_configuration(o, c, 2, i); });
  put_object_array(w.key("runs"), 1, f.runs, [&](const Run& r, std::size_t i) { put_run(o, r, 2, i); });
  w.close();
  o += '\n';
  return o;
}

// Writes text to path atomically: a temporary file in the same folder, flushed to disk, renamed over path.
inline void write_file_atomic(const std::filesystem::path& path, std::string_view text) {
  namespace fs = std::filesystem;
  fs::path tmp = path;
  tmp += ".tmp." + std::to_string(::getpid());
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) throw Error(path.string(), std::string("cannot create ") + tmp.string() + ": " + std::strerror(errno));
  bool ok = std::fwrite(text.data(), 1, text.size(), f) == text.size();
  ok = std::fflush(f) == 0 && ok;
  ok = ::fsync(::fileno(f)) == 0 && ok;
  ok = std::fclose(f) == 0 && ok;
  std::error_code ec;
  if (ok) fs::rename(tmp, path, ec);
  if (!ok || ec) {
    fs::remove(tmp, ec);
    throw Error(path.string(), "write failed (disk full or no permission?)");
  }
}

inline void write_experiment(const std::filesystem::path& path, const ExperimentFile& f) {
  write_file_atomic(path, to_json_text(f));
}

}  // namespace fpf::experiment
