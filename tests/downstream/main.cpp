// Runs two greedy steps on a checkpoint with the installed headers and prints the tokens.
#include <cstdio>

#include <fpf/fpf.hpp>

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  return fpf::run_main("downstream", [&] {
    using S = fpf::Setup<fpf::quant::Dense, fpf::attn::Eager, fpf::par::Single, fpf::cpu::Backend>;
    fpf::Engine<S> engine(argv[1]);
    fpf::taps::TapSpec spec{{1}, {-1}, 3};
    const auto out = engine.generate({{1, 2, 3}}, 2, spec);
    std::printf("tokens %d %d\n", out[0].steps[0].token_id, out[0].steps[1].token_id);
    return 0;
  });
}
