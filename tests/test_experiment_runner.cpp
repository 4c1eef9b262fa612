// The runner: repetitions, timing, the bit-exact gate, storage of the last rep, and the nondeterminism report.
#include <doctest/doctest.h>

#include <bit>
#include <cmath>
#include <filesystem>
#include <string>

#include <fpf/experiment/json.hpp>
#include <fpf/experiment/runner.hpp>

namespace fs = std::filesystem;
using namespace fpf;
using namespace fpf::experiment;

namespace {

// A stand-in for the engine: two steps, layers 1 and 2, positions -2/-1; `flip(rep, step)` decides whether the
// rep flips the lowest bit of key_vectors layer_2 pos_-1 element 1 (value 1.0) at that step.
taps::SequenceSignals fake_run(bool flip) {
  taps::SequenceSignals seq;
  seq.prompt_ids = {5, 6, 7};
  seq.prompt_text = "hello";
  for (int s = 0; s < 2; ++s) {
    taps::StepSignals st;
    st.step = s;
    st.token_id = 40 + s;
    st.token_text = "x";
    for (int l : {1, 2})
      for (int p : {-2, -1}) {
        st.hidden_states[l][p] = {0.5f, -0.5f, 0.25f};
        st.key_vectors[l][p] = {2.0f, 1.0f};
      }
    for (int p : {-2, -1}) st.logprobs[p] = {{1, 2}, {-0.1f, -2.0f}};
    seq.steps.push_back(st);
  }
  if (flip) {
    float& v = seq.steps[1].key_vectors[2][-1][1];
    v = std::bit_cast<float>(std::bit_cast<std::uint32_t>(v) ^ 1u);  // 1.0 -> 1 + 2^-23
  }
  return seq;
}

Metadata meta() {
  Metadata m;
  m.experiment_type = "reference";
  m.variable_tested = "none";
  m.model = "tiny";
  m.model_size = "1M";
  m.architecture = "MoE";
  m.sequence_length = 3;
  m.decode_steps = 2;
  m.extraction_config = {{1, 2}, {-2, -1}, 3, 2, 2};
  return m;
}

Configuration config() {
  Configuration c;
  c.config_id = "CPU_ref";
  c.hardware = "CPU";
  c.provider = "local";
  c.backend = "cpu";
  return c;
}

fs::path temp_dir(const std::string& name) {
  fs::path d = fs::path(FPF_BINARY_DIR) / "test-tmp" / name;
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

}  // namespace

TEST_CASE("runner: identical reps keep only the last rep's signals, with timing and the fingerprint") {
  int calls = 0;
  ConfigurationResult r = run_configuration(config(), [&](int) {
    ++calls;
    return fake_run(false);
  });
  CHECK(calls == 3);
  CHECK_FALSE(r.divergence);
  REQUIRE(r.runs.size() == 3);
  CHECK(r.runs[0].decode_steps.empty());
  CHECK(r.runs[1].decode_steps.empty());
  CHECK(r.runs[2].decode_steps.size() == 2);
  CHECK(r.runs[2].rep_id == 2);
  CHECK(r.runs[0].prompt_text == "hello");
  CHECK(r.runs[0].prompt_ids == std::vector<std::int32_t>{5, 6, 7});
  REQUIRE(r.configuration.timing);
  double t0 = r.runs[0].runtime_seconds, t1 = r.runs[1].runtime_seconds, t2 = r.runs[2].runtime_seconds;
  double mean = (t0 + t1 + t2) / 3;
  CHECK(r.configuration.timing->reps == 3);
  CHECK(r.configuration.timing->runtime_seconds_mean == doctest::Approx(mean));
  CHECK(r.configuration.timing->runtime_seconds_variance ==
        doctest::Approx(((t0 - mean) * (t0 - mean) + (t1 - mean) * (t1 - mean) + (t2 - mean) * (t2 - mean)) / 3));
  REQUIRE(r.configuration.determinism);
  CHECK(r.configuration.determinism->bit_exact);
  CHECK(r.configuration.determinism->signals_fnv1a64 == compare::hex64(compare::fingerprint(fake_run(false).steps)));
}

TEST_CASE("runner: one flipped bit in one rep is reported, every rep's data kept, exit-1 exception") {
  fs::path dir = temp_dir("runner-flip");
  fs::path out = dir / "reference_baseline.json";
  auto rep = [](int r) { return fake_run(r == 2); };
  std::string msg;
  try {
    run_experiment(meta(), config(), rep, out, RunOptions{3, false});
  } catch (const CheckFailed& e) {
    msg = e.what();
  }
  CHECK(msg.find("CPU_ref: rep 0 and rep 2 differ at step 1, key_vectors, layer_2, pos_-1, element 1") !=
        std::string::npos);
  // max |diff| is one ulp of 1.0: 2^-23
  CHECK(msg.find("max |diff| 1.1920929e-07") != std::string::npos);
  CHECK_FALSE(fs::exists(out));
  ExperimentFile kept = read_experiment(dir / "reference_baseline.nondeterministic.json");
  REQUIRE(kept.runs.size() == 3);
  for (const Run& r : kept.runs) CHECK(r.decode_steps.size() == 2);
  CHECK(kept.runs[2].decode_steps[1].key_vectors[2][-1][1] == 1.0f + std::ldexp(1.0f, -23));
  CHECK_FALSE(kept.configurations[0].determinism->bit_exact);
}

TEST_CASE("runner: a batch compares every sequence, stores sequence 0") {
  auto rep = [](int r) {
    std::vector<taps::SequenceSignals> batch{fake_run(false), fake_run(r == 1)};
    batch[1].prompt_text = "neighbour";
    return batch;
  };
  ConfigurationResult r = run_configuration(config(), rep, RunOptions{2, false});
  REQUIRE(r.divergence);
  CHECK(r.divergence->sequence == 1);
  CHECK(r.divergence->rep_b == 1);
  CHECK(r.divergence->describe("C").find("in batch sequence 1") != std::string::npos);

  ConfigurationResult ok = run_configuration(
      config(),
      [](int) {
        return std::vector<taps::SequenceSignals>{fake_run(false), fake_run(true)};
      },
      RunOptions{2, false});
  CHECK_FALSE(ok.divergence);
  CHECK(ok.runs[1].prompt_text == "hello");  // sequence 0's prompt
  CHECK(ok.runs[1].decode_steps[1].key_vectors[2][-1][1] == 1.0f);
}

TEST_CASE("runner: run_experiment writes a file that reads back") {
  fs::path dir = temp_dir("runner-ok");
  ExperimentFile f = run_experiment(
      meta(), config(), [](int) { return fake_run(false); }, dir / "r.json", RunOptions{3, false});
  ExperimentFile g = read_experiment(dir / "r.json");
  CHECK(to_json_text(g) == to_json_text(f));
  CHECK(g.experiment_metadata.date_created.size() == 19);  // "YYYY-MM-DD HH:MM:SS"
  CHECK(g.runs.size() == 3);
  CHECK_THROWS_AS(run_configuration(
                      config(), [](int) { return fake_run(false); }, RunOptions{0, false}),
                  Error);
}

TEST_CASE("runner: several configurations, one nondeterministic: write_checked keeps the data and names it") {
  fs::path dir = temp_dir("runner-multi");
  ExperimentFile file;
  file.experiment_metadata = meta();
  for (int bs : {2, 4}) {
    Configuration c = config();
    c.config_id = "CPU_bs" + std::to_string(bs);
    c.variable_value = std::int64_t(bs);
    add_result(file, run_configuration(
                         c, [&](int rep) { return fake_run(bs == 4 && rep == 1); }, RunOptions{3, false}));
  }
  CHECK(file.configurations[1].determinism->first_difference ==
        "CPU_bs4: rep 0 and rep 1 differ at step 1, key_vectors, layer_2, pos_-1, element 1: 1 vs 1.00000012 (max "
        "|diff| 1.1920929e-07 in this vector, 1.1920929e-07 over the run)");
  std::string msg;
  try {
    write_checked(dir / "batch_size_experiment.json", file);
  } catch (const CheckFailed& e) {
    msg = e.what();
  }
  CHECK(msg.find("nondeterminism: CPU_bs4: rep 0 and rep 1 differ at step 1") == 0);
  CHECK_FALSE(fs::exists(dir / "batch_size_experiment.json"));
  ExperimentFile kept = read_experiment(dir / "batch_size_experiment.nondeterministic.json");
  CHECK(kept.configurations[1].determinism->first_difference == file.configurations[1].determinism->first_difference);
  CHECK(kept.runs.size() == 6);
  CHECK(kept.runs[1].decode_steps.empty());      // CPU_bs2 agreed: last rep only
  CHECK(kept.runs[4].decode_steps.size() == 2);  // CPU_bs4 differed: every rep
}
