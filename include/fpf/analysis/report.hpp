#pragma once
// Writing analysis results: the text report on stdout (the seed's sections, per layer), and the JSON results file
// (the seed's keys, with string keys throughout: the seed's script crashes on its tuple keys).
#include <cmath>
#include <cstdio>
#include <ostream>
#include <string>
#include <vector>

#include <boost/json.hpp>

#include <fpf/analysis/analysis.hpp>
#include <fpf/compare/policies.hpp>

namespace fpf::analysis {

// One line of the summary table.
struct SummaryRow {
  std::string experiment, variable, signal, layer;
  bool baseline_available = false;
  double baseline = 0;
  bool cross_available = false;
  double detectability_pct = 0;
  std::string status;
  std::optional<double> snr;
  double max_signal = 0;
  std::string snr_class;
  std::optional<bool> reproducible;
};

inline SummaryRow summary_row(const ExperimentAnalysis& a) {
  const LayerAnalysis& h = a.headline();
  SummaryRow r{a.experiment_type, a.variable, experiment::signal_name(a.signal), layer_label(h.layer)};
  r.baseline_available = h.baseline.available();
  r.baseline = h.baseline.mean;
  r.cross_available = h.cross.available;
  r.detectability_pct = h.cross.percentage;
  r.status = a.classification.status;
  r.snr = h.snr;
  r.max_signal = h.max_signal;
  r.snr_class = a.classification.snr_class;
  bool known = true;
  for (const auto& rep : a.reproducibility) known = known && rep.is_exact.has_value();
  if (known) r.reproducible = a.all_exact;
  return r;
}

// ---- formatting helpers ---------------------------------------------------------------------------------------
inline std::string sci(double x) {
  if (std::isinf(x)) return "inf";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2e", x);
  return buf;
}
inline std::string fixed(double x, int digits = 2) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.*f", digits, x);
  return buf;
}
inline std::string pad(std::string s, std::size_t w) {
  if (s.size() < w) s.append(w - s.size(), ' ');
  return s;
}

// ---- text report ----------------------------------------------------------------------------------------------
inline void print_text(std::ostream& o, const ExperimentAnalysis& a) {
  const std::string rule(80, '=');
  o << "\n" << std::string(80, '#') << "\n# ANALYZING: " << a.file << "\n" << std::string(80, '#') << "\n";
  o << "\nExperiment: " << a.experiment_type << "\nVariable: " << a.variable
    << "\nSignal: " << experiment::signal_name(a.signal) << "\nHardware: ";
  for (std::size_t i = 0; i < a.hardware.size(); ++i) o << (i ? ", " : "") << a.hardware[i];
  o << "\nLayers: ";
  for (std::size_t i = 0; i < a.layers.size(); ++i) o << (i ? ", " : "") << layer_label(a.layers[i]);
  o << "\n";

  o << "\n" << rule << "\n1. REPRODUCIBILITY CHECK (bit-exact, all layers)\n" << rule << "\n";
  for (const auto& r : a.reproducibility) {
    o << r.config_id << ": " << r.runs << " reps, " << r.runs_with_signals << " with signals\n";
    for (const auto& p : r.pairs)
      o << "  Rep " << p.rep_a << " vs Rep " << p.rep_b << ": "
        << (p.bit_exact ? "exact" : "DIFFERS (max L2 " + sci(p.max_distance) + ")") << "\n";
    if (r.runner)
      o << "  runner: " << r.runner->reps_compared << " reps "
        << (r.runner->bit_exact ? "bit-identical, signals fnv1a64 " + r.runner->signals_fnv1a64
                                : "DIFFERED: " + r.runner->first_difference)
        << "\n";
    if (!r.is_exact) o << "  not checkable: one rep carries signals and no runner verdict is recorded\n";
  }
  o << (a.all_exact ? "ALL CHECKABLE CONFIGURATIONS ARE DETERMINISTIC\n"
                    : "NON-DETERMINISM DETECTED - INVESTIGATION REQUIRED\n");

  for (const LayerAnalysis& l : a.per_layer) {
    o << "\n"
      << rule << "\n"
      << layer_label(l.layer) << (&l == &a.headline() ? " (headline)" : "") << "\n"
      << rule << "\n";
    o << "2. CROSS-HARDWARE BASELINE\n";
    if (!l.baseline.available()) o << "  no variable value on two hardware types: no baseline\n";
    for (const auto& p : l.baseline.pairs)
      o << "  value " << value_label(p.value_a) << ": " << p.config_a << " vs " << p.config_b << "  max "
        << sci(p.distance.stats.max) << "  mean " << sci(p.distance.stats.mean) << "  median "
        << sci(p.distance.stats.median) << "\n";
    if (l.baseline.available())
      o << "  mean " << sci(l.baseline.mean) << "  std " << sci(l.baseline.std) << "  range [" << sci(l.baseline.min)
        << ", " << sci(l.baseline.max) << "]"
        << (l.baseline.zero() ? "  -- ZERO: the hardware computes identical bits; detectability = distance > 0" : "")
        << "\n";
    o << "3. WITHIN-HARDWARE DETECTABILITY\n";
    for (const auto& w : l.within) {
      o << "  " << w.hardware << " (baseline " << w.baseline_config << ", value " << value_label(w.baseline_value)
        << ")\n";
      for (const auto& c : w.comparisons)
        o << "    " << value_label(c.value_a) << " -> " << value_label(c.value_b) << ": max "
          << sci(c.distance.stats.max) << "  mean " << sci(c.distance.stats.mean) << "\n";
    }
    o << "4. CROSS-HARDWARE DETECTABILITY (criterion " << fixed(kDetectabilityRatio, 1) << "x baseline)\n";
    if (!l.cross.available) o << "  n/a (needs two hardware types and a baseline)\n";
    for (const auto& c : l.cross.comparisons)
      o << "  " << c.hardware_a << "=" << value_label(c.value_a) << " vs " << c.hardware_b << "="
        << value_label(c.value_b) << ": " << sci(c.distance.stats.max) << "  ratio "
        << (c.ratio ? fixed(*c.ratio) + "x" : std::string("- (zero baseline)")) << "  "
        << (c.detectable ? "DETECTABLE" : "not detectable") << "\n";
    if (l.cross.available)
      o << "  Detectable: " << l.cross.detectable_count << "/" << l.cross.total_count << " ("
        << fixed(l.cross.percentage, 1) << "%)\n";
  }
}

inline void print_summary(std::ostream& o, const std::vector<SummaryRow>& rows) {
  o << "\n" << std::string(110, '=') << "\nOVERALL SUMMARY TABLE\n" << std::string(110, '=') << "\n";
  o << pad("Experiment", 22) << pad("Variable", 20) << pad("Layer", 10) << pad("Baseline", 11) << pad("Detectable", 12)
    << pad("Status", 10) << pad("SNR", 9) << pad("SNR class", 16) << "Reproducible\n"
    << std::string(110, '-') << "\n";
  for (const auto& r : rows)
    o << pad(r.experiment, 22) << pad(r.variable, 20) << pad(r.layer, 10)
      << pad(r.baseline_available ? sci(r.baseline) : "-", 11)
      << pad(r.cross_available ? fixed(r.detectability_pct, 1) + "%" : "-", 12) << pad(r.status, 10)
      << pad(r.snr ? fixed(*r.snr) : (r.baseline_available ? "inf" : "-"), 9) << pad(r.snr_class, 16)
      << (r.reproducible ? (*r.reproducible ? "yes" : "NO") : "?") << "\n";
  o << std::string(110, '=') << "\n";
}

// ---- JSON results -----------------------------------------------------------------------------------------------
namespace report_detail {

// JSON has no inf: a distance or ratio that is not finite is written as null.
inline boost::json::value num(double x) {
  if (!std::isfinite(x)) return nullptr;
  return x;
}

inline boost::json::value value_json(const VariableValue& v) {
  return std::visit(
      [](const auto& x) -> boost::json::value {
        using T = std::decay_t<decltype(x)>;
        if constexpr (std::is_same_v<T, std::monostate>)
          return nullptr;
        else if constexpr (std::is_same_v<T, std::string>)
          return boost::json::string(x);
        else
          return x;
      },
      v);
}

inline boost::json::object distance_json(const RunDistance& d) {
  boost::json::array steps;
  for (double x : d.per_step_max) steps.push_back(num(x));
  return {{"max", num(d.stats.max)},         {"mean", num(d.stats.mean)}, {"median", num(d.stats.median)},
          {"std", num(d.stats.std)},         {"count", d.stats.count},    {"bit_exact", d.bit_exact},
          {"per_step_max", std::move(steps)}};
}

inline boost::json::object comparison_json(const Comparison& c) {
  boost::json::object o{{"config_a", c.config_a},
                        {"config_b", c.config_b},
                        {"hardware_a", c.hardware_a},
                        {"hardware_b", c.hardware_b},
                        {"value_a", value_json(c.value_a)},
                        {"value_b", value_json(c.value_b)},
                        {"distance", num(c.distance.stats.max)},
                        {"stats", distance_json(c.distance)}};
  return o;
}

inline boost::json::object layer_json(const LayerAnalysis& l) {
  boost::json::object baseline;
  boost::json::object per_value;
  boost::json::array values, pairs;
  for (const auto& p : l.baseline.pairs) {
    per_value[value_label(p.value_a)] = num(p.distance.stats.max);
    values.push_back(num(p.distance.stats.max));
    pairs.push_back(comparison_json(p));
  }
  if (l.baseline.available()) {
    baseline = {{"per_value", per_value},     {"mean", num(l.baseline.mean)},
                {"std", num(l.baseline.std)}, {"min", num(l.baseline.min)},
                {"max", num(l.baseline.max)}, {"values", values},
                {"zero", l.baseline.zero()},  {"pairs", pairs}};
  }
  boost::json::object within;
  for (const auto& w : l.within) {
    boost::json::object hw;
    boost::json::array comps;
    for (const auto& c : w.comparisons) {
      hw[value_label(c.value_b)] = num(c.distance.stats.max);
      comps.push_back(comparison_json(c));
    }
    within[w.hardware] = hw;
    within[w.hardware + " (detail)"] = {{"baseline_config", w.baseline_config},
                                        {"baseline_value", value_json(w.baseline_value)},
                                        {"comparisons", comps}};
  }
  boost::json::object cross;
  if (l.cross.available || l.baseline.available()) {
    boost::json::object comps;
    for (const auto& c : l.cross.comparisons) {
      boost::json::object e = comparison_json(c);
      e["ratio"] = c.ratio ? num(*c.ratio) : boost::json::value(nullptr);
      e["detectable"] = c.detectable;
      comps[c.hardware_a + "=" + value_label(c.value_a) + " vs " + c.hardware_b + "=" + value_label(c.value_b)] = e;
    }
    cross = {{"comparisons", comps},
             {"detectable_count", l.cross.detectable_count},
             {"total_count", l.cross.total_count},
             {"percentage", l.cross.percentage},
             {"zero_baseline", l.cross.zero_baseline}};
  }
  boost::json::object o{{"baseline", baseline},
                        {"within_hardware", within},
                        {"cross_hardware", cross},
                        {"max_signal", num(l.max_signal)}};
  o["snr"] = l.snr ? num(*l.snr) : boost::json::value(nullptr);
  return o;
}

}  // namespace report_detail

// The report of one experiment: the seed's keys (experiment_type, variable, signal_type, reproducibility, baseline,
// within_hardware, cross_hardware) for the headline layer, and "per_layer" with the same for every layer.
inline boost::json::object report_json(const ExperimentAnalysis& a) {
  using namespace report_detail;
  boost::json::object repro;
  for (const auto& r : a.reproducibility) {
    boost::json::array pairs;
    for (const auto& p : r.pairs)
      pairs.push_back(
          {{"rep_a", p.rep_a}, {"rep_b", p.rep_b}, {"bit_exact", p.bit_exact}, {"max_distance", num(p.max_distance)}});
    boost::json::object e{{"is_exact", r.is_exact ? boost::json::value(*r.is_exact) : boost::json::value(nullptr)},
                          {"max_distance", num(r.max_distance)},
                          {"runs", r.runs},
                          {"runs_with_signals", r.runs_with_signals},
                          {"pairs", pairs}};
    if (r.runner)
      e["runner"] = {{"reps_compared", r.runner->reps_compared},
                     {"bit_exact", r.runner->bit_exact},
                     {"signals_fnv1a64", r.runner->signals_fnv1a64},
                     {"first_difference", r.runner->first_difference}};
    repro[r.config_id] = e;
  }
  boost::json::object head = layer_json(a.headline());
  boost::json::object per_layer;
  for (const auto& l : a.per_layer) per_layer[layer_label(l.layer)] = layer_json(l);
  boost::json::array layers;
  for (int l : a.layers) layers.push_back(boost::json::string(layer_label(l)));
  return {{"file", a.file},
          {"experiment_type", a.experiment_type},
          {"variable", a.variable},
          {"signal_type", experiment::signal_name(a.signal)},
          {"headline_layer", layer_label(a.headline().layer)},
          {"layers", layers},
          {"reproducibility", repro},
          {"all_exact", a.all_exact},
          {"baseline", head["baseline"]},
          {"within_hardware", head["within_hardware"]},
          {"cross_hardware", head["cross_hardware"]},
          {"classification", {{"status", a.classification.status}, {"snr_class", a.classification.snr_class}}},
          {"per_layer", per_layer}};
}

inline boost::json::object summary_json(const std::vector<SummaryRow>& rows) {
  using namespace report_detail;
  boost::json::array arr;
  for (const auto& r : rows) {
    boost::json::object o{{"experiment", r.experiment},
                          {"variable", r.variable},
                          {"signal", r.signal},
                          {"layer", r.layer},
                          {"baseline", r.baseline_available ? num(r.baseline) : boost::json::value(nullptr)},
                          {"detectability_pct", r.detectability_pct},
                          {"status", r.status},
                          {"max_signal", num(r.max_signal)},
                          {"snr_class", r.snr_class}};
    o["snr"] = r.snr ? num(*r.snr) : boost::json::value(nullptr);
    o["reproducible"] = r.reproducible ? boost::json::value(*r.reproducible) : boost::json::value(nullptr);
    arr.push_back(o);
  }
  return {{"experiments", arr}};
}

// Indented JSON text (Boost.JSON's serializer writes one line).
inline void pretty(std::string& out, const boost::json::value& v, int depth = 0) {
  auto nl = [&](int d) {
    out += '\n';
    out.append(std::size_t(2 * d), ' ');
  };
  if (v.is_object()) {
    const auto& o = v.get_object();
    if (o.empty()) return void(out += "{}");
    out += '{';
    bool first = true;
    for (const auto& kv : o) {
      if (!first) out += ',';
      first = false;
      nl(depth + 1);
      out += boost::json::serialize(boost::json::value(kv.key()));
      out += ": ";
      pretty(out, kv.value(), depth + 1);
    }
    nl(depth);
    out += '}';
  } else if (v.is_array()) {
    const auto& a = v.get_array();
    if (a.empty()) return void(out += "[]");
    bool scalars = std::all_of(a.begin(), a.end(), [](const auto& x) { return !x.is_object() && !x.is_array(); });
    out += '[';
    for (std::size_t i = 0; i < a.size(); ++i) {
      if (i) out += scalars ? ", " : ",";
      if (!scalars) nl(depth + 1);
      pretty(out, a[i], depth + 1);
    }
    if (!scalars) nl(depth);
    out += ']';
  } else {
    out += boost::json::serialize(v);
  }
}

inline std::string pretty(const boost::json::value& v) {
  std::string s;
  pretty(s, v);
  s += '\n';
  return s;
}

}  // namespace fpf::analysis
