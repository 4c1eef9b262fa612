// fpf-compare: the seed's compare_experiments analysis (DESIGN.md "Programs").
//   fpf-compare FILE.json [--signal key_vectors|hidden_states|logprobs] [--output F] [--html F]
//   fpf-compare --all --experiment-dir DIR [--signal ...] [--output F] [--html F]
// Prints the report, writes the results JSON (default analysis_results.json) and optionally an HTML page.
// Exit 0; 1 when some configuration's repetitions are not bit-identical; 2 on bad input (the field is named).
#include <filesystem>
#include <future>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include <fpf/analysis/analysis.hpp>
#include <fpf/analysis/html.hpp>
#include <fpf/analysis/report.hpp>
#include <fpf/core/error.hpp>
#include <fpf/experiment/json.hpp>
#include <fpf/experiment/runner.hpp>

namespace fs = std::filesystem;
using namespace fpf;

int main(int argc, char** argv) {
  return run_main("fpf-compare", [&] {
    CLI::App app{"Analyse fpf experiment files: reproducibility, cross-hardware baseline, detectability"};
    std::string file, dir = ".", signal_name = "key_vectors", output = "analysis_results.json", html;
    bool all = false;
    app.add_option("file", file, "Single experiment JSON to analyze");
    app.add_flag("--all", all, "Analyze the seed's eight experiment files in --experiment-dir");
    app.add_option("--experiment-dir", dir, "Directory containing experiment JSONs");
    app.add_option("--signal", signal_name, "Signal type to analyze")
        ->check(CLI::IsMember({"hidden_states", "key_vectors", "logprobs"}));
    app.add_option("--output", output, "Output file for results");
    app.add_option("--html", html, "Also write a self-contained HTML report");
    try {
      app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
      int rc = app.exit(e);
      return rc == 0 ? 0 : int(kExitBadInput);
    }
    if (all == !file.empty()) throw Error("usage", "give one experiment FILE or --all (see --help)");
    experiment::Signal signal = *experiment::parse_signal(signal_name);

    std::vector<std::string> paths;
    if (all) {
      for (const auto& name : analysis::seed_experiment_files()) {
        fs::path p = fs::path(dir) / name;
        if (fs::exists(p))
          paths.push_back(p.string());
        else
          std::cout << "Skipping " << name << " (not found)\n";
      }
      if (paths.empty()) throw Error(dir, "none of the seed's experiment files is here");
    } else {
      paths.push_back(file);
    }

    // Files are independent: read and analyse them in parallel, report in order.
    std::vector<std::future<analysis::ExperimentAnalysis>> jobs;
    for (const auto& p : paths)
      jobs.push_back(std::async(std::launch::async, [p, signal] {
        return analysis::analyze_experiment(experiment::read_experiment(p), signal, p);
      }));
    std::vector<analysis::ExperimentAnalysis> results;
    std::vector<std::string> errors;
    for (std::size_t i = 0; i < jobs.size(); ++i) {
      try {
        results.push_back(jobs[i].get());
        analysis::print_text(std::cout, results.back());
      } catch (const Error& e) {
        if (!all) throw;
        std::cerr << "fpf-compare: error: " << e.what() << "\n";
        errors.push_back(e.what());
      }
    }

    boost::json::value out;
    std::vector<analysis::SummaryRow> rows;
    for (const auto& a : results) rows.push_back(analysis::summary_row(a));
    if (all) {
      analysis::print_summary(std::cout, rows);
      boost::json::array reports;
      for (const auto& a : results) reports.push_back(analysis::report_json(a));
      boost::json::array errs;
      for (const auto& e : errors) errs.push_back(boost::json::string(e));
      out = {{"summary", analysis::summary_json(rows)}, {"detailed_reports", reports}, {"errors", errs}};
    } else {
      out = analysis::report_json(results.at(0));
    }
    experiment::write_file_atomic(output, analysis::pretty(out));
    std::cout << "\nResults saved to: " << output << "\n";
    if (!html.empty()) {
      experiment::write_file_atomic(html, analysis::render_html(results, experiment::utc_timestamp() + " UTC"));
      std::cout << "HTML report saved to: " << html << "\n";
    }

    if (!errors.empty()) return int(kExitBadInput);
    for (const auto& a : results)
      if (!a.all_exact) {
        std::cerr << "fpf-compare: check failed: repetitions of a configuration in " << a.file
                  << " are not bit-identical\n";
        return int(kExitCheckFailed);
      }
    return int(kExitOk);
  });
}
