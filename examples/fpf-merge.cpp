// fpf-merge: merges experiment files made on different machines into one, so the cross-hardware analyses of
// fpf-compare see every hardware type.
//   fpf-merge A.json B.json [C.json ...] --out merged.json
// The files must be the same experiment (type, variable, model, extraction config); a config_id in two files must
// carry identical data. Exit 2 on bad input, naming the file and field.
#include <iostream>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include <fpf/core/error.hpp>
#include <fpf/experiment/fuse.hpp>
#include <fpf/experiment/json.hpp>

using namespace fpf;

int main(int argc, char** argv) {
  return run_main("fpf-merge", [&] {
    CLI::App app{"Merge experiment files (e.g. the same experiment run on H100 and H200) into one"};
    std::vector<std::string> inputs;
    std::string out;
    app.add_option("files", inputs, "Experiment files to merge")->required()->expected(2, -1);
    app.add_option("--out", out, "Merged experiment file")->required();
    try {
      app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
      int rc = app.exit(e);
      return rc == 0 ? 0 : int(kExitBadInput);
    }
    std::vector<experiment::ExperimentFile> files;
    for (const auto& p : inputs) files.push_back(experiment::read_experiment(p));
    experiment::ExperimentFile merged = experiment::merge(files, inputs);
    experiment::write_experiment(out, merged);
    std::cout << "merged " << inputs.size() << " files: " << merged.configurations.size() << " configurations, "
              << merged.runs.size() << " runs -> " << out << "\n";
    return int(kExitOk);
  });
}
