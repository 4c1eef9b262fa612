// Experiment files: round trip, bit-exact floats, NaN/Inf policy, atomic writes, and errors that name the field.
#include <doctest/doctest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <random>
#include <string>

#include <fpf/experiment/json.hpp>

#include "fixtures/experiment/synthetic.hpp"

namespace fs = std::filesystem;
using namespace fpf;
using namespace fpf::experiment;

namespace {

ExperimentFile small_file() {
  ExperimentFile f = testing::synthetic_file();
  testing::add_config(f, "A_bs1", "A", std::int64_t(1),
                      [](Signal, int s, int l, int p, int i) { return 0.1f * float(s + l - p + i); });
  f.configurations[0].versions["cuda_version"] = "12.8";
  f.configurations[0].fpf_commit = "abc123";
  f.configurations[0].timing = Timing{3, 2.5, 2.0 / 3.0};
  f.configurations[0].determinism = Determinism{3, true, "0123456789abcdef"};
  f.runs.back().prompt_ids = {1, 2, 3};
  return f;
}

fs::path temp_dir(const std::string& name) {
  fs::path d = fs::path(FPF_BINARY_DIR) / "test-tmp" / name;
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

// Runs f, which must throw fpf::Error; returns its message.
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  FAIL("no fpf::Error thrown");
  return {};
}

// Replaces the first occurrence of `from` in s (which must be there).
std::string replace_once(std::string s, const std::string& from, const std::string& to) {
  auto at = s.find(from);
  REQUIRE(at != std::string::npos);
  return s.replace(at, from.size(), to);
}

}  // namespace

TEST_CASE("experiment json: write -> read -> write is byte-identical, on disk too") {
  ExperimentFile f = small_file();
  std::string text = to_json_text(f);
  ExperimentFile g = parse_experiment(text, "mem.json");
  CHECK(to_json_text(g) == text);
  CHECK(g.configurations[0] == f.configurations[0]);
  CHECK(g.runs[2].decode_steps[1].key_vectors == f.runs[2].decode_steps[1].key_vectors);
  CHECK(g.runs[2].prompt_ids == std::vector<std::int32_t>{1, 2, 3});
  CHECK(g.runs[0].decode_steps.empty());  // only the last rep carries signals

  fs::path dir = temp_dir("roundtrip");
  write_experiment(dir / "a.json", f);
  write_experiment(dir / "b.json", read_experiment(dir / "a.json"));
  CHECK(read_text_file(dir / "a.json") == read_text_file(dir / "b.json"));
  CHECK(read_text_file(dir / "a.json") == text);
}

TEST_CASE("experiment json: the seed's names and nesting") {
  std::string text = to_json_text(small_file());
  for (const char* key :
       {"\"experiment_metadata\"", "\"extraction_config\"", "\"top_k_logprobs\"", "\"configurations\"",
        "\"fixed_params\"", "\"concurrent_streams\"", "\"runs\"", "\"runtime_seconds\"", "\"decode_steps\"",
        "\"hidden_states\"", "\"key_vectors\"", "\"layer_3\"", "\"pos_-2\"", "\"logprobs\"", "\"token_ids\"",
        "\"log_probs\"", "\"cuda_version\": \"12.8\"", "\"variable_value\": 1"})
    CHECK_MESSAGE(text.find(key) != std::string::npos, key);
  // 0.1f * 3 is written as the float's own shortest form, not as a double's 17 digits
  CHECK(text.find("0.3,") != std::string::npos);
  CHECK(text.find("0.30000001") == std::string::npos);
}

TEST_CASE("experiment json: random float32 bit patterns survive bit-exact") {
  std::mt19937 rng(12345);
  std::vector<float> values = {0.0f,
                               -0.0f,
                               std::numeric_limits<float>::denorm_min(),
                               -std::numeric_limits<float>::denorm_min(),
                               std::numeric_limits<float>::min(),
                               std::nextafter(std::numeric_limits<float>::min(), 0.0f),  // largest subnormal
                               std::numeric_limits<float>::max(),
                               -std::numeric_limits<float>::max(),
                               std::numeric_limits<float>::epsilon(),
                               1.0f,
                               0.1f,
                               16777217.0f};
  while (values.size() < 20000) {
    std::uint32_t bits = rng();
    float v = std::bit_cast<float>(bits);
    if (!std::isfinite(v)) continue;
    values.push_back(v);
    // one in four: a subnormal (exponent bits 0)
    if ((bits & 3) == 0) values.push_back(std::bit_cast<float>(bits & 0x807FFFFFu));
  }
  ExperimentFile f = testing::synthetic_file({1}, {-1}, int(values.size()), 1, 1, 1);
  testing::add_config(
      f, "A", "A", std::int64_t(1),
      [&](Signal s, int, int, int, int i) { return s == Signal::hidden_states ? values[std::size_t(i)] : 0.5f; }, 1);
  ExperimentFile g = parse_experiment(to_json_text(f), "random.json");
  const auto& got = g.runs[0].decode_steps[0].hidden_states.at(1).at(-1);
  REQUIRE(got.size() == values.size());
  std::size_t mismatches = 0;
  for (std::size_t i = 0; i < values.size(); ++i)
    mismatches += std::bit_cast<std::uint32_t>(got[i]) != std::bit_cast<std::uint32_t>(values[i]);
  CHECK(mismatches == 0);
  CHECK(std::signbit(got[1]));  // -0.0 kept its sign
}

TEST_CASE("experiment json: NaN and Inf are rejected on write, naming the field") {
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()}) {
    ExperimentFile f = small_file();
    f.runs[2].decode_steps[1].key_vectors[3][-2][1] = bad;
    std::string msg = error_of([&] { to_json_text(f); });
    CHECK(msg.find("runs[2].decode_steps[1].key_vectors.layer_3.pos_-2[1]") != std::string::npos);
    CHECK(msg.find("NaN/Inf") != std::string::npos);
  }
  // and a file holding NaN is not JSON: reading fails like any syntax error
  std::string text = replace_once(to_json_text(small_file()), "\"pos_-2\": [", "\"pos_-2\": [NaN,");
  CHECK(error_of([&] { parse_experiment(text, "nan.json"); }).find("invalid JSON") != std::string::npos);
}

TEST_CASE("experiment json: a failed write leaves the old file and no temporary") {
  fs::path dir = temp_dir("atomic");
  ExperimentFile f = small_file();
  write_experiment(dir / "x.json", f);
  std::string before = read_text_file(dir / "x.json");
  f.runs[2].decode_steps[0].hidden_states[1][-1][0] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_AS(write_experiment(dir / "x.json", f), Error);
  CHECK(read_text_file(dir / "x.json") == before);
  CHECK(std::distance(fs::directory_iterator(dir), fs::directory_iterator()) == 1);
  CHECK_THROWS_AS(write_experiment(dir / "no-such-dir" / "y.json", small_file()), Error);
}

TEST_CASE("experiment json: token text that is not UTF-8 becomes U+FFFD") {
  ExperimentFile f = small_file();
  f.runs[2].decode_steps[0].token_text = "a\xE4\xB8";  // a 3-byte character cut after 2 bytes
  std::string text = to_json_text(f);
  ExperimentFile g = parse_experiment(text, "utf8.json");
  CHECK(g.runs[2].decode_steps[0].token_text == "a\xEF\xBF\xBD\xEF\xBF\xBD");
  CHECK(to_json_text(g) == text);
}

TEST_CASE("experiment json: malformed input names the file and the field") {
  const std::string good = to_json_text(small_file());

  SUBCASE("truncated") {
    std::string cut = good.substr(0, good.find("\"pos_-1\": [", good.find("\"key_vectors\"")) + 14);
    std::string msg = error_of([&] { parse_experiment(cut, "cut.json"); });
    CHECK(msg.find("cut.json: runs[2].decode_steps[0].key_vectors.layer_1.pos_-1") == 0);
    CHECK(msg.find("invalid JSON at line") != std::string::npos);
  }
  SUBCASE("empty file") {
    CHECK(error_of([&] { parse_experiment("", "empty.json"); }).find("empty.json: invalid JSON") == 0);
  }
  SUBCASE("missing field") {
    std::string text = replace_once(good, "\"hidden_dim\": 4,", "");
    CHECK(error_of([&] { parse_experiment(text, "m.json"); }) ==
          "m.json: experiment_metadata.extraction_config.hidden_dim: missing field");
  }
  SUBCASE("missing layer") {
    std::string text = replace_once(good, "\"layer_3\"", "\"layer_1\"");  // layer_1 twice, layer_3 gone
    CHECK(error_of([&] { parse_experiment(text, "l.json"); }) ==
          "l.json: runs[2].decode_steps[0].hidden_states.layer_3: missing field");
  }
  SUBCASE("layer not in the extraction config") {
    std::string text = replace_once(good, "\"hidden_states\": {", "\"hidden_states\": {\"layer_5\": {},");
    CHECK(error_of([&] { parse_experiment(text, "l.json"); }) ==
          "l.json: runs[2].decode_steps[0].hidden_states.layer_5: not in "
          "experiment_metadata.extraction_config.layers");
  }
  SUBCASE("mismatched dims") {
    std::string key_start = good.substr(0, good.find("\"key_vectors\""));
    std::size_t at = good.find("\"pos_-2\": [", key_start.size());
    std::string text = good.substr(0, at) + "\"pos_-2\": [1.5," + good.substr(at + 11);
    CHECK(error_of([&] { parse_experiment(text, "d.json"); }) ==
          "d.json: runs[2].decode_steps[0].key_vectors.layer_1.pos_-2: has 3 values, "
          "experiment_metadata.extraction_config.key_dim is 2");
  }
  SUBCASE("wrong type") {
    std::string text = replace_once(good, "\"rep_id\": 1", "\"rep_id\": \"one\"");
    CHECK(error_of([&] { parse_experiment(text, "t.json"); }) ==
          "t.json: runs[1].rep_id: expected a number, found a string");
  }
  SUBCASE("run of an unknown configuration") {
    std::string text = good;
    std::size_t runs = text.find("\"runs\"");
    text.replace(text.find("\"config_id\": \"A_bs1\"", runs), 20, "\"config_id\": \"Z\"");
    CHECK(error_of([&] { parse_experiment(text, "c.json"); }) ==
          "c.json: runs[0].config_id: \"Z\" is not in configurations");
  }
  SUBCASE("float out of range") {
    std::string text = replace_once(good, "\"log_probs\": [", "\"log_probs\": [1e39,");
    std::string msg = error_of([&] { parse_experiment(text, "r.json"); });
    CHECK(msg.find("r.json: runs[2].decode_steps[0].logprobs.pos_-2.log_probs[0]") == 0);
  }
}

TEST_CASE("experiment json: the scanner accepts exactly RFC 8259 JSON") {
  using json_detail::parse_document;
  auto rejects = [](const std::string& text) {
    try {
      parse_document(text, "s.json");
    } catch (const Error& e) {
      return std::string(e.what()).find("invalid JSON") != std::string::npos;
    }
    return false;
  };
  for (const char* bad :
       {"[01]",      "[.5]",          "[5.]",          "[1.e3]",     "[1e]",           "[-]",    "[inf]", "[nan]",
        "[NaN]",     "[+1]",          "[1,]",          "{\"a\":1,}", "{a:1}",          "[1] x",  "[tru]", "[\"a\nb\"]",
        "[\"\\x\"]", "[\"\\ud800\"]", "[\"\\udc00\"]", "[\"\xff\"]", "[\"\xc0\xaf\"]", "[\"abc", "",      "  "})
    CHECK_MESSAGE(rejects(bad), bad);
  CHECK(rejects(std::string(65, '[') + std::string(65, ']')));  // nesting limit

  auto doc = parse_document("{\"k\\u00e9y\": [\"\\ud83d\\ude00\\n\\\"\", -0, 1.5e-3, 2E+2, true, null]}", "ok.json");
  const auto& strings = doc->tape.strings;
  CHECK(strings[0] == "k\xC3\xA9y");            // é
  CHECK(strings[1] == "\xF0\x9F\x98\x80\n\"");  // U+1F600 from a surrogate pair
  const auto& t = doc->tape.tokens;
  CHECK(std::signbit(t[4].f));
  CHECK(t[5].f == 1.5e-3f);
  CHECK(t[6].f == 200.0f);
  CHECK(t[7].kind == json_detail::Kind::Bool);

  // exactly halfway between two floats: ties to even; just above halfway: up
  auto one = [](const std::string& num) {
    return json_detail::parse_document("[" + num + "]", "h.json")->tape.tokens[1].f;
  };
  CHECK(one("16777217") == 16777216.0f);
  CHECK(one("16777219") == 16777220.0f);
  CHECK(one("16777217.000000001") == 16777218.0f);
  CHECK(one("1.000000059604644775390625") == 1.0f);  // 1 + 2^-24
  CHECK(one("0.30000001") == 0.3f);
  CHECK(one("-0.0") == 0.0f);
  CHECK(std::signbit(one("-0.0")));
}

TEST_CASE("experiment json: long number arrays (packed by the scanner) keep bits and name bad elements") {
  ExperimentFile f = testing::synthetic_file({1}, {-1}, 40, 20, 1, 1);
  testing::add_config(
      f, "A", "A", std::int64_t(1), [](Signal, int, int, int, int i) { return i == 7 ? -0.0f : 0.001f * float(i); }, 1);
  for (int i = 0; i < 30; ++i) f.runs[0].prompt_ids.push_back(1000 + i);
  std::string text = to_json_text(f);
  ExperimentFile g = parse_experiment(text, "long.json");
  CHECK(g.runs[0].prompt_ids == f.runs[0].prompt_ids);
  CHECK(std::signbit(g.runs[0].decode_steps[0].hidden_states.at(1).at(-1)[7]));
  CHECK(to_json_text(g) == text);

  std::string big = replace_once(text, "\"pos_-1\": [0,0.001,", "\"pos_-1\": [0,1e39,");
  CHECK(error_of([&] { parse_experiment(big, "big.json"); }) ==
        "big.json: runs[0].decode_steps[0].hidden_states.layer_1.pos_-1[1]: number 1e39 is not representable as "
        "float32");
  std::string ids = replace_once(text, "\"prompt_ids\": [1000,1001,", "\"prompt_ids\": [1000,1001.5,");
  CHECK(error_of([&] { parse_experiment(ids, "ids.json"); }) ==
        "ids.json: runs[0].prompt_ids[1]: expected an integer, found 1001.5");
  std::string obj = text.substr(0, text.find("\"configurations\": [")) +
                    "\"configurations\": [1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16], \"runs\": []}";
  CHECK(error_of([&] { parse_experiment(obj, "o.json"); }) ==
        "o.json: configurations: expected an array of objects or strings, found an array of numbers");
}

TEST_CASE("experiment json: the scanner's float conversion equals std::from_chars on a million decimals") {
  // Shortest forms of random float bits, plus longer and odd spellings of random doubles (more digits than a
  // float needs, exponents, leading zeros in fractions), each converted by the scanner (fast path or not) and by
  // from_chars directly.
  std::mt19937_64 rng(7);
  std::string text = "[";
  std::vector<std::string> numbers;
  char buf[64];
  while (numbers.size() < 1000000) {
    std::uint64_t r = rng();
    float f = std::bit_cast<float>(std::uint32_t(r));
    if (std::isfinite(f)) numbers.emplace_back(buf, std::to_chars(buf, buf + sizeof buf, f).ptr);
    std::uint64_t r2 = rng();
    double d = std::ldexp(double(r2 >> 11) / double(1ull << 53), int(r2 % 300) - 150) * (r2 & 1024 ? -1 : 1);
    const char* fmt[] = {"%.9g", "%.17g", "%.3e", "%.12f", "%.20e"};
    std::snprintf(buf, sizeof buf, fmt[(r2 >> 20) % 5], d);
    std::string s = buf;
    numbers.push_back(s);
  }
  for (std::size_t i = 0; i < numbers.size(); ++i) text += (i ? "," : "") + numbers[i];
  text += "]";
  auto doc = json_detail::parse_document(text, "many.json");
  const auto& arr = doc->tape.tokens[0];
  REQUIRE(arr.kind == json_detail::Kind::NumArray);
  std::size_t mismatches = 0, out_of_range = 0;
  for (std::size_t i = 0; i < numbers.size(); ++i) {
    const std::string& s = numbers[i];
    float want = 0;
    auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), want);
    if (ec != std::errc()) {
      ++out_of_range;
      continue;
    }
    float got = doc->tape.floats[arr.a + i];
    if (std::bit_cast<std::uint32_t>(got) != std::bit_cast<std::uint32_t>(want)) {
      if (mismatches++ < 5) MESSAGE(s);
    }
  }
  CHECK(mismatches == 0);
  CHECK(out_of_range < numbers.size() / 4);
  CHECK(arr.float_ok == (out_of_range == 0));
}
