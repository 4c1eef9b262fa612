#pragma once
// Small Boost.JSON helpers shared by the readers: parsing with a byte position in the error, rejecting duplicate
// keys (boost::json::parse silently keeps the last one), and short descriptions of values for error messages.
#include <cerrno>
#include <cstddef>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_set>
#include <vector>

#include <boost/json.hpp>
#include <boost/json/basic_parser_impl.hpp>

#include <fpf/core/error.hpp>

namespace fpf::io::json {

// "object", "array", "string", "integer", "number", "bool", "null": the kind of v as a user would say it.
inline std::string kind_name(const boost::json::value& v) {
  switch (v.kind()) {
    case boost::json::kind::object: return "object";
    case boost::json::kind::array: return "array";
    case boost::json::kind::string: return "string";
    case boost::json::kind::int64:
    case boost::json::kind::uint64: return "integer";
    case boost::json::kind::double_: return "number";
    case boost::json::kind::bool_: return "bool";
    case boost::json::kind::null: return "null";
  }
  return "?";
}

// The value as JSON text, cut to max_chars, for "got ..." in messages.
inline std::string brief(const boost::json::value& v, std::size_t max_chars = 60) {
  std::string s = boost::json::serialize(v);
  if (s.size() > max_chars) s = s.substr(0, max_chars) + "...";
  return s;
}

// Parses one JSON document (surrounding whitespace allowed). Throws fpf::Error(where, "not valid JSON: ...").
inline boost::json::value parse(std::string_view text, const std::string& where) {
  boost::json::stream_parser p;
  boost::json::error_code ec;
  const std::size_t used = p.write_some(text.data(), text.size(), ec);
  if (!ec && used < text.size()) ec = boost::json::error::extra_data;
  if (!ec) p.finish(ec);
  if (ec) {
    // Line/column help a person find the spot in a config.json; the byte offset is exact.
    std::size_t line = 1, col = 1;
    for (std::size_t i = 0; i < used && i < text.size(); ++i) {
      if (text[i] == '\n') ++line, col = 1;
      else ++col;
    }
    throw Error(where, "not valid JSON: " + ec.message() + " at byte " + std::to_string(used) + " (line " +
                           std::to_string(line) + ", column " + std::to_string(col) + ")");
  }
  return p.release();
}

// A key that appears twice in one object, and the key under which that object sits ("" at the top level).
struct DuplicateKey {
  std::string key;
  std::string parent;
  bool found = false;
  explicit operator bool() const noexcept { return found; }
};

namespace detail {
// SAX handler that only tracks keys per open object and stops at the first repeated one.
struct DuplicateKeyFinder {
  static constexpr std::size_t max_array_size = static_cast<std::size_t>(-1);
  static constexpr std::size_t max_object_size = static_cast<std::size_t>(-1);
  static constexpr std::size_t max_string_size = static_cast<std::size_t>(-1);
  static constexpr std::size_t max_key_size = static_cast<std::size_t>(-1);

  struct Open {
    std::string name;  // the key this object is the value of
    std::unordered_set<std::string> keys;
  };
  std::vector<Open> open_objects;
  std::string key;       // the key being assembled from its parts
  std::string last_key;  // the most recent complete key: the name of an object that opens next
  DuplicateKey found;
  using ec_t = boost::json::error_code;

  bool on_document_begin(ec_t&) { return true; }
  bool on_document_end(ec_t&) { return true; }
  bool on_array_begin(ec_t&) { return true; }
  bool on_array_end(std::size_t, ec_t&) { return true; }
  bool on_object_begin(ec_t&) {
    open_objects.push_back({open_objects.empty() ? std::string() : last_key, {}});
    return true;
  }
  bool on_object_end(std::size_t, ec_t&) {
    open_objects.pop_back();
    return true;
  }
  bool on_string_part(boost::json::string_view, std::size_t, ec_t&) { return true; }
  bool on_string(boost::json::string_view, std::size_t, ec_t&) { return true; }
  bool on_key_part(boost::json::string_view s, std::size_t, ec_t&) {
    key.append(s.data(), s.size());
    return true;
  }
  bool on_key(boost::json::string_view s, std::size_t, ec_t& ec) {
    key.append(s.data(), s.size());
    if (!open_objects.back().keys.insert(key).second) {
      found = {key, open_objects.back().name, true};
      ec = boost::json::error::syntax;  // any error stops the parser; `found` says why
      return false;
    }
    last_key = std::move(key);
    key.clear();
    return true;
  }
  bool on_number_part(boost::json::string_view, ec_t&) { return true; }
  bool on_int64(std::int64_t, boost::json::string_view, ec_t&) { return true; }
  bool on_uint64(std::uint64_t, boost::json::string_view, ec_t&) { return true; }
  bool on_double(double, boost::json::string_view, ec_t&) { return true; }
  bool on_bool(bool, ec_t&) { return true; }
  bool on_null(ec_t&) { return true; }
  bool on_comment_part(boost::json::string_view, ec_t&) { return true; }
  bool on_comment(boost::json::string_view, ec_t&) { return true; }
};
}  // namespace detail

// The first key that appears twice in one object (at any depth) of valid JSON text; false if there is none.
inline DuplicateKey find_duplicate_key(std::string_view text) {
  boost::json::basic_parser<detail::DuplicateKeyFinder> p{boost::json::parse_options{}};
  boost::json::error_code ec;
  p.write_some(false, text.data(), text.size(), ec);
  return p.handler().found;
}

// The whole file as a string. Throws fpf::Error(path, "cannot read: ...").
inline std::string read_text_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path.string(), std::string("cannot open: ") + std::strerror(errno));
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) throw Error(path.string(), "cannot read");
  return text;
}

}  // namespace fpf::io::json
