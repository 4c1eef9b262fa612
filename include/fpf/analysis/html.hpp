#pragma once
// A self-contained HTML report (no network, no scripts from elsewhere): the summary table and, per experiment,
// inline SVG charts of the distance per layer, the distance per decode step and the cross-hardware detectability
// ratios against the 1.5x criterion. Distances span many decades, so the y axes are logarithmic; a distance of
// exactly 0 is drawn as a hollow marker on the bottom edge.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include <fpf/analysis/analysis.hpp>
#include <fpf/analysis/report.hpp>

namespace fpf::analysis {

namespace html_detail {

inline std::string esc(const std::string& s) {
  std::string o;
  for (char c : s) {
    switch (c) {
      case '&': o += "&amp;"; break;
      case '<': o += "&lt;"; break;
      case '>': o += "&gt;"; break;
      case '"': o += "&quot;"; break;
      default: o += c;
    }
  }
  return o;
}

inline std::string num(double x, int digits = 1) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.*f", digits, x);
  return buf;
}

inline const char* color(std::size_t i) {
  static const char* palette[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
                                  "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"};
  return palette[i % 10];
}

struct Series {
  std::string name;
  std::vector<double> y;
  bool dashed = false;
};

// Log-scale y range covering the positive values (one decade of margin when all are equal).
struct LogAxis {
  double lo = 1e-8, hi = 1;
  explicit LogAxis(const std::vector<double>& values, double extra = 0) {
    double mn = INFINITY, mx = 0;
    for (double v : values)
      if (v > 0 && std::isfinite(v)) mn = std::min(mn, v), mx = std::max(mx, v);
    if (extra > 0) mn = std::min(mn, extra), mx = std::max(mx, extra);
    if (mx > 0) {
      lo = std::pow(10, std::floor(std::log10(mn)));
      if (lo >= mn) lo /= 10;  // keep the smallest value above the bottom edge (a bar of it stays visible)
      hi = std::pow(10, std::ceil(std::log10(mx)));
      if (hi <= lo) hi = lo * 10;
    }
  }
  double frac(double v) const {  // 0 at the bottom, 1 at the top
    if (!(v > 0)) return 0;
    return std::clamp((std::log10(v) - std::log10(lo)) / (std::log10(hi) - std::log10(lo)), 0.0, 1.0);
  }
};

constexpr double W = 880, H = 320, L = 80, R = 320, T = 36, B = 56;  // size and margins (legend on the right)

inline std::string frame(const std::string& kind, const std::string& title, const std::string& y_label,
                         const LogAxis& ax) {
  std::string s = "<svg class=\"chart\" data-chart=\"" + kind + "\" xmlns=\"http://www.w3.org/2000/svg\" width=\"" +
                  num(W, 0) + "\" height=\"" + num(H, 0) + "\" viewBox=\"0 0 " + num(W, 0) + " " + num(H, 0) +
                  "\" role=\"img\" aria-label=\"" + esc(title) + "\">";
  s += "<title>" + esc(title) + "</title>";
  s += "<text x=\"" + num(L, 0) + "\" y=\"20\" class=\"ct\">" + esc(title) + "</text>";
  // decade grid lines
  for (double d = ax.lo; d <= ax.hi * 1.0001; d *= 10) {
    double y = T + (H - T - B) * (1 - ax.frac(d));
    char lab[32];
    std::snprintf(lab, sizeof lab, "%.0e", d);
    s += "<line x1=\"" + num(L) + "\" x2=\"" + num(W - R) + "\" y1=\"" + num(y) + "\" y2=\"" + num(y) +
         "\" class=\"grid\"/>";
    s +=
        "<text x=\"" + num(L - 6) + "\" y=\"" + num(y + 4) + "\" text-anchor=\"end\" class=\"tick\">" + lab + "</text>";
  }
  s += "<text transform=\"translate(14," + num(T + (H - T - B) / 2) +
       ") rotate(-90)\" text-anchor=\"middle\" "
       "class=\"tick\">" +
       esc(y_label) + "</text>";
  s += "<rect x=\"" + num(L) + "\" y=\"" + num(T) + "\" width=\"" + num(W - L - R) + "\" height=\"" + num(H - T - B) +
       "\" class=\"box\"/>";
  return s;
}

inline std::string legend(const std::vector<std::string>& names) {
  std::string s;
  for (std::size_t i = 0; i < names.size() && i < 14; ++i) {
    double y = T + 8 + 16 * double(i);
    s += "<rect x=\"" + num(W - R + 12) + "\" y=\"" + num(y - 8) + "\" width=\"10\" height=\"10\" fill=\"" + color(i) +
         "\"/>";
    s += "<text x=\"" + num(W - R + 26) + "\" y=\"" + num(y + 1) + "\" class=\"tick\">" + esc(names[i]) + "</text>";
  }
  return s;
}

// One line per series over categorical x labels.
inline std::string line_chart(const std::string& kind, const std::string& title, const std::vector<std::string>& x,
                              const std::vector<Series>& series, const std::string& y_label) {
  std::vector<double> all;
  for (const auto& s : series) all.insert(all.end(), s.y.begin(), s.y.end());
  LogAxis ax(all);
  std::string out = frame(kind, title, y_label, ax);
  double pw = W - L - R, ph = H - T - B;
  auto px = [&](std::size_t i) { return L + (x.size() > 1 ? pw * double(i) / double(x.size() - 1) : pw / 2); };
  auto py = [&](double v) { return T + ph * (1 - ax.frac(v)); };
  std::size_t every = std::max<std::size_t>(1, x.size() / 15);
  for (std::size_t i = 0; i < x.size(); i += every)
    out += "<text x=\"" + num(px(i)) + "\" y=\"" + num(H - B + 16) + "\" text-anchor=\"middle\" class=\"tick\">" +
           esc(x[i]) + "</text>";
  std::vector<std::string> names;
  for (std::size_t k = 0; k < series.size(); ++k) {
    const auto& s = series[k];
    names.push_back(s.name);
    std::string d;
    for (std::size_t i = 0; i < s.y.size() && i < x.size(); ++i)
      d += (i ? " L" : "M") + num(px(i)) + " " + num(py(s.y[i]));
    out += "<path class=\"series\" d=\"" + d + "\" fill=\"none\" stroke=\"" + color(k) + "\" stroke-width=\"2\"" +
           (s.dashed ? " stroke-dasharray=\"6 4\"" : "") + "/>";
    for (std::size_t i = 0; i < s.y.size() && i < x.size(); ++i)
      out += "<circle class=\"mark\" cx=\"" + num(px(i)) + "\" cy=\"" + num(py(s.y[i])) + "\" r=\"3\" " +
             (s.y[i] > 0 ? std::string("fill=\"") + color(k) + "\""
                         : std::string("fill=\"white\" stroke=\"") + color(k) + "\"") +
             "><title>" + esc(s.name + " @ " + x[i] + ": " + sci(s.y[i])) + "</title></circle>";
  }
  return out + legend(names) + "</svg>";
}

// Bars with a horizontal threshold line.
inline std::string bar_chart(const std::string& kind, const std::string& title, const std::vector<std::string>& labels,
                             const std::vector<double>& values, double threshold, const std::string& y_label) {
  LogAxis ax(values, threshold);
  std::string out = frame(kind, title, y_label, ax);
  double pw = W - L - R, ph = H - T - B;
  double slot = values.empty() ? pw : pw / double(values.size());
  std::vector<std::string> names;
  for (std::size_t i = 0; i < values.size(); ++i) {
    double top = T + ph * (1 - ax.frac(values[i]));
    bool pass = values[i] >= threshold;
    out += "<rect class=\"bar\" x=\"" + num(L + slot * double(i) + slot * 0.15) + "\" y=\"" + num(top) + "\" width=\"" +
           num(slot * 0.7) + "\" height=\"" + num(std::max(1.0, T + ph - top)) + "\" fill=\"" +
           (pass ? "#2ca02c" : "#d62728") + "\"><title>" + esc(labels[i] + ": " + fixed(values[i]) + "x") +
           "</title></rect>";
    if (values.size() <= 12)
      out += "<text x=\"" + num(L + slot * (double(i) + 0.5)) + "\" y=\"" + num(H - B + 16) +
             "\" text-anchor=\"middle\" class=\"tick\">" + std::to_string(i + 1) + "</text>";
    names.push_back(std::to_string(i + 1) + ": " + labels[i]);
  }
  double ty = T + ph * (1 - ax.frac(threshold));
  out += "<line class=\"threshold\" x1=\"" + num(L) + "\" x2=\"" + num(W - R) + "\" y1=\"" + num(ty) + "\" y2=\"" +
         num(ty) + "\" stroke=\"black\" stroke-dasharray=\"4 3\"/>";
  out += "<text x=\"" + num(W - R - 4) + "\" y=\"" + num(ty - 4) + "\" text-anchor=\"end\" class=\"tick\">" +
         fixed(threshold, 1) + "x</text>";
  std::string leg;
  for (std::size_t i = 0; i < names.size() && i < 14; ++i)
    leg += "<text x=\"" + num(W - R + 12) + "\" y=\"" + num(T + 9 + 16 * double(i)) + "\" class=\"tick\">" +
           esc(names[i]) + "</text>";
  return out + leg + "</svg>";
}

inline std::string comparison_name(const Comparison& c) {
  if (c.hardware_a == c.hardware_b)
    return c.hardware_a + ": " + value_label(c.value_a) + "\u2192" + value_label(c.value_b);
  return c.hardware_a + "=" + value_label(c.value_a) + " vs " + c.hardware_b + "=" + value_label(c.value_b);
}

inline std::string experiment_section(const ExperimentAnalysis& a) {
  std::string s = "<section class=\"experiment\"><h2>" + esc(a.experiment_type) + " <small>(" + esc(a.file) +
                  ", signal " + experiment::signal_name(a.signal) + ")</small></h2>";
  // reproducibility
  s += "<table><tr><th>configuration</th><th>reps</th><th>with signals</th><th>bit-exact</th><th>runner</th></tr>";
  for (const auto& r : a.reproducibility) {
    std::string exact = r.is_exact ? (*r.is_exact ? "yes" : "NO (max L2 " + sci(r.max_distance) + ")") : "?";
    std::string runner = r.runner ? (r.runner->bit_exact ? "identical, fnv1a64 " + r.runner->signals_fnv1a64
                                                         : "DIFFERED: " + r.runner->first_difference)
                                  : "-";
    s += "<tr><td>" + esc(r.config_id) + "</td><td>" + std::to_string(r.runs) + "</td><td>" +
         std::to_string(r.runs_with_signals) + "</td><td class=\"" + (r.is_exact == false ? "bad" : "") + "\">" +
         esc(exact) + "</td><td>" + esc(runner) + "</td></tr>";
  }
  s += "</table>";
  const LayerAnalysis& h = a.headline();
  if (h.baseline.zero())
    s += "<p class=\"note\">The cross-hardware baseline is exactly 0 at " + layer_label(h.layer) +
         ": the hardware types compute identical bits. Any nonzero distance counts as detectable.</p>";
  if (!h.baseline.available())
    s += "<p class=\"note\">No variable value was run on two hardware types: no baseline, no cross-hardware "
         "detectability.</p>";

  // distance per layer: baseline mean and each within-hardware comparison (seed's max distance)
  std::vector<std::string> xl;
  for (int l : a.layers) xl.push_back(layer_label(l));
  std::vector<Series> per_layer;
  if (h.baseline.available()) {
    Series b{"baseline mean", {}, true};
    for (const auto& l : a.per_layer) b.y.push_back(l.baseline.mean);
    per_layer.push_back(b);
  }
  for (std::size_t wi = 0; wi < h.within.size(); ++wi)
    for (std::size_t ci = 0; ci < h.within[wi].comparisons.size(); ++ci) {
      Series sr{comparison_name(h.within[wi].comparisons[ci]), {}};
      for (const auto& l : a.per_layer)
        sr.y.push_back(wi < l.within.size() && ci < l.within[wi].comparisons.size()
                           ? l.within[wi].comparisons[ci].distance.stats.max
                           : 0);
      per_layer.push_back(sr);
    }
  if (!per_layer.empty())
    s += line_chart("per-layer", "Distance per layer (max L2 over steps and positions)", xl, per_layer, "L2 distance");

  // distance per step at the headline layer
  std::vector<Series> per_step;
  std::size_t steps = 0;
  for (const auto& p : h.baseline.pairs) {
    per_step.push_back({"baseline " + comparison_name(p), p.distance.per_step_max, true});
    steps = std::max(steps, p.distance.per_step_max.size());
  }
  for (const auto& w : h.within)
    for (const auto& c : w.comparisons) {
      per_step.push_back({comparison_name(c), c.distance.per_step_max});
      steps = std::max(steps, c.distance.per_step_max.size());
    }
  std::vector<std::string> xs;
  for (std::size_t i = 0; i < steps; ++i) xs.push_back(std::to_string(i));
  if (!per_step.empty())
    s += line_chart("per-step", "Distance per decode step, " + layer_label(h.layer) + " (max over positions)", xs,
                    per_step, "L2 distance");

  // detectability ratios
  if (h.cross.available && !h.cross.zero_baseline) {
    std::vector<std::string> labels;
    std::vector<double> ratios;
    for (const auto& c : h.cross.comparisons) labels.push_back(comparison_name(c)), ratios.push_back(*c.ratio);
    s += bar_chart("ratios", "Cross-hardware detectability, " + layer_label(h.layer) + ": distance / baseline mean",
                   labels, ratios, kDetectabilityRatio, "ratio");
  } else if (h.cross.available) {
    std::vector<Series> d;
    Series sr{"distance (baseline 0)", {}};
    std::vector<std::string> labels;
    for (const auto& c : h.cross.comparisons)
      labels.push_back(comparison_name(c)), sr.y.push_back(c.distance.stats.max);
    d.push_back(sr);
    s += line_chart("ratios", "Cross-hardware distances, " + layer_label(h.layer) + " (baseline is 0)", labels, d,
                    "L2 distance");
  }
  return s + "</section>";
}

}  // namespace html_detail

// The whole page. After layout, a small inline script counts the charts whose marks have a nonzero size and
// writes the count to <body data-rendered-charts>, which the headless-browser test reads back.
inline std::string render_html(const std::vector<ExperimentAnalysis>& analyses, const std::string& generated) {
  using namespace html_detail;
  std::vector<SummaryRow> rows;
  for (const auto& a : analyses) rows.push_back(summary_row(a));
  std::string s =
      "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>fpf analysis</title><style>"
      "body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1100px}"
      "table{border-collapse:collapse;margin:12px 0}td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}"
      "th{background:#f3f3f3}.Strong{background:#d4f4d4}.Moderate{background:#fff3c4}.Weak{background:#f9d6d6}"
      ".bad{color:#b00;font-weight:bold}.note{background:#eef5ff;padding:6px 10px;border-left:3px solid #1f77b4}"
      "svg.chart{display:block;margin:12px 0}.ct{font-size:14px;font-weight:600}.tick{font-size:11px;fill:#444}"
      ".grid{stroke:#e5e5e5}.box{fill:none;stroke:#999}small{font-weight:normal;color:#666}"
      "</style></head><body>\n<h1>fpf: floating-point forensics analysis</h1>\n<p>Generated " +
      esc(generated) +
      ". Distances are the seed's: L2 per (decode step, position), reduced by max. Detectable: cross-hardware "
      "distance &ge; 1.5&times; the cross-hardware baseline mean.</p>\n<h2>Summary</h2>\n<table id=\"summary\"><tr>"
      "<th>experiment</th><th>variable</th><th>signal</th><th>layer</th><th>baseline</th><th>detectable</th>"
      "<th>status</th><th>SNR</th><th>SNR class</th><th>reproducible</th></tr>";
  for (const auto& r : rows)
    s += "<tr><td>" + esc(r.experiment) + "</td><td>" + esc(r.variable) + "</td><td>" + esc(r.signal) + "</td><td>" +
         esc(r.layer) + "</td><td>" + (r.baseline_available ? sci(r.baseline) : "-") + "</td><td>" +
         (r.cross_available ? fixed(r.detectability_pct, 1) + "%" : "-") + "</td><td class=\"" + esc(r.status) + "\">" +
         esc(r.status) + "</td><td>" +
         (r.snr                  ? fixed(*r.snr)
          : r.baseline_available ? "inf"
                                 : "-") +
         "</td><td class=\"" + esc(r.snr_class) + "\">" + esc(r.snr_class) + "</td><td class=\"" +
         (r.reproducible == false ? "bad" : "") + "\">" + (r.reproducible ? (*r.reproducible ? "yes" : "NO") : "?") +
         "</td></tr>";
  s += "</table>\n";
  for (const auto& a : analyses) s += experiment_section(a) + "\n";
  s += "<script>window.addEventListener('load',function(){var n=0;document.querySelectorAll('svg.chart')"
       ".forEach(function(c){var m=c.querySelectorAll('path.series,rect.bar,circle.mark');var ok=false;"
       "m.forEach(function(e){var b=e.getBBox();if(b.width>0||b.height>0)ok=true;});if(ok)n++;});"
       "document.body.setAttribute('data-rendered-charts',String(n));});</script>\n</body></html>\n";
  return s;
}

}  // namespace fpf::analysis
