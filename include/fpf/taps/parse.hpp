#pragma once
// Parsing of the tap lists programs take on the command line: --layers 1,2,4,12,last  --positions -3,-2,-1
#include <algorithm>
#include <charconv>
#include <string>
#include <string_view>
#include <vector>

#include <fpf/core/error.hpp>

namespace fpf::taps {

// Comma-separated integers; `last` (when last > 0) stands for the given value. Errors name `flag`.
inline std::vector<int> parse_int_list(std::string_view text, std::string_view flag, int last = 0) {
  std::vector<int> out;
  std::size_t start = 0;
  while (start <= text.size()) {
    const std::size_t end = std::min(text.find(',', start), text.size());
    const std::string_view item = text.substr(start, end - start);
    int v = 0;
    if (last > 0 && item == "last") {
      v = last;
    } else {
      auto [p, ec] = std::from_chars(item.data(), item.data() + item.size(), v);
      if (item.empty() || ec != std::errc{} || p != item.data() + item.size())
        throw Error(std::string(flag), "'" + std::string(item) + "' is not an integer" + (last > 0 ? " or 'last'" : ""));
    }
    out.push_back(v);
    start = end + 1;
  }
  return out;
}

// Layers: 1-based blocks, "last" = num_layers; sorted, duplicates removed ("12,last" on a 12-layer model is one).
inline std::vector<int> parse_layers(std::string_view text, int num_layers) {
  std::vector<int> v = parse_int_list(text, "--layers", num_layers);
  std::sort(v.begin(), v.end());
  v.erase(std::unique(v.begin(), v.end()), v.end());
  return v;
}

// The seed's layer list (1, 2, 4, 12, last) cut to the layers the model has: the default for every program.
inline std::vector<int> default_layers(int num_layers) {
  std::vector<int> v;
  for (int l : {1, 2, 4, 12, num_layers})
    if (l <= num_layers && (v.empty() || v.back() < l)) v.push_back(l);
  return v;
}

}  // namespace fpf::taps
