#pragma once
// Reading and writing experiment files (schema.hpp) as JSON.
//
// Floats: every float32 is written as its own shortest round-trip decimal (std::to_chars(float)), and read back
// with std::from_chars(float) from the number's text, so a reader gets the identical bits (-0.0 and subnormals
// included). We do not let a JSON library go through double: printing a float as a double gives 17 digits
// ("0.10000000149011612"), and parsing a decimal to double and then rounding to float can round twice.
// Boost.JSON's basic_parser checks the syntax and hands us each number's text.
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
#include <sstream>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include <unistd.h>

#include <boost/json/basic_parser_impl.hpp>

#include <fpf/core/error.hpp>
#include <fpf/experiment/schema.hpp>

namespace fpf::experiment {

// =============================================================================================================
// Reading: Boost.JSON's SAX parser fills a flat "tape" of tokens; Node walks it with the path for error messages.
// =============================================================================================================
namespace json_detail {

enum class Kind : std::uint8_t { Null, Bool, Number, String, Key, Array, Object };

inline const char* kind_name(Kind k) {
  switch (k) {
    case Kind::Null: return "null";
    case Kind::Bool: return "a boolean";
    case Kind::Number: return "a number";
    case Kind::String:
    case Kind::Key: return "a string";
    case Kind::Array: return "an array";
    case Kind::Object: return "an object";
  }
  return "?";
}

// One token. Number: a = offset, b = length of its text in Tape::numbers_text or the source. String/Key: a = index
// into Tape::strings. Bool: a = 0/1. Array/Object: a = index one past the container's last token, b = element count.
struct Token {
  Kind kind;
  bool number_in_source = true;  // number text lies in the source buffer (false: in numbers_text)
  std::uint32_t a = 0;
  std::uint32_t b = 0;
};

struct Tape {
  std::string_view source;
  std::vector<Token> tokens;
  std::vector<std::string> strings;
  std::string numbers_text;  // numbers the parser handed over in pieces

  std::string_view number_text(const Token& t) const {
    return t.number_in_source ? source.substr(t.a, t.b) : std::string_view(numbers_text).substr(t.a, t.b);
  }
  // Index of the token after the value starting at i.
  std::uint32_t skip(std::uint32_t i) const {
    const Token& t = tokens[i];
    return (t.kind == Kind::Array || t.kind == Kind::Object) ? t.a : i + 1;
  }
};

// The handler boost::json::basic_parser calls; it appends tokens.
struct TapeBuilder {
  static constexpr std::size_t max_object_size = std::size_t(-1);
  static constexpr std::size_t max_array_size = std::size_t(-1);
  static constexpr std::size_t max_key_size = std::size_t(-1);
  static constexpr std::size_t max_string_size = std::size_t(-1);

  Tape tape;
  std::vector<std::uint32_t> open;  // tape indices of the containers not closed yet
  std::string part;                 // a string, key or number handed over in pieces

  using ec_t = boost::json::error_code;
  using sv = boost::json::string_view;

  bool on_document_begin(ec_t&) { return true; }
  bool on_document_end(ec_t&) { return true; }
  bool begin(Kind k) {
    open.push_back(std::uint32_t(tape.tokens.size()));
    tape.tokens.push_back({k});
    return true;
  }
  bool end(std::size_t n) {
    Token& t = tape.tokens[open.back()];
    t.a = std::uint32_t(tape.tokens.size());
    t.b = std::uint32_t(n);
    open.pop_back();
    return true;
  }
  bool on_array_begin(ec_t&) { return begin(Kind::Array); }
  bool on_array_end(std::size_t n, ec_t&) { return end(n); }
  bool on_object_begin(ec_t&) { return begin(Kind::Object); }
  bool on_object_end(std::size_t n, ec_t&) { return end(n); }
  bool text(Kind k, sv s) {
    part.append(s.data(), s.size());
    tape.tokens.push_back({k, true, std::uint32_t(tape.strings.size()), 0});
    tape.strings.push_back(std::move(part));
    part.clear();
    return true;
  }
  bool on_string_part(sv s, std::size_t, ec_t&) { return part.append(s.data(), s.size()), true; }
  bool on_string(sv s, std::size_t, ec_t&) { return text(Kind::String, s); }
  bool on_key_part(sv s, std::size_t, ec_t&) { return part.append(s.data(), s.size()), true; }
  bool on_key(sv s, std::size_t, ec_t&) { return text(Kind::Key, s); }
  bool on_number_part(sv s, ec_t&) { return part.append(s.data(), s.size()), true; }
  bool number(sv s) {
    const char* base = tape.source.data();
    if (part.empty() && s.data() >= base && s.data() + s.size() <= base + tape.source.size()) {
      tape.tokens.push_back({Kind::Number, true, std::uint32_t(s.data() - base), std::uint32_t(s.size())});
    } else {
      part.append(s.data(), s.size());
      tape.tokens.push_back(
          {Kind::Number, false, std::uint32_t(tape.numbers_text.size()), std::uint32_t(part.size())});
      tape.numbers_text += part;
      part.clear();
    }
    return true;
  }
  bool on_int64(std::int64_t, sv s, ec_t&) { return number(s); }
  bool on_uint64(std::uint64_t, sv s, ec_t&) { return number(s); }
  bool on_double(double, sv s, ec_t&) { return number(s); }
  bool on_bool(bool b, ec_t&) { return tape.tokens.push_back({Kind::Bool, true, b ? 1u : 0u, 0}), true; }
  bool on_null(ec_t&) { return tape.tokens.push_back({Kind::Null}), true; }
  bool on_comment_part(sv, ec_t&) { return true; }
  bool on_comment(sv, ec_t&) { return true; }

  // After a syntax error: the path of the value the parser was in, rebuilt from the open containers.
  std::string path_at_error() const {
    std::string path;
    const auto& tk = tape.tokens;
    for (std::size_t level = 0; level < open.size(); ++level) {
      std::uint32_t c = open[level];
      bool child_is_open = level + 1 < open.size();
      std::uint32_t i = c + 1, n = 0;
      std::string last_key;
      while (i < tk.size()) {
        if (tk[i].kind == Kind::Key) last_key = tape.strings[tk[i].a], ++i;
        if (i >= tk.size()) break;
        ++n;
        bool open_child = (tk[i].kind == Kind::Array || tk[i].kind == Kind::Object) && tk[i].a == 0;
        if (open_child) break;
        i = tape.skip(i);
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
    if (kind() != k && !(k == Kind::String && kind() == Kind::Key))
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
  template <class F>
  void items(F&& f) const {
    expect(Kind::Array);
    std::size_t n = 0;
    for (std::uint32_t i = tok_ + 1; i < tok().a; i = tape_->skip(i), ++n)
      f(n, Node(*tape_, *file_, i, PathLink{&link_, {}, std::int64_t(n)}));
  }
  std::size_t size() const {
    if (kind() != Kind::Array && kind() != Kind::Object) expect(Kind::Array);
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
    out.resize(tok().b);
    std::size_t n = 0;
    for (std::uint32_t i = tok_ + 1; i < tok().a; i = tape_->skip(i), ++n) {
      const Token& t = tape_->tokens[i];
      std::string_view s = t.kind == Kind::Number ? tape_->number_text(t) : std::string_view();
      float v = 0;
      auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
      if (t.kind != Kind::Number || ec != std::errc() || p != s.data() + s.size()) {
        Node element(*tape_, *file_, i, PathLink{&link_, {}, std::int64_t(n)});
        if (t.kind != Kind::Number) element.expect(Kind::Number);
        element.fail("number " + std::string(s) + " is not representable as float32");
      }
      out[n] = v;
    }
  }
  void ints(std::vector<std::int32_t>& out) const {
    out.clear();
    out.reserve(size());
    items([&](std::size_t, const Node& v) { out.push_back(v.integer<std::int32_t>()); });
  }

 private:
  const Token& tok() const { return tape_->tokens[tok_]; }
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
  boost::json::parse_options opt;
  opt.max_depth = 64;
  boost::json::basic_parser<TapeBuilder> parser(opt);
  parser.handler().tape.source = doc->text;
  parser.handler().tape.tokens.reserve(doc->text.size() / 8);
  boost::json::error_code ec;
  std::size_t used = parser.write_some(false, doc->text.data(), doc->text.size(), ec);
  if (ec) {
    std::size_t line = 1, col = 1;
    for (std::size_t i = 0; i < used && i < doc->text.size(); ++i) {
      if (doc->text[i] == '\n') ++line, col = 1;
      else ++col;
    }
    std::string path = parser.handler().path_at_error();
    throw Error(path.empty() ? doc->file : doc->file + ": " + path,
                "invalid JSON at line " + std::to_string(line) + ", column " + std::to_string(col) + ": " +
                    ec.message());
  }
  if (doc->text.size() >= std::numeric_limits<std::uint32_t>::max())
    throw Error(doc->file, "file larger than 4 GiB is not supported");
  doc->tape = std::move(parser.handler().tape);
  doc->tape.source = doc->text;
  return doc;
}

}  // namespace json_detail

// ---- reading the schema -------------------------------------------------------------------------------------
namespace json_detail {

inline int to_int(const Node& n) { return n.integer<int>(); }

inline ExtractionConfig read_extraction(const Node& n) {
  ExtractionConfig e;
  n.at("layers").items([&](std::size_t, const Node& v) {
    int k = to_int(v);
    if (k < 1) v.fail("layers are 1-based block indices, got " + std::to_string(k));
    e.layers.push_back(k);
  });
  n.at("positions").items([&](std::size_t, const Node& v) {
    int p = to_int(v);
    if (p >= 0) v.fail("positions count from the end and are negative, got " + std::to_string(p));
    e.positions.push_back(p);
  });
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
        vec.fail("has " + std::to_string(v.size()) + " values, experiment_metadata.extraction_config." +
                 dim_name + " is " + std::to_string(dim));
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
      entry.at("token_ids").fail("has " + std::to_string(t.token_ids.size()) +
                                 " ids, experiment_metadata.extraction_config.top_k_logprobs is " +
                                 std::to_string(ec.top_k_logprobs));
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
      if (c == '"' || c == '\\') o += '\\', o += char(c);
      else if (c == '\n') o += "\\n";
      else if (c == '\t') o += "\\t";
      else if (c == '\r') o += "\\r";
      else if (c < 0x20) o += "\\u00", o += hex[c >> 4], o += hex[c & 15];
      else o += char(c);
      ++i;
      continue;
    }
    // Length of a valid UTF-8 sequence starting here, or 0 (then the byte becomes U+FFFD).
    std::size_t len = c >= 0xC2 && c <= 0xDF ? 2 : c >= 0xE0 && c <= 0xEF ? 3 : c >= 0xF0 && c <= 0xF4 ? 4 : 0;
    bool ok = len != 0 && i + len <= s.size();
    for (std::size_t k = 1; ok && k < len; ++k) ok = (static_cast<unsigned char>(s[i + k]) & 0xC0) == 0x80;
    if (ok && len >= 3) {
      unsigned char c1 = static_cast<unsigned char>(s[i + 1]);
      if (c == 0xE0 && c1 < 0xA0) ok = false;   // overlong
      if (c == 0xED && c1 >= 0xA0) ok = false;  // surrogate
      if (c == 0xF0 && c1 < 0x90) ok = false;   // overlong
      if (c == 0xF4 && c1 >= 0x90) ok = false;  // above U+10FFFF
    }
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
        if constexpr (std::is_same_v<T, std::monostate>) o += "null";
        else if constexpr (std::is_same_v<T, bool>) o += x ? "true" : "false";
        else if constexpr (std::is_same_v<T, std::int64_t>) put_int(o, x);
        else if constexpr (std::is_same_v<T, double>) put_double(o, x, [&] { return where; });
        else put_string(o, x);
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
