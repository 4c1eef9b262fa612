// The 4-bit kernels (backend/cuda/qlinear.cuh) and the quantized CUDA engine.
//  - ops: random packed weights of every kind (Affine with and without act-order permutation, NF4 rounded to bf16,
//    fp16 or not at all), wide and narrow paths, 1..8 rows and MoE slots, against a CPU product in double on the
//    CPU-dequantized fp32 weights (quant::dequantize): fp32 within 1e-5, bf16/fp16 within the unit roundoff of T (the
//    output's rounding); the prefill dequantize kernel bit-identical to quant::dequantize rounded to T.
//  - engine: each quantized fixture in fp32 mode against Hugging Face fp32 on the dequantized weights
//    (reference.json, within 1e-4, tokens and top-10 ids identical) and against the CPU engine of the same policy;
//    repetitions bit-identical; bf16 runs with tokens equal to the CPU's at the first step.
#include <doctest/doctest.h>

#include <random>

#include <fpf/backend/cuda/backend.cuh>
#include <fpf/backend/cuda/qlinear.cuh>
#include <fpf/fpf.hpp>
#include <fpf/quant/awq.hpp>
#include <fpf/quant/gptq.hpp>
#include <fpf/quant/nf4.hpp>

#include "../reference_signals.hpp"
#include "cuda_test_util.cuh"

using namespace fpf;
using namespace fpf::cuda::testing;

namespace {

struct Kind {
  const char* name;
  quant::Packed4::Code code;
  DType nf4_dtype;
  bool perm;
};

quant::Packed4 random_packed(const Kind& kind, int N, int K, int G, std::uint32_t seed) {
  std::mt19937 g(seed);
  quant::Packed4 p;
  p.code = kind.code;
  p.nf4_dtype = kind.nf4_dtype;
  p.N = N, p.K = K, p.G = G;
  p.words.resize(static_cast<std::size_t>(N) * K / 8);
  for (auto& w : p.words) w = static_cast<std::uint32_t>(g());
  p.scales.resize(static_cast<std::size_t>(p.scale_count()));
  std::normal_distribution<float> sd(0.0f, 0.05f);
  for (auto& s : p.scales) s = sd(g);  // negative scales too
  if (kind.code == quant::Packed4::Code::Affine) {
    p.zeros.resize(p.scales.size());
    for (auto& z : p.zeros) z = static_cast<std::uint8_t>(g() % 17);  // 16: GPTQ v1's stored 0xF
  }
  if (kind.perm) {
    p.perm.resize(static_cast<std::size_t>(K));
    for (int k = 0; k < K; ++k) p.perm[static_cast<std::size_t>(k)] = k;
    std::shuffle(p.perm.begin(), p.perm.end(), g);
  }
  return p;
}

template <class T>
void check_kind(const Kind& kind, int N, int K, int G, std::uint32_t seed) {
  CAPTURE(kind.name);
  CAPTURE(N);
  CAPTURE(K);
  CAPTURE(G);
  constexpr int E = 3;
  std::vector<quant::Packed4> mats;
  std::vector<std::vector<float>> w, wt;  // per matrix [N, K]: the fp32 weights, and rounded to T
  for (int e = 0; e < E; ++e) {
    mats.push_back(random_packed(kind, N, K, G, seed + static_cast<std::uint32_t>(e)));
    w.push_back(quant::dequantize(mats.back()));
    wt.push_back(w.back());
    round_to<T>(wt.back());
  }
  cuda::q::Weight dw;
  cuda::PinnedUploader up;
  dw.upload(mats, up);

  // Prefill dequantization: bit-identical to the CPU's values rounded to T.
  for (int e = 0; e < E; ++e) {
    cuda::DeviceBuffer<T> out(static_cast<std::size_t>(N) * K);
    dw.dequantize<T>(e, out.get(), K);
    const std::vector<float> got = to_host(out, static_cast<std::size_t>(N) * K);
    const std::size_t differ = fpf::testing::bit_differences(got, wt[static_cast<std::size_t>(e)]);
    CHECK(differ == 0);
  }

  // Decode GEMV, 1..8 rows, matrix 0.
  for (int M : {1, 2, 3, 5, 8}) {
    CAPTURE(M);
    std::vector<float> x = randn(static_cast<std::size_t>(M) * K, seed + 100 + static_cast<std::uint32_t>(M));
    const auto xd = to_device(round_to<T>(x));
    cuda::DeviceBuffer<T> y(static_cast<std::size_t>(M) * N);
    dw.gemv<T>(xd.get(), M, K, y.get(), N);
    const std::vector<float> got = to_host(y, static_cast<std::size_t>(M) * N);
    std::vector<float> want(static_cast<std::size_t>(M) * N);
    for (int m = 0; m < M; ++m)
      for (int n = 0; n < N; ++n) {
        double acc = 0;
        for (int k = 0; k < K; ++k) acc += static_cast<double>(x[static_cast<std::size_t>(m) * K + k]) * w[0][static_cast<std::size_t>(n) * K + k];
        want[static_cast<std::size_t>(m) * N + n] = static_cast<float>(acc);
      }
    CHECK(rel_l2(got, want) <= tolerance<T>());
  }

  // MoE slots: 4 slots over 2 rows (x_div 2), experts 2, 0, 1, 2.
  {
    const std::vector<std::int32_t> ids{2, 0, 1, 2};
    std::vector<float> x = randn(static_cast<std::size_t>(2) * K, seed + 200);
    const auto xd = to_device(round_to<T>(x));
    const auto idd = to_device(ids);
    cuda::DeviceBuffer<T> y(static_cast<std::size_t>(4) * N);
    dw.moe_gemv<T>(xd.get(), K, 2, idd.get(), 4, y.get(), N);
    const std::vector<float> got = to_host(y, static_cast<std::size_t>(4) * N);
    // gate_up with the SwiGLU fused (rows n and N/2 + n): bit-identical to moe_gemv then ops::swiglu, where it applies.
    if (N % 2 == 0) {
      cuda::DeviceBuffer<T> a(static_cast<std::size_t>(4) * N / 2), b(static_cast<std::size_t>(4) * N / 2);
      cuda::ops::swiglu<T>(y.get(), a.get(), 4, N / 2);
      const bool fused = dw.moe_gemv_swiglu<T>(xd.get(), K, 2, idd.get(), 4, b.get(), N / 2);
      CHECK(fused == (K % 32 == 0 && G % 32 == 0 && !kind.perm));
      if (fused) CHECK(fpf::testing::bit_differences(to_host(b, a.size()), to_host(a, a.size())) == 0);
    }
    // down with the combine: 2 tokens of 2 slots (activation row p for slot p), bit-identical to moe_gemv then
    // ops::moe_combine into the residual, where it applies.
    {
      std::vector<float> x4 = randn(static_cast<std::size_t>(4) * K, seed + 300), res = randn(static_cast<std::size_t>(2) * N, seed + 301);
      const std::vector<float> wts{0.75f, 0.25f, -0.5f, 1.5f};
      const auto x4d = to_device(round_to<T>(x4));
      const auto wd = to_device(wts);
      auto ra = to_device(round_to<T>(res)), rb = to_device(round_to<T>(res));
      cuda::DeviceBuffer<T> ye(static_cast<std::size_t>(4) * N);
      dw.moe_gemv<T>(x4d.get(), K, 1, idd.get(), 4, ye.get(), N);
      cuda::ops::moe_combine<T>(ra.get(), ye.get(), nullptr, wd.get(), 2, 2, N);
      const bool fused = dw.moe_gemv_combine<T>(x4d.get(), K, idd.get(), wd.get(), 2, 2, rb.get(), N);
      CHECK(fused == (K % 32 == 0 && G % 32 == 0 && !kind.perm));
      if (fused) CHECK(fpf::testing::bit_differences(to_host(rb, res.size()), to_host(ra, res.size())) == 0);
    }
    std::vector<float> want(static_cast<std::size_t>(4) * N);
    for (int p = 0; p < 4; ++p)
      for (int n = 0; n < N; ++n) {
        double acc = 0;
        for (int k = 0; k < K; ++k)
          acc += static_cast<double>(x[static_cast<std::size_t>(p / 2) * K + k]) * w[static_cast<std::size_t>(ids[static_cast<std::size_t>(p)])][static_cast<std::size_t>(n) * K + k];
        want[static_cast<std::size_t>(p) * N + n] = static_cast<float>(acc);
      }
    CHECK(rel_l2(got, want) <= tolerance<T>());
  }
}

template <class T>
void all_kinds() {
  const Kind kinds[] = {{"affine", quant::Packed4::Code::Affine, DType::F32, false},
                        {"affine act-order", quant::Packed4::Code::Affine, DType::F32, true},
                        {"nf4 bf16", quant::Packed4::Code::Nf4, DType::BF16, false},
                        {"nf4 fp16", quant::Packed4::Code::Nf4, DType::F16, false},
                        {"nf4 fp32", quant::Packed4::Code::Nf4, DType::F32, false}};
  std::uint32_t seed = 7;
  for (const Kind& k : kinds) {
    if (k.perm) {
      check_kind<T>(k, 40, 96, 32, seed += 10);
      check_kind<T>(k, 24, 48, 8, seed += 10);
      continue;
    }
    check_kind<T>(k, 72, 256, 128, seed += 10);  // wide path
    check_kind<T>(k, 40, 768, 128, seed += 10);   // the real down's K (bf16/fp16: 6 tensor-core chunks, all in flight)
    check_kind<T>(k, 40, 2048, 128, seed += 10);  // 32 lanes per row, 2 chunks (the real gate_up, q/k/v)
    check_kind<T>(k, 24, 4096, 128, seed += 10);  // 32 lanes per row, 4 chunks (the real o)
    check_kind<T>(k, 40, 96, 32, seed += 10);    // wide, 3 chunks per row
    check_kind<T>(k, 24, 48, 8, seed += 10);     // narrow (groups of 8)
    check_kind<T>(k, 16, 24, 24, seed += 10);    // narrow, one group per row
  }
}

// The decode MoE's add + norm + router in one cluster launch (backend.cuh moe's `fused`): add_rmsnorm_router, then
// the 4-bit gate_up + SwiGLU and down + combine on its ids, against add_rmsnorm, router_gemv and the same products:
// the residual after the add, normalised rows, logits, ids, weights, activations and the layer's output bit for bit,
// for 1, 2 and 8 tokens, with and without the renormalisation, narrow and wide down blocks, clusters of 8, 16 and 15
// blocks (past 8: the non-portable cluster sizes).
template <class T>
void check_fused_router(int E, int k, int H, int I, std::uint32_t seed) {
  CAPTURE(E);
  CAPTURE(k);
  const Kind affine{"affine", quant::Packed4::Code::Affine, DType::F32, false};
  std::vector<quant::Packed4> gu, dn;
  for (int e = 0; e < E; ++e) {
    gu.push_back(random_packed(affine, 2 * I, H, 128, seed + 2 * static_cast<std::uint32_t>(e)));
    dn.push_back(random_packed(affine, H, I, 128, seed + 2 * static_cast<std::uint32_t>(e) + 1));
  }
  cuda::q::Weight wgu, wdn;
  cuda::PinnedUploader up;
  wgu.upload(gu, up);
  wdn.upload(dn, up);
  const auto nw = to_device(randn(static_cast<std::size_t>(H), seed + 500, 0.5f));
  std::vector<float> rwf = randn(static_cast<std::size_t>(E) * H, seed + 501, 0.1f);
  const auto rw = to_device(round_to<T>(rwf));
  cuda::DeviceBuffer<unsigned> counter(1);
  FPF_CUDA(cudaMemset(counter.get(), 0, sizeof(unsigned)));
  for (int M : {1, 2, 8})
    for (int norm : {1, 0}) {
      CAPTURE(M);
      CAPTURE(norm);
      const std::size_t rows = static_cast<std::size_t>(M) * H, P = static_cast<std::size_t>(M) * k;
      std::vector<float> xf = randn(rows, seed + 600 + static_cast<std::uint32_t>(M)),
                         of = randn(rows, seed + 700 + static_cast<std::uint32_t>(M));
      const std::vector<T> x = round_to<T>(xf), o = round_to<T>(of);
      auto xa = to_device(x), xb = to_device(x);
      const auto od = to_device(o);
      cuda::DeviceBuffer<T> ha(rows), hb(rows), la(static_cast<std::size_t>(M) * E), lb(static_cast<std::size_t>(M) * E),
          aa(P * I), ab(P * I);
      cuda::DeviceBuffer<std::int32_t> ia(P), ib(P);
      cuda::DeviceBuffer<float> wa(P), wb(P);
      // apart: add + norm, the router, the products on its ids
      cuda::ops::add_rmsnorm<T>(xa.get(), od.get(), nw.get(), ha.get(), M, H, 1e-6f);
      cuda::ops::router_gemv<T>(ha.get(), M, rw.get(), E, H, la.get(), k, norm != 0, ia.get(), wa.get(), counter.get());
      FPF_CUDA(cudaDeviceSynchronize());
      const std::vector<float> x_plus_o = to_host(xa, rows);
      REQUIRE(wgu.moe_gemv_swiglu<T>(ha.get(), H, k, ia.get(), static_cast<int>(P), aa.get(), I));
      REQUIRE(wdn.moe_gemv_combine<T>(aa.get(), I, ia.get(), wa.get(), M, k, xa.get(), H));
      // add + norm + router in one launch
      REQUIRE(cuda::ops::add_rmsnorm_router_fits<T>(xb.get(), od.get(), rw.get(), M, E, H, k));
      cuda::ops::add_rmsnorm_router<T>(xb.get(), od.get(), nw.get(), hb.get(), M, H, 1e-6f, rw.get(), E, lb.get(), k, norm != 0,
                                       ib.get(), wb.get());
      FPF_CUDA(cudaDeviceSynchronize());
      CHECK(fpf::testing::bit_differences(to_host(xb, rows), x_plus_o) == 0);
      REQUIRE(wgu.moe_gemv_swiglu<T>(hb.get(), H, k, ib.get(), static_cast<int>(P), ab.get(), I));
      REQUIRE(wdn.moe_gemv_combine<T>(ab.get(), I, ib.get(), wb.get(), M, k, xb.get(), H));
      FPF_CUDA(cudaDeviceSynchronize());
      CHECK(fpf::testing::bit_differences(to_host(hb, rows), to_host(ha, rows)) == 0);
      CHECK(fpf::testing::bit_differences(to_host(lb, la.size()), to_host(la, la.size())) == 0);
      CHECK(ib.download(P) == ia.download(P));
      CHECK(fpf::testing::bit_differences(wb.download(P), wa.download(P)) == 0);
      CHECK(fpf::testing::bit_differences(to_host(ab, aa.size()), to_host(aa, aa.size())) == 0);
      const std::vector<float> got = to_host(xb, rows), want = to_host(xa, rows);
      CHECK(fpf::testing::bit_differences(got, want) == 0);
      CHECK(fpf::testing::bit_differences(got, xf) > rows / 2);  // the residual moved: not a vacuous comparison
    }
}

using fpf::testing::bit_identical;

// Max rel L2 of every tapped signal; tokens must agree.
double worst_rel_l2(const taps::SequenceSignals& got, const taps::SequenceSignals& ref) {
  double worst = 0;
  REQUIRE(got.steps.size() == ref.steps.size());
  for (std::size_t s = 0; s < got.steps.size(); ++s) {
    const auto& g = got.steps[s];
    const auto& r = ref.steps[s];
    CAPTURE(s);
    REQUIRE(g.token_id == r.token_id);
    for (const auto& [layer, by_pos] : r.hidden_states)
      for (const auto& [pos, values] : by_pos) {
        worst = std::max(worst, fpf::testing::rel_l2(g.hidden_states.at(layer).at(pos), values));
        worst = std::max(worst, fpf::testing::rel_l2(g.key_vectors.at(layer).at(pos), r.key_vectors.at(layer).at(pos)));
      }
    for (const auto& [pos, topk] : r.logprobs) {
      CHECK(g.logprobs.at(pos).token_ids == topk.token_ids);
      worst = std::max(worst, fpf::testing::rel_l2(g.logprobs.at(pos).log_probs, topk.log_probs));
    }
  }
  return worst;
}

template <class Quant, class Attention>
void quant_fixture(const std::string& name) {
  CAPTURE(name);
  const fpf::testing::Reference ref = fpf::testing::load_reference("../quant/" + name);
  const auto dir = std::filesystem::path(FPF_SOURCE_DIR) / "tests/fixtures/quant" / name;
  Engine<Setup<Quant, Attention, par::Single, cuda::Backend>> gpu(dir, EngineOptions{Precision::fp32});
  const auto a = gpu.generate({ref.signals.prompt_ids}, ref.steps, ref.spec).at(0);
  const double vs_hf = worst_rel_l2(a, ref.signals);
  CHECK(vs_hf <= 1e-4);
  Engine<Setup<Quant, Attention, par::Single, cpu::Backend>> cpu_engine(dir);
  const auto c = cpu_engine.generate({ref.signals.prompt_ids}, ref.steps, ref.spec).at(0);
  const double vs_cpu = worst_rel_l2(a, c);
  CHECK(vs_cpu <= 1e-5);
  for (int rep = 0; rep < 2; ++rep) CHECK(bit_identical(a, gpu.generate({ref.signals.prompt_ids}, ref.steps, ref.spec).at(0)));
  // bf16: runs, reps bit-identical, first token as the CPU's.
  Engine<Setup<Quant, Attention, par::Single, cuda::Backend>> gpu16(dir, EngineOptions{Precision::bf16});
  const auto b = gpu16.generate({ref.signals.prompt_ids}, ref.steps, ref.spec).at(0);
  CHECK(b.steps.at(0).token_id == c.steps.at(0).token_id);
  CHECK(bit_identical(b, gpu16.generate({ref.signals.prompt_ids}, ref.steps, ref.spec).at(0)));
  MESSAGE(name << " cuda fp32 " << Attention::name << " (prompt " << ref.signals.prompt_ids.size()
               << " tokens): max rel L2 vs HF " << vs_hf << ", vs CPU " << vs_cpu);
}

}  // namespace

TEST_CASE("cuda quant ops fp32 match the CPU dequantization within 1e-5") { all_kinds<float>(); }
TEST_CASE("cuda quant ops bf16 match within the bf16 unit roundoff") { all_kinds<cuda::bf16>(); }
TEST_CASE("cuda quant ops fp16 match within the fp16 unit roundoff") { all_kinds<cuda::fp16>(); }

TEST_CASE("cuda decode MoE add + norm + router in one launch: the bits of add_rmsnorm, router_gemv and the products") {
  check_fused_router<cuda::bf16>(64, 8, 256, 256, 9001);   // down: narrow blocks at 1 and 2 tokens, wide at 8
  check_fused_router<cuda::bf16>(128, 8, 2048, 128, 9101);  // the real E, k and hidden size
  check_fused_router<cuda::fp16>(117, 4, 384, 128, 9201);   // 15 blocks, the last one's warps partly past E
  check_fused_router<float>(64, 8, 256, 128, 9301);         // fp32 (parity mode; the products on k_qgemv32)
}

TEST_CASE("cuda quant engine: every quantized fixture matches HF and the CPU; reps bit-identical") {
  quant_fixture<quant::Awq<4>, attn::Eager>("awq_moe_sparse_step");
  quant_fixture<quant::Awq<4>, attn::Flash<>>("awq_moe_sparse_step");
  quant_fixture<quant::Gptq<4>, attn::Eager>("gptq_actorder_moe_sparse_step");
  quant_fixture<quant::Gptq<4>, attn::Flash<>>("gptq_v2_moe_no_norm");
  quant_fixture<quant::Nf4, attn::Eager>("nf4_moe_bf16_sharded");
  quant_fixture<quant::Nf4, attn::Flash<>>("nf4_moe_bf16_sharded");
}

// Programmatic dependent launch (cuda::launch) changes when a kernel's blocks start, never what they compute: a
// quantized MoE fixture and a dense one give bit-identical signals with PDL on and off, in fp32 and bf16 (the 4-bit
// decode GEMV loads its weights before pdl_wait, the MoE kernels after it).
TEST_CASE("cuda engine: PDL on and off give bit-identical signals") {
  int dev = 0, major = 0;
  FPF_CUDA(cudaGetDevice(&dev));
  FPF_CUDA(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  const bool was = cuda::pdl_enabled();
  if (major == 9 && std::getenv("FPF_PDL") == nullptr) CHECK(was);  // on by default where the code holds it
  auto run = [&]<class Quant>(const std::string& dir_name, const fpf::testing::Reference& ref, Precision p, bool pdl) {
    cuda::pdl_enabled() = pdl;
    Engine<Setup<Quant, attn::Flash<>, par::Single, cuda::Backend>> gpu(dir_name, EngineOptions{p});
    return gpu.generate({ref.signals.prompt_ids}, ref.steps, ref.spec).at(0);
  };
  const std::string awq = "awq_moe_sparse_step";
  const fpf::testing::Reference qref = fpf::testing::load_reference("../quant/" + awq);
  const std::string qdir = (std::filesystem::path(FPF_SOURCE_DIR) / "tests/fixtures/quant" / awq).string();
  const fpf::testing::Reference dref = fpf::testing::load_reference("moe_sparse_step");
  const std::string ddir = fpf::testing::fixture_dir("moe_sparse_step").string();
  for (Precision p : {Precision::fp32, Precision::bf16}) {
    CAPTURE(precision_name(p));
    CHECK(bit_identical(run.operator()<quant::Awq<4>>(qdir, qref, p, true), run.operator()<quant::Awq<4>>(qdir, qref, p, false)));
    CHECK(bit_identical(run.operator()<quant::Dense>(ddir, dref, p, true), run.operator()<quant::Dense>(ddir, dref, p, false)));
  }
  cuda::pdl_enabled() = was;
}
