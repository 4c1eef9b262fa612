// fpf-compare and fpf-merge as programs: exit codes, error lines naming the field, the results JSON, the HTML page.
// (tests/ctest_report.cmake renders the page in headless Chromium and runs the seed's Python script on our file.)
#include <doctest/doctest.h>

#include <sys/wait.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include <boost/json.hpp>

#include <fpf/experiment/json.hpp>

#include "fixtures/experiment/synthetic.hpp"

namespace fs = std::filesystem;
using namespace fpf;
using namespace fpf::experiment;

namespace {

const fs::path kFixture = fs::path(FPF_SOURCE_DIR) / "tests/fixtures/experiment/two_hardware.json";

fs::path temp_dir(const std::string& name) {
  fs::path d = fs::path(FPF_BINARY_DIR) / "test-tmp" / name;
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

struct Result {
  int rc;
  std::string out, err;
};

// Runs bin/<program> with args (in dir); captures stdout and stderr.
Result run(const std::string& program, const std::string& args, const fs::path& dir) {
  fs::path bin = fs::path(FPF_BINARY_DIR) / "bin" / program;
  std::string cmd = "cd '" + dir.string() + "' && '" + bin.string() + "' " + args + " >stdout.txt 2>stderr.txt";
  int status = std::system(cmd.c_str());
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, read_text_file(dir / "stdout.txt"),
          read_text_file(dir / "stderr.txt")};
}

std::string slurp(const fs::path& p) { return read_text_file(p); }

void write(const fs::path& p, const std::string& text) { std::ofstream(p, std::ios::binary) << text; }

// The committed fixture: the analysis tests' file with hardware names H100 / H200.
ExperimentFile fixture_file() { return testing::two_hardware_file(0.25f, "H100", "H200"); }

}  // namespace

TEST_CASE("report: the committed fixture is what the synthetic builder makes") {
  std::string text = to_json_text(fixture_file());
  if (std::getenv("FPF_REGENERATE_FIXTURES")) write_file_atomic(kFixture, text);
  CHECK_MESSAGE(slurp(kFixture) == text, "regenerate with FPF_REGENERATE_FIXTURES=1 fpf_tests -tc='report: the*'");
}

TEST_CASE("report: fpf-compare FILE prints the analyses and writes string-keyed results") {
  fs::path dir = temp_dir("compare-one");
  Result r = run("fpf-compare", "'" + kFixture.string() + "' --output res.json --html page.html", dir);
  CHECK(r.rc == 0);
  CHECK(r.out.find("1. REPRODUCIBILITY CHECK") != std::string::npos);
  CHECK(r.out.find("4. CROSS-HARDWARE DETECTABILITY") != std::string::npos);
  boost::json::object res = boost::json::parse(slurp(dir / "res.json")).as_object();
  CHECK(res["signal_type"] == "key_vectors");
  CHECK(res["headline_layer"] == "layer_3");
  // baseline 2 * 0.25 at every value; 5 of 6 cross pairs reach 1.5x (see test_analysis.cpp)
  CHECK(res["baseline"].at("mean").as_double() == 0.5);
  CHECK(res["baseline"].at("per_value").at("4").as_double() == 0.5);
  CHECK(res["cross_hardware"].at("detectable_count").as_int64() == 5);
  const auto& pair = res["cross_hardware"].at("comparisons").at("H100=2 vs H200=1").as_object();
  CHECK(pair.at("ratio").as_double() == 1.0);
  CHECK(pair.at("detectable").as_bool() == false);
  CHECK(res["within_hardware"].at("H200").at("4").as_double() == 6.0);
  CHECK(res["per_layer"].as_object().size() == 2);
  CHECK(res["per_layer"].at("layer_1").at("baseline").at("mean").as_double() == 0.5);
  CHECK(res["classification"].at("status") == "Strong");

  std::string html = slurp(dir / "page.html");
  for (const char* chart : {"data-chart=\"per-layer\"", "data-chart=\"per-step\"", "data-chart=\"ratios\""})
    CHECK_MESSAGE(html.find(chart) != std::string::npos, chart);
  CHECK(html.find("<table id=\"summary\">") != std::string::npos);
  CHECK(html.find("src=") == std::string::npos);  // self-contained: nothing loaded from elsewhere
}

TEST_CASE("report: --signal logprobs and hidden_states") {
  fs::path dir = temp_dir("compare-signal");
  CHECK(run("fpf-compare", "'" + kFixture.string() + "' --signal logprobs --output lp.json", dir).rc == 0);
  boost::json::object lp = boost::json::parse(slurp(dir / "lp.json")).as_object();
  CHECK(lp["headline_layer"] == "logprobs");
  CHECK(lp["baseline"].at("mean").as_double() == 0.25);  // element 1 differs by 0.25
  CHECK(run("fpf-compare", "'" + kFixture.string() + "' --signal bogus", dir).rc == 2);
}

TEST_CASE("report: fpf-compare exits 1 when one rep has one flipped bit") {
  fs::path dir = temp_dir("compare-flip");
  ExperimentFile f = testing::two_hardware_file(0.25f, "H100", "H200", /*all_reps_signals=*/true);
  CHECK(run("fpf-compare", "ok.json", dir).rc == 2);  // not there yet
  write_experiment(dir / "ok.json", f);
  CHECK(run("fpf-compare", "ok.json", dir).rc == 0);
  float& v = f.runs[1].decode_steps[1].key_vectors[1][-1][1];  // H100_bs1 rep 1, a 0.0
  v = std::numeric_limits<float>::denorm_min();
  write_experiment(dir / "flip.json", f);
  Result r = run("fpf-compare", "flip.json --output res.json", dir);
  CHECK(r.rc == 1);
  CHECK(r.err.find("not bit-identical") != std::string::npos);
  CHECK(r.out.find("Rep 0 vs Rep 1: DIFFERS") != std::string::npos);
  boost::json::object res = boost::json::parse(slurp(dir / "res.json")).as_object();
  CHECK(res["reproducibility"].at("H100_bs1").at("is_exact").as_bool() == false);
  CHECK(res["reproducibility"].at("H100_bs2").at("is_exact").as_bool() == true);
}

TEST_CASE("report: bad input exits 2 with one line naming file and field") {
  fs::path dir = temp_dir("compare-bad");
  std::string good = slurp(kFixture);
  write(dir / "cut.json", good.substr(0, good.size() / 2));
  write(dir / "missing.json", std::string(good).replace(good.find("\"hardware\": \"H200\","), 19, ""));
  std::string dims = good;
  dims.replace(dims.find("\"pos_-1\": [", dims.find("\"hidden_states\"")), 11, "\"pos_-1\": [9,");
  write(dir / "dims.json", dims);

  Result cut = run("fpf-compare", "cut.json", dir);
  CHECK(cut.rc == 2);
  CHECK(cut.err.find("fpf-compare: error: cut.json: runs[") == 0);
  CHECK(cut.err.find("invalid JSON at line") != std::string::npos);

  Result missing = run("fpf-compare", "missing.json", dir);
  CHECK(missing.rc == 2);
  CHECK(missing.err == "fpf-compare: error: missing.json: configurations[1].hardware: missing field\n");

  Result d = run("fpf-compare", "dims.json", dir);
  CHECK(d.rc == 2);
  CHECK(d.err.find("dims.json: runs[2].decode_steps[0].hidden_states.layer_1.pos_-1: has 5 values, "
                   "experiment_metadata.extraction_config.hidden_dim is 4") != std::string::npos);

  CHECK(run("fpf-compare", "", dir).rc == 2);  // neither FILE nor --all
}

TEST_CASE("report: fpf-compare --all reads the seed's file names and writes the summary") {
  fs::path dir = temp_dir("compare-all");
  fs::copy_file(kFixture, dir / "batch_size_experiment.json");
  ExperimentFile zero = testing::two_hardware_file(0.0f, "H100", "H200");
  zero.experiment_metadata.experiment_type = "compile";
  zero.experiment_metadata.variable_tested = "compile";
  write_experiment(dir / "compile_experiment.json", zero);
  Result r = run("fpf-compare", "--all --experiment-dir . --output all.json --html all.html", dir);
  CHECK(r.rc == 0);
  CHECK(r.out.find("Skipping attention_experiment.json (not found)") != std::string::npos);
  CHECK(r.out.find("OVERALL SUMMARY TABLE") != std::string::npos);
  boost::json::object res = boost::json::parse(slurp(dir / "all.json")).as_object();
  const auto& rows = res["summary"].at("experiments").as_array();
  REQUIRE(rows.size() == 2);
  CHECK(rows[0].at("experiment") == "batch_size");
  CHECK(rows[0].at("status") == "Strong");
  CHECK(rows[0].at("snr").as_double() == 12.0);
  CHECK(rows[1].at("experiment") == "compile");
  CHECK(rows[1].at("baseline").as_double() == 0.0);
  CHECK(rows[1].at("snr").is_null());  // zero baseline: no ratio, classified by distance > 0
  CHECK(rows[1].at("detectability_pct").as_double() == 100.0);
  CHECK(res["detailed_reports"].as_array().size() == 2);
  CHECK(slurp(dir / "all.html").find("baseline is exactly 0") != std::string::npos);

  fs::path empty = temp_dir("compare-none");
  CHECK(run("fpf-compare", "--all --experiment-dir .", empty).rc == 2);
}

TEST_CASE("report: fpf-merge joins runs made on two machines") {
  fs::path dir = temp_dir("merge");
  ExperimentFile all = fixture_file();
  auto only = [&](const std::string& hw) {
    ExperimentFile f;
    f.experiment_metadata = all.experiment_metadata;
    for (const auto& c : all.configurations)
      if (c.hardware == hw) f.configurations.push_back(c);
    for (const auto& r : all.runs)
      if (r.config_id.starts_with(hw)) f.runs.push_back(r);
    return f;
  };
  write_experiment(dir / "h100.json", only("H100"));
  write_experiment(dir / "h200.json", only("H200"));
  Result r = run("fpf-merge", "h100.json h200.json --out merged.json", dir);
  CHECK(r.rc == 0);
  ExperimentFile m = read_experiment(dir / "merged.json");
  CHECK(m.configurations.size() == 6);
  CHECK(m.runs.size() == 18);
  CHECK(m.configurations[3].hardware == "H200");
  // the same file twice is fine (identical copies are kept once)
  CHECK(run("fpf-merge", "h100.json h100.json --out same.json", dir).rc == 0);
  CHECK(read_experiment(dir / "same.json").configurations.size() == 3);

  ExperimentFile other = only("H200");
  other.experiment_metadata.extraction_config.hidden_dim = 8;
  for (auto& run : other.runs)
    for (auto& s : run.decode_steps)
      for (auto& [l, ps] : s.hidden_states)
        for (auto& [p, v] : ps) v.resize(8);
  write_experiment(dir / "other.json", other);
  Result bad = run("fpf-merge", "h100.json other.json --out x.json", dir);
  CHECK(bad.rc == 2);
  CHECK(bad.err ==
        "fpf-merge: error: other.json: experiment_metadata.extraction_config.hidden_dim: is 8, the experiment has 4\n");
  CHECK_FALSE(fs::exists(dir / "x.json"));
}
