// fpf-run on bad input: exit code 2 and exactly one line on stderr that names the file and the field/tensor.
// Each case corrupts one thing in a copy of the dense_tied fixture.
#include <doctest/doctest.h>

#include <boost/json.hpp>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include <fpf/io/safetensors.hpp>

#include "reference_signals.hpp"

namespace fs = std::filesystem;

namespace {

std::string slurp(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

void spit(const fs::path& p, const std::string& bytes) { std::ofstream(p, std::ios::binary) << bytes; }

// A fresh copy of the fixture; returns its directory.
fs::path copy_fixture(const std::string& case_name) {
  const fs::path dir = fs::path(FPF_BINARY_DIR) / "test-tmp" / "bad-input" / case_name;
  fs::remove_all(dir);
  fs::create_directories(dir);
  for (const auto& e : fs::directory_iterator(fpf::testing::fixture_dir("dense_tied")))
    fs::copy_file(e.path(), dir / e.path().filename());
  return dir;
}

struct Result {
  int exit_code;
  std::vector<std::string> stderr_lines;
};

Result run_fpf(const fs::path& model) {
  const fs::path err = model / "stderr.txt";
  const std::string cmd = std::string(FPF_BINARY_DIR) + "/bin/fpf-run --model " + model.string() +
                          " --prompt-ids 1,2,3 --steps 2 --reps 1 --out " + (model / "out.json").string() + " 2> " +
                          err.string() + " > /dev/null";
  const int status = std::system(cmd.c_str());
  Result r{WIFEXITED(status) ? WEXITSTATUS(status) : -1, {}};
  std::istringstream in(slurp(err));
  for (std::string line; std::getline(in, line);) r.stderr_lines.push_back(line);
  return r;
}

// Rewrites model.safetensors' header with `edit` applied (data bytes unchanged).
void edit_header(const fs::path& dir, const std::function<void(boost::json::object&)>& edit) {
  const std::string bytes = slurp(dir / "model.safetensors");
  std::uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  boost::json::object header = boost::json::parse(bytes.substr(8, n)).as_object();
  edit(header);
  std::string text = boost::json::serialize(header);
  while ((8 + text.size()) % 8) text += ' ';
  std::uint64_t m = text.size();
  std::string out(8, '\0');
  std::memcpy(out.data(), &m, 8);
  spit(dir / "model.safetensors", out + text + bytes.substr(8 + n));
}

void edit_config(const fs::path& dir, const std::function<void(boost::json::object&)>& edit) {
  boost::json::object cfg = boost::json::parse(slurp(dir / "config.json")).as_object();
  edit(cfg);
  spit(dir / "config.json", boost::json::serialize(cfg));
}

// Rewrites the checkpoint through fpf's writer with the tensor list changed by `edit`.
void edit_tensors(const fs::path& dir, const std::function<void(std::vector<fpf::io::TensorToWrite>&)>& edit) {
  std::vector<fpf::io::TensorToWrite> ts;
  std::string keep;  // the tensors' bytes, copied before the file is replaced
  {
    const auto f = fpf::io::SafetensorsFile::open(dir / "model.safetensors");
    for (const auto& t : f.tensors()) keep.append(reinterpret_cast<const char*>(t.bytes.data()), t.bytes.size());
    std::size_t off = 0;
    for (const auto& t : f.tensors()) {
      ts.push_back({t.name, t.dtype, t.shape,
                    std::span<const std::byte>(reinterpret_cast<const std::byte*>(keep.data()) + off, t.bytes.size())});
      off += t.bytes.size();
    }
  }
  edit(ts);
  fpf::io::write_safetensors(dir / "model.safetensors", ts);
}

void expect_one_line_error(const fs::path& dir, std::initializer_list<std::string> must_contain) {
  const Result r = run_fpf(dir);
  CHECK(r.exit_code == 2);
  REQUIRE(r.stderr_lines.size() == 1);
  INFO("stderr: " << r.stderr_lines[0]);
  for (const std::string& s : must_contain) CHECK(r.stderr_lines[0].find(s) != std::string::npos);
}

}  // namespace

TEST_CASE("fpf-run bad input: the untouched fixture runs") {
  const fs::path dir = copy_fixture("control");
  const Result r = run_fpf(dir);
  CHECK(r.exit_code == 0);
  CHECK(r.stderr_lines.empty());
}

TEST_CASE("fpf-run bad input: truncated safetensors file") {
  const fs::path dir = copy_fixture("truncated");
  spit(dir / "model.safetensors", slurp(dir / "model.safetensors").substr(0, 5));
  expect_one_line_error(dir, {"model.safetensors", "header"});
}

TEST_CASE("fpf-run bad input: safetensors data cut short") {
  const fs::path dir = copy_fixture("cut-data");
  const std::string b = slurp(dir / "model.safetensors");
  spit(dir / "model.safetensors", b.substr(0, b.size() - 100));
  expect_one_line_error(dir, {"model.safetensors", "data_offsets"});
}

TEST_CASE("fpf-run bad input: header length past EOF") {
  const fs::path dir = copy_fixture("header-len");
  std::string b = slurp(dir / "model.safetensors");
  const std::uint64_t huge = b.size() + 1000;
  std::memcpy(b.data(), &huge, 8);
  spit(dir / "model.safetensors", b);
  expect_one_line_error(dir, {"model.safetensors", "header"});
}

TEST_CASE("fpf-run bad input: header is not JSON") {
  const fs::path dir = copy_fixture("header-json");
  std::string b = slurp(dir / "model.safetensors");
  b[8 + 1] = '#';  // right after the opening brace
  spit(dir / "model.safetensors", b);
  expect_one_line_error(dir, {"model.safetensors", "header"});
}

TEST_CASE("fpf-run bad input: data_offsets out of range") {
  const fs::path dir = copy_fixture("offsets-range");
  edit_header(dir, [](boost::json::object& h) {
    auto& offs = h.at("model.norm.weight").as_object().at("data_offsets").as_array();
    offs[1] = offs[1].to_number<std::int64_t>() + 1'000'000;
  });
  expect_one_line_error(dir, {"model.safetensors", "model.norm.weight", "data_offsets"});
}

TEST_CASE("fpf-run bad input: overlapping data_offsets") {
  const fs::path dir = copy_fixture("offsets-overlap");
  edit_header(dir, [](boost::json::object& h) {
    // Point the final norm at the first bytes of the embedding table (same size, overlapping range).
    const auto& emb = h.at("model.embed_tokens.weight").as_object().at("data_offsets").as_array();
    auto& norm = h.at("model.norm.weight").as_object().at("data_offsets").as_array();
    const std::int64_t size = norm[1].to_number<std::int64_t>() - norm[0].to_number<std::int64_t>();
    norm[0] = emb[0].to_number<std::int64_t>();
    norm[1] = emb[0].to_number<std::int64_t>() + size;
  });
  expect_one_line_error(dir, {"model.safetensors", "data_offsets"});
}

TEST_CASE("fpf-run bad input: tensor dtype disagrees with config.json") {
  const fs::path dir = copy_fixture("dtype");
  edit_config(dir, [](boost::json::object& c) { c["dtype"] = "bfloat16"; });
  expect_one_line_error(dir, {"model.safetensors", "dtype", "config.json"});
}

TEST_CASE("fpf-run bad input: tensor shape disagrees with config.json") {
  const fs::path dir = copy_fixture("shape");
  edit_config(dir, [](boost::json::object& c) { c["intermediate_size"] = 100; });
  expect_one_line_error(dir, {"model.safetensors", "mlp.gate_proj.weight", "shape", "config.json"});
}

TEST_CASE("fpf-run bad input: missing tensor") {
  const fs::path dir = copy_fixture("missing");
  edit_tensors(dir, [](auto& ts) { std::erase_if(ts, [](const auto& t) { return t.name == "model.norm.weight"; }); });
  expect_one_line_error(dir, {"missing", "model.norm.weight"});
}

TEST_CASE("fpf-run bad input: unknown tensor name") {
  const fs::path dir = copy_fixture("unknown-tensor");
  static const float extra[4] = {1, 2, 3, 4};
  edit_tensors(dir, [](auto& ts) {
    ts.push_back({"model.layers.0.mlp.mystery.weight", fpf::DType::F32, {4},
                  std::as_bytes(std::span<const float>(extra, 4))});
  });
  expect_one_line_error(dir, {"model.safetensors", "model.layers.0.mlp.mystery.weight", "unknown tensor"});
}

TEST_CASE("fpf-run bad input: unknown model_type") {
  const fs::path dir = copy_fixture("model-type");
  edit_config(dir, [](boost::json::object& c) { c["model_type"] = "llama"; });
  expect_one_line_error(dir, {"config.json", "model_type"});
}

TEST_CASE("fpf-run bad input: malformed config.json") {
  const fs::path dir = copy_fixture("config-json");
  const std::string c = slurp(dir / "config.json");
  spit(dir / "config.json", c.substr(0, c.size() / 2));
  expect_one_line_error(dir, {"config.json"});
}

TEST_CASE("fpf-run bad input: wrong field type in config.json") {
  const fs::path dir = copy_fixture("config-type");
  edit_config(dir, [](boost::json::object& c) { c["num_hidden_layers"] = "four"; });
  expect_one_line_error(dir, {"config.json", "num_hidden_layers"});
}
