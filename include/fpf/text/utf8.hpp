#pragma once
// UTF-8 helpers for the tokenizer: strict validation (with the byte offset of the first error), lossy repair the way
// Rust's String::from_utf8_lossy does it (what Hugging Face's decoders return), and NFC normalization through
// utf8proc that only touches the parts of a text that can change.
#include <fpf/core/error.hpp>

#include <utf8proc.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>

namespace fpf::text {

namespace detail {

// Length of the valid UTF-8 sequence starting at s[i], or the length (>= 1) of the invalid prefix that starts there
// (negated). This is the "maximal subpart" rule of Unicode §3.9 that Rust's from_utf8_lossy also follows: each
// maximal invalid subpart becomes one U+FFFD.
inline int utf8_sequence(std::string_view s, std::size_t i) noexcept {
  const auto b0 = static_cast<unsigned char>(s[i]);
  if (b0 < 0x80) return 1;
  int need = 0;
  unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    need = 1;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    need = 2;
    if (b0 == 0xE0) lo = 0xA0;  // no overlong 3-byte forms
    if (b0 == 0xED) hi = 0x9F;  // no surrogates
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    need = 3;
    if (b0 == 0xF0) lo = 0x90;  // no overlong 4-byte forms
    if (b0 == 0xF4) hi = 0x8F;  // nothing above U+10FFFF
  } else {
    return -1;
  }
  for (int k = 1; k <= need; ++k) {
    if (i + k >= s.size()) return -k;
    const auto b = static_cast<unsigned char>(s[i + k]);
    const unsigned char l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xBF;
    if (b < l || b > h) return -k;
  }
  return need + 1;
}

}  // namespace detail

// Byte offset of the first invalid UTF-8 sequence, or npos when the whole text is valid.
inline std::size_t first_invalid_utf8(std::string_view s) noexcept {
  std::size_t i = 0;
  while (i < s.size()) {
    // Skip ASCII eight bytes at a time: most text is mostly ASCII.
    while (i + 8 <= s.size()) {
      std::uint64_t w;
      std::memcpy(&w, s.data() + i, 8);
      if (w & 0x8080808080808080ull) break;
      i += 8;
    }
    if (i >= s.size()) break;
    const int n = detail::utf8_sequence(s, i);
    if (n < 0) return i;
    i += static_cast<std::size_t>(n);
  }
  return std::string_view::npos;
}

// Throws fpf::Error(where, "invalid UTF-8 at byte N") unless s is valid UTF-8.
inline void check_utf8(std::string_view s, const std::string& where) {
  if (const auto bad = first_invalid_utf8(s); bad != std::string_view::npos)
    throw Error(where, "invalid UTF-8 at byte " + std::to_string(bad));
}

// Valid UTF-8 from arbitrary bytes: each maximal invalid subpart becomes U+FFFD (Rust's from_utf8_lossy).
inline std::string utf8_lossy(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  std::size_t i = 0;
  while (i < s.size()) {
    const int n = detail::utf8_sequence(s, i);
    if (n > 0) {
      out.append(s.substr(i, static_cast<std::size_t>(n)));
      i += static_cast<std::size_t>(n);
    } else {
      out.append("\xEF\xBF\xBD");
      i += static_cast<std::size_t>(-n);
    }
  }
  return out;
}

// Appends NFC(s) to out. s must be valid UTF-8. A boundary just before an ASCII character is stable under
// normalization (ASCII has canonical combining class 0 and never composes with what precedes it), so only the
// stretches from the ASCII character before a non-ASCII run to the next ASCII character go through utf8proc.
inline void append_nfc(std::string_view s, std::string& out) {
  std::size_t done = 0;
  std::size_t i = 0;
  while (i < s.size()) {
    if (static_cast<unsigned char>(s[i]) < 0x80) {
      ++i;
      continue;
    }
    // The chunk starts at the ASCII character before the run (it may be the base of a combining mark).
    const std::size_t begin = i > done ? i - 1 : i;
    std::size_t end = i;
    while (end < s.size() && static_cast<unsigned char>(s[end]) >= 0x80) ++end;
    out.append(s.substr(done, begin - done));
    utf8proc_uint8_t* mapped = nullptr;
    const auto n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(s.data() + begin),
                                static_cast<utf8proc_ssize_t>(end - begin), &mapped,
                                static_cast<utf8proc_option_t>(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
    if (n < 0) throw Error("NFC normalization", utf8proc_errmsg(n));
    std::unique_ptr<utf8proc_uint8_t, decltype(&std::free)> hold(mapped, &std::free);
    out.append(reinterpret_cast<const char*>(mapped), static_cast<std::size_t>(n));
    done = i = end;
  }
  out.append(s.substr(done));
}

inline std::string nfc(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  append_nfc(s, out);
  return out;
}

}  // namespace fpf::text
