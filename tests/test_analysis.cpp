// The four analyses on synthetic files whose distances are worked out by hand.
//
// The file (fixtures/experiment/synthetic.hpp, two_hardware_file): signals are 0 everywhere except element 0 of
// key_vectors and hidden_states, which is
//   layer_3 (the headline): (hw_offset + g(value)) * (step + 1)      layer_1: hw_offset * (step + 1)
// with hw_offset A = 0, B = 0.25 and g(1) = 0, g(2) = 0.5, g(4) = 3 (all exact in binary).
// Two steps and two positions give four (step, position) distances per pair: |delta| * 1 twice and |delta| * 2
// twice, so the seed's distance (max) is 2|delta| and the mean is 1.5|delta|.
#include <doctest/doctest.h>

#include <cmath>
#include <map>

#include <fpf/analysis/analysis.hpp>

#include "fixtures/experiment/synthetic.hpp"

using namespace fpf;
using namespace fpf::analysis;
using experiment::ExperimentFile;
using experiment::Signal;

namespace {

using testing::two_hardware_file;
testing::ValueFn signal_for(float hw_offset, std::int64_t value) {
  return testing::two_hardware_signal(hw_offset, value);
}

const Comparison& find_cross(const CrossHardware& x, std::int64_t a, std::int64_t b) {
  for (const auto& c : x.comparisons)
    if (std::get<std::int64_t>(c.value_a) == a && std::get<std::int64_t>(c.value_b) == b) return c;
  FAIL("no such comparison");
  return x.comparisons.front();
}

}  // namespace

TEST_CASE("analysis: compare_runs is the seed's per-(step, position) L2, reduced by max") {
  ExperimentFile f = two_hardware_file();
  // A_bs1 vs A_bs2 at layer_3: delta 0.5 -> distances 0.5, 0.5 (step 0), 1.0, 1.0 (step 1)
  const auto& a = f.runs[2];  // A_bs1, rep 2
  const auto& b = f.runs[8];  // A_bs2, rep 2
  REQUIRE(a.config_id == "A_bs1");
  REQUIRE(b.config_id == "A_bs2");
  RunDistance d = compare_runs(a, b, Signal::key_vectors, 3);
  CHECK(d.stats.count == 4);
  CHECK(d.stats.max == 1.0);
  CHECK(d.stats.mean == 0.75);
  CHECK(d.stats.median == 0.75);
  CHECK(d.stats.std == 0.25);
  CHECK(d.per_step_max == std::vector<double>{0.5, 1.0});
  CHECK_FALSE(d.bit_exact);
  CHECK(compare_runs(a, b, Signal::key_vectors, 1).stats.max == 0.0);
}

TEST_CASE("analysis: baseline, within-hardware, cross-hardware, classification (headline layer_3)") {
  ExperimentAnalysis a = analyze_experiment(two_hardware_file(), Signal::key_vectors, "synthetic.json");
  CHECK(a.layers == std::vector<int>{1, 3});
  CHECK(a.hardware == std::vector<std::string>{"A", "B"});
  const LayerAnalysis& h = a.headline();
  CHECK(h.layer == 3);

  // 2. baseline: every value differs by the hardware offset 0.25 -> 2 * 0.25 = 0.5
  REQUIRE(h.baseline.pairs.size() == 3);
  CHECK(h.baseline.mean == 0.5);
  CHECK(h.baseline.std == 0.0);
  CHECK(h.baseline.min == 0.5);
  CHECK(h.baseline.max == 0.5);
  CHECK_FALSE(h.baseline.zero());

  // 3. within hardware, against the smallest value 1: 1->2 is 2 * 0.5 = 1, 1->4 is 2 * 3 = 6 (on A and on B)
  REQUIRE(h.within.size() == 2);
  for (const auto& w : h.within) {
    CHECK(std::get<std::int64_t>(w.baseline_value) == 1);
    REQUIRE(w.comparisons.size() == 2);
    CHECK(w.comparisons[0].distance.stats.max == 1.0);
    CHECK(w.comparisons[1].distance.stats.max == 6.0);
  }

  // 4. cross hardware, different values: distance 2|g(a) - g(b) - 0.25|, ratio distance / 0.5
  REQUIRE(h.cross.total_count == 6);
  CHECK(find_cross(h.cross, 1, 2).distance.stats.max == 1.5);  // |0 - 0.5 - 0.25| = 0.75
  CHECK(*find_cross(h.cross, 1, 2).ratio == 3.0);
  CHECK(*find_cross(h.cross, 1, 4).ratio == 13.0);  // 3.25 * 2 / 0.5
  CHECK(*find_cross(h.cross, 2, 1).ratio == 1.0);   // 0.25 * 2 / 0.5: below 1.5
  CHECK_FALSE(find_cross(h.cross, 2, 1).detectable);
  CHECK(*find_cross(h.cross, 2, 4).ratio == 11.0);  // 2.75
  CHECK(*find_cross(h.cross, 4, 1).ratio == 11.0);  // 2.75
  CHECK(*find_cross(h.cross, 4, 2).ratio == 9.0);   // 2.25
  CHECK(h.cross.detectable_count == 5);
  CHECK(h.cross.percentage == doctest::Approx(500.0 / 6.0));

  // summary: 83.3% > 75 -> Strong; SNR = max within (6) / baseline (0.5) = 12 > 10 -> Strong
  CHECK(a.classification.status == "Strong");
  CHECK(h.max_signal == 6.0);
  CHECK(*h.snr == 12.0);
  CHECK(a.classification.snr_class == "Strong");

  // layer_1 carries only the hardware offset: baseline 0.5, no within signal, every cross pair at ratio 1
  const LayerAnalysis& l1 = a.per_layer[0];
  CHECK(l1.layer == 1);
  CHECK(l1.baseline.mean == 0.5);
  CHECK(l1.max_signal == 0.0);
  CHECK(l1.cross.detectable_count == 0);
  CHECK(classify(l1).status == "Weak");
  CHECK(classify(l1).snr_class == "Not Detectable");
}

TEST_CASE("analysis: the signal option picks hidden_states and logprobs") {
  ExperimentFile f = two_hardware_file();
  ExperimentAnalysis hs = analyze_experiment(f, Signal::hidden_states, "f");
  CHECK(hs.headline().baseline.mean == 0.5);  // same element-0 construction as key_vectors
  ExperimentAnalysis lp = analyze_experiment(f, Signal::logprobs, "f");
  CHECK(lp.layers == std::vector<int>{0});
  // logprobs differ across hardware by 0.25 * i in element i = 1 only: L2 0.25 at every (step, position)
  CHECK(lp.headline().baseline.mean == 0.25);
  CHECK(lp.headline().max_signal == 0.0);
}

TEST_CASE("analysis: a zero baseline is reported and classified by distance > 0") {
  ExperimentAnalysis a = analyze_experiment(two_hardware_file(0.0f), Signal::key_vectors, "zero.json");
  const LayerAnalysis& h = a.headline();
  CHECK(h.baseline.available());
  CHECK(h.baseline.zero());
  CHECK(h.cross.zero_baseline);
  CHECK_FALSE(h.snr);
  for (const auto& c : h.cross.comparisons) {
    CHECK_FALSE(c.ratio);
    CHECK(c.detectable);  // every value pair has a nonzero distance
  }
  CHECK(h.cross.percentage == 100.0);
  CHECK(a.classification.status == "Strong");
  CHECK(a.classification.snr_class == "Strong");
  // layer_1: zero baseline and zero distances: nothing detectable
  CHECK(a.per_layer[0].cross.detectable_count == 0);
  CHECK(classify(a.per_layer[0]).snr_class == "Not Detectable");
}

TEST_CASE("analysis: one hardware type has no baseline and is n/a, not Weak") {
  ExperimentFile f = testing::synthetic_file();
  for (std::int64_t v : {1, 2}) testing::add_config(f, "A" + std::to_string(v), "A", v, signal_for(0, v));
  ExperimentAnalysis a = analyze_experiment(f, Signal::key_vectors, "one.json");
  CHECK_FALSE(a.headline().baseline.available());
  CHECK_FALSE(a.headline().cross.available);
  CHECK(a.classification.status == "n/a");
  CHECK(a.classification.snr_class == "n/a");
  CHECK(a.headline().within[0].comparisons[0].distance.stats.max == 1.0);
}

TEST_CASE("analysis: reproducibility finds one flipped bit in one rep, in any layer") {
  ExperimentFile f = testing::synthetic_file();
  testing::add_config(f, "A1", "A", std::int64_t(1), signal_for(0, 1), 3, /*all_reps_signals=*/true);
  testing::add_config(f, "A2", "A", std::int64_t(2), signal_for(0, 2), 3, true);
  ExperimentAnalysis clean = analyze_experiment(f, Signal::key_vectors, "f");
  CHECK(clean.all_exact);
  REQUIRE(clean.reproducibility[0].pairs.size() == 3);
  CHECK(*clean.reproducibility[0].is_exact);

  // rep 1 of A1: flip the lowest bit of key_vectors layer_1 pos_-2 element 1 (0.0 -> the smallest subnormal)
  float& v = f.runs[1].decode_steps[0].key_vectors[1][-2][1];
  REQUIRE(v == 0.0f);
  v = std::numeric_limits<float>::denorm_min();
  ExperimentAnalysis a = analyze_experiment(f, Signal::key_vectors, "f");
  CHECK_FALSE(a.all_exact);
  const Reproducibility& r = a.reproducibility[0];
  CHECK(*r.is_exact == false);
  CHECK(r.pairs[0].bit_exact == false);  // rep 0 vs rep 1
  CHECK(r.pairs[1].bit_exact == true);   // rep 0 vs rep 2
  CHECK(r.pairs[2].bit_exact == false);  // rep 1 vs rep 2
  CHECK(r.max_distance == double(std::numeric_limits<float>::denorm_min()));
  CHECK(*a.reproducibility[1].is_exact);
}

TEST_CASE("analysis: the analysed rep is the one carrying signals; the runner's verdict counts") {
  ExperimentFile f = two_hardware_file();
  ExperimentAnalysis a = analyze_experiment(f, Signal::key_vectors, "f");
  // one rep with signals and no verdict recorded: not checkable
  CHECK_FALSE(a.reproducibility[0].is_exact);
  CHECK(a.reproducibility[0].runs == 3);
  CHECK(a.reproducibility[0].runs_with_signals == 1);
  f.configurations[0].determinism = experiment::Determinism{3, true, "00"};
  f.configurations[1].determinism = experiment::Determinism{3, false, ""};
  a = analyze_experiment(f, Signal::key_vectors, "f");
  CHECK(*a.reproducibility[0].is_exact);
  CHECK_FALSE(*a.reproducibility[1].is_exact);
  CHECK_FALSE(a.all_exact);
}

TEST_CASE("analysis: variable values compare like Python's (1 == 1.0) and sort numbers before strings") {
  CHECK(value_equal(std::int64_t(1), 1.0));
  CHECK_FALSE(value_equal(std::int64_t(1), std::string("1")));
  CHECK(value_less(std::int64_t(2), 4.5));
  CHECK(value_less(std::string("awq"), std::string("gptq")));
  CHECK(value_less(false, true));
  CHECK(value_label(2.5) == "2.5");
  CHECK(value_label(std::monostate{}) == "null");
}
