// fpf-cuda-kernel-bench: the decode kernels alone at the Qwen3-30B-A3B shape (bf16), timed with CUDA events over
// launches captured in a CUDA graph (as a decode step runs): attention of one row
// against --keys cached keys (eager, flash), the prefill attention of --keys rows, and the per-layer products of a
// batch-1 decode step dense (bf16) and 4-bit (AWQ-like affine groups of 128, NF4 blocks of 64 rounded to bf16):
// q/k/v, o, the MoE expert products of 8 slots, and the lm_head. Prints microseconds and the bytes each launch must
// read per microsecond (GB/s of weights and KV); then whole 4-bit decode layers over 16 distinct weight sets (cold
// L2), each of their kernels alone, each one's share of the chain, and a trace of the gaps between the launches.
// --layer-only 1 runs only that last part (--quick 1: only the whole layer's time). Ablations of the layer:
// --router-cluster 0 takes the router's fallback kernel on the H100; --flash-chunk 32|128 other keys per decode
// attention block; --prefetch 0 without the backend's L2 prefetch of the next layer's KV (after stage --pf-kv, 4:
// o) and q/k/v and o weights (after stage --pf-w, 7: gate_up).
//   fpf-cuda-kernel-bench [--keys 6000] [--iters 200] [--layer-only 0|1] [--quick 0|1] [--router-cluster 0|1]
//                         [--flash-chunk 32|64|128] [--prefetch 0|1] [--pf-kv S] [--pf-w S]
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#define FPF_PDL_TRACE  // --trace: cuda::pdl_wait records when each launch leaves it
#include <fpf/attention/cuda.cuh>
#include <fpf/backend/cuda/gemm.cuh>
#include <fpf/backend/cuda/ops.cuh>
#include <fpf/backend/cuda/qlinear.cuh>
#include <fpf/quant/packed.hpp>

using namespace fpf;
using T = cuda::bf16;

namespace {

// A side stream that f may fork work onto (fork_side); time_us and trace_gaps join it back before the capture ends.
cudaStream_t g_side{};
cudaEvent_t g_fork{}, g_join{};
bool g_side_used = false;
void fork_side(cudaStream_t st) {
  if (g_side == nullptr) {
    FPF_CUDA(cudaStreamCreateWithFlags(&g_side, cudaStreamNonBlocking));
    FPF_CUDA(cudaEventCreateWithFlags(&g_fork, cudaEventDisableTiming));
    FPF_CUDA(cudaEventCreateWithFlags(&g_join, cudaEventDisableTiming));
  }
  FPF_CUDA(cudaEventRecord(g_fork, st));
  FPF_CUDA(cudaStreamWaitEvent(g_side, g_fork));
  g_side_used = true;
}
void join_side(cudaStream_t st) {
  if (!g_side_used) return;
  FPF_CUDA(cudaEventRecord(g_join, g_side));
  FPF_CUDA(cudaStreamWaitEvent(st, g_join));
  g_side_used = false;
}

// `iters` calls of f(st) captured into one CUDA graph on a new stream, after two calls outside it (plans, attributes,
// lazy module loading); the side stream joined before each sync and before the capture ends.
struct CallGraph {
  cudaStream_t st{};
  cudaGraph_t g{};
  cudaGraphExec_t ge{};
  CallGraph() = default;
  CallGraph(const CallGraph&) = delete;
  CallGraph& operator=(const CallGraph&) = delete;
  ~CallGraph() {
    if (ge) cudaGraphExecDestroy(ge);
    if (g) cudaGraphDestroy(g);
    if (st) cudaStreamDestroy(st);
  }
};
template <class F>
void capture_calls(F&& f, int iters, CallGraph& c) {
  FPF_CUDA(cudaStreamCreateWithFlags(&c.st, cudaStreamNonBlocking));
  for (int i = 0; i < 2; ++i) f(c.st);
  join_side(c.st);
  FPF_CUDA(cudaStreamSynchronize(c.st));
  FPF_CUDA(cudaStreamBeginCapture(c.st, cudaStreamCaptureModeRelaxed));
  for (int i = 0; i < iters; ++i) f(c.st);
  join_side(c.st);
  FPF_CUDA(cudaStreamEndCapture(c.st, &c.g));
  FPF_CUDA(cudaGraphInstantiate(&c.ge, c.g, 0));
}

// Mean microseconds per call of f(stream), GPU side: `iters` calls captured into one CUDA graph (as a decode step
// is), replayed 5 times after one warm-up replay. Host launch overhead is not in it; each launch's start-up on the
// GPU and the gap to the previous kernel are, as in a decode step.
template <class F>
double time_us(F&& f, int iters) {
  CallGraph c;
  capture_calls(f, iters, c);
  FPF_CUDA(cudaGraphLaunch(c.ge, c.st));
  cudaEvent_t e0, e1;
  FPF_CUDA(cudaEventCreate(&e0));
  FPF_CUDA(cudaEventCreate(&e1));
  FPF_CUDA(cudaEventRecord(e0, c.st));
  for (int i = 0; i < 5; ++i) FPF_CUDA(cudaGraphLaunch(c.ge, c.st));
  FPF_CUDA(cudaEventRecord(e1, c.st));
  FPF_CUDA(cudaEventSynchronize(e1));
  float ms = 0;
  FPF_CUDA(cudaEventElapsedTime(&ms, e0, e1));
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  return 1e3 * ms / 5 / iters;
}

// One graph replay of `iters` calls of f with cuda::pdl_wait's trace on (after two replays without); prints
// each launch's shape and the mean gap from the time its block 0 leaves pdl_wait to the next launch's, per position
// in the period of f (launches with the same shape in a row, a kernel's second wait, count once).
template <class F>
void trace_gaps(F&& f, int iters) {
  CallGraph c;
  capture_calls(f, iters, c);
  const cudaStream_t st = c.st;
  const cudaGraphExec_t ge = c.ge;
  for (int i = 0; i < 2; ++i) FPF_CUDA(cudaGraphLaunch(ge, st));
  FPF_CUDA(cudaStreamSynchronize(st));
  const unsigned cap = 1u << 16, zero = 0;
  cuda::DeviceBuffer<cuda::PdlTraceRec> rec(cap);
  cuda::PdlTraceRec* p = rec.get();
  FPF_CUDA(cudaMemcpyToSymbol(cuda::g_pdl_trace_n, &zero, sizeof zero));
  FPF_CUDA(cudaMemcpyToSymbol(cuda::g_pdl_trace_cap, &cap, sizeof cap));
  FPF_CUDA(cudaMemcpyToSymbol(cuda::g_pdl_trace, &p, sizeof p));
  FPF_CUDA(cudaGraphLaunch(ge, st));
  FPF_CUDA(cudaStreamSynchronize(st));
  cuda::PdlTraceRec* null = nullptr;
  FPF_CUDA(cudaMemcpyToSymbol(cuda::g_pdl_trace, &null, sizeof null));
  unsigned n = 0;
  FPF_CUDA(cudaMemcpyFromSymbol(&n, cuda::g_pdl_trace_n, sizeof n));
  n = std::min(n, cap);
  std::vector<cuda::PdlTraceRec> r(n);
  FPF_CUDA(cudaMemcpy(r.data(), p, n * sizeof(cuda::PdlTraceRec), cudaMemcpyDeviceToHost));
  std::sort(r.begin(), r.end(), [](const auto& a, const auto& b) { return a.t < b.t; });
  auto same = [](const cuda::PdlTraceRec& a, const cuda::PdlTraceRec& b) {
    return a.gx == b.gx && a.gy == b.gy && a.gz == b.gz && a.bx == b.bx;
  };
  std::vector<cuda::PdlTraceRec> u;
  for (const auto& x : r)
    if (u.empty() || !same(u.back(), x)) u.push_back(x);
  const int per = static_cast<int>(u.size()) / iters;
  if (per < 1 || static_cast<int>(u.size()) != per * iters) {
    std::printf("  trace: %zu launches over %d calls: no fixed period\n", u.size(), iters);
  } else {
    std::printf("  trace (%d launches per call; gap from its wait to the next launch's, us):", per);
    for (int j = 0; j < per; ++j) {
      double sum = 0, early = 0;  // early: how long before its release block 0 reached the wait
      int cnt = 0;
      for (int i = 2; i < iters; ++i) {  // the first calls ramp up
        const std::size_t a = static_cast<std::size_t>(i) * per + j;
        if (a + 1 < u.size())
          sum += static_cast<double>(u[a + 1].t - u[a].t) / 1e3, early += (static_cast<double>(u[a].t) - u[a].arrive) / 1e3, ++cnt;
      }
      const auto& x = u[static_cast<std::size_t>(j)];
      std::printf(" [%ux%ux%u/%u] %.2f (waited %.2f)", x.gx, x.gy, x.gz, x.bx, cnt ? sum / cnt : 0.0, cnt ? early / cnt : 0.0);
    }
    std::printf("\n");
  }
}

template <class V>
cuda::DeviceBuffer<V> random_device(std::size_t n, std::uint64_t seed) {
  std::vector<V> h(n);
  std::uint64_t s = seed;
  for (auto& x : h) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    if constexpr (std::is_same_v<V, T>) x = __float2bfloat16(static_cast<float>((s >> 40) % 2001) / 1000.0f - 1.0f);
    else x = static_cast<V>(s >> 33);
  }
  cuda::DeviceBuffer<V> d(n);
  d.upload(h.data(), n);
  return d;
}

quant::Packed4 packed(quant::Packed4::Code code, int N, int K, std::uint32_t seed) {
  std::mt19937 g(seed);
  quant::Packed4 p;
  p.code = code;
  p.nf4_dtype = DType::BF16;
  p.N = N, p.K = K, p.G = code == quant::Packed4::Code::Affine ? 128 : 64;
  p.words.resize(static_cast<std::size_t>(N) * K / 8);
  for (auto& w : p.words) w = static_cast<std::uint32_t>(g());
  p.scales.assign(static_cast<std::size_t>(p.scale_count()), 0.01f);
  if (code == quant::Packed4::Code::Affine) p.zeros.assign(p.scales.size(), 8);
  return p;
}

}  // namespace

int main(int argc, char** argv) {
  int keys = 6000, iters = 200;
  bool layer_only = false;  // --layer-only 1: only the whole-layer section
  int flash_chunk = 0;      // --flash-chunk 32|64|128: the decode split's keys per block in the layer (0: the policy's)
  int prefetch = 1;         // --prefetch 0: without the backend's L2 prefetch of the next layer's KV and weights
  int pf_kv = 4, pf_w = 7;  // --pf-kv S, --pf-w S: after which stage (0..7) they are prefetched (the backend's: 4, 7)
  bool quick = false;       // --quick 1: the whole layer's time only
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    if (k == "--keys") keys = std::atoi(argv[i + 1]);
    else if (k == "--iters") iters = std::atoi(argv[i + 1]);
    else if (k == "--layer-only") layer_only = std::atoi(argv[i + 1]) != 0;
    else if (k == "--flash-chunk") flash_chunk = std::atoi(argv[i + 1]);
    else if (k == "--prefetch") prefetch = std::atoi(argv[i + 1]);
    else if (k == "--pf-kv") pf_kv = std::atoi(argv[i + 1]);
    else if (k == "--pf-w") pf_w = std::atoi(argv[i + 1]);
    else if (k == "--quick") quick = std::atoi(argv[i + 1]) != 0;
    else if (k == "--router-cluster") cuda::ops::router_cluster_enabled() &= std::atoi(argv[i + 1]) != 0;
    else {
      std::fprintf(stderr, "usage: fpf-cuda-kernel-bench [--keys N] [--iters N] [--layer-only 0|1] [--quick 0|1] [--router-cluster 0|1] "
                           "[--flash-chunk 32|64|128] [--prefetch 0|1] [--pf-kv 0..7] [--pf-w 0..7]\n");
      return 2;
    }
  }
  if ((flash_chunk != 0 && flash_chunk != 32 && flash_chunk != 64 && flash_chunk != 128) || pf_kv < 0 || pf_kv > 7 || pf_w < 0 ||
      pf_w > 7) {
    std::fprintf(stderr, "fpf-cuda-kernel-bench: --flash-chunk takes 32, 64 or 128; --pf-kv and --pf-w a stage 0..7\n");
    return 2;
  }
  const int nh = 32, nkv = 4, D = 128, H = 2048, I = 768, E = 128, k = 8, q_dim = nh * D, kv_dim = nkv * D;
  const long long V = 151936;
  cudaDeviceProp prop{};
  FPF_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::printf("device %s; shape Qwen3-30B-A3B (bf16), %d cached keys, %d iterations per kernel\n", prop.name, keys, iters);

  // ---- attention ----
  auto q = random_device<T>(static_cast<std::size_t>(keys) * q_dim, 1);
  auto kc = random_device<T>(static_cast<std::size_t>(keys) * kv_dim, 2);
  auto vc = random_device<T>(static_cast<std::size_t>(keys) * kv_dim, 3);
  cuda::DeviceBuffer<T> out(static_cast<std::size_t>(keys) * q_dim);
  std::vector<std::int32_t> seq(static_cast<std::size_t>(keys), 0), pos(static_cast<std::size_t>(keys));
  for (int i = 0; i < keys; ++i) pos[static_cast<std::size_t>(i)] = i;
  cuda::DeviceBuffer<std::int32_t> dseq(static_cast<std::size_t>(keys)), dpos(static_cast<std::size_t>(keys)), dlast(1);
  dseq.upload(seq.data(), seq.size());
  dpos.upload(pos.data(), pos.size());
  const std::int32_t last = keys - 1;
  dlast.upload(&last, 1);
  T* kp = kc.get();
  T* vp = vc.get();
  cuda::DeviceBuffer<T*> kt(1), vt(1);
  kt.upload(&kp, 1);
  vt.upload(&vp, 1);
  cuda::DeviceBuffer<float> scratch(2 * attn::split_scratch_floats(1, nh, D, keys));  // x 2: --flash-chunk 32
  attn::CudaArgs<T> a;
  a.q = q.get();
  a.q_stride = q_dim;
  a.kcache = kt.get();
  a.vcache = vt.get();
  a.row_seq = dseq.get();
  a.row_pos = dpos.get();
  a.rows = keys;
  a.num_heads = nh;
  a.num_kv_heads = nkv;
  a.head_dim = D;
  a.max_keys = keys;
  a.scale = 0.0884f;
  a.out = out.get();
  attn::CudaArgs<T> d = a;
  d.rows = 1;
  d.row_pos = dlast.get();
  d.scratch = scratch.get();
  const double kv_bytes = 2.0 * keys * kv_dim * sizeof(T);
  const double de = layer_only ? 0 : time_us([&](cudaStream_t st) { attn::Cuda<attn::Eager>::run<T>(d, st); }, iters);
  const double df = layer_only ? 0 : time_us([&](cudaStream_t st) { attn::Cuda<attn::Flash<>>::run<T>(d, st); }, iters);
  if (!layer_only)
    std::printf("decode attention, 1 row x %d keys: eager %.1f us, flash %.1f us (KV %.1f MB: %.0f / %.0f GB/s)\n", keys, de, df,
                kv_bytes / 1e6, kv_bytes / de / 1e3, kv_bytes / df / 1e3);
  if (!layer_only) {
    cuda::Gemm g;
    cuda::DeviceBuffer<float> S;
    cuda::DeviceBuffer<T> P;
    const std::vector<attn::PrefillSeq<T>> segs{{0, keys, 0, kc.get(), vc.get()}};
    const double pf = time_us([&](cudaStream_t st) { attn::Cuda<attn::Flash<>>::run_prefill<T>(a, segs, {g, S, P}, st); }, 3);
    const double flops = 4.0 * nh * D * (static_cast<double>(keys) * (keys + 1) / 2);
    std::printf("prefill attention, %d rows (flash, tensor cores): %.2f ms, %.1f TFLOP/s\n", keys, pf / 1e3, flops / pf / 1e6);
  }

  // ---- products of one decode step (batch 1) ----
  cuda::Gemm gemm;
  auto x = random_device<T>(static_cast<std::size_t>(8) * 4096, 4);
  cuda::DeviceBuffer<T> y(static_cast<std::size_t>(V) * 8);
  std::vector<std::int32_t> ids_h{3, 17, 40, 41, 77, 90, 101, 127};
  cuda::DeviceBuffer<std::int32_t> ids(8);
  ids.upload(ids_h.data(), 8);
  struct Shape {
    const char* name;
    int N, K;
    bool moe;
  };
  const Shape shapes[] = {{"qkv", q_dim + 2 * kv_dim, H, false},
                          {"o", H, q_dim, false},
                          {"experts gate_up x8", 2 * I, H, true},
                          {"experts down x8", H, I, true}};
  double layer_dense = 0, layer_awq = 0, layer_nf4 = 0;
  for (const Shape& s : shapes) {
    if (layer_only) break;
    const int mats = s.moe ? E : 1, slots = s.moe ? k : 1;
    const double w_elems = static_cast<double>(s.N) * s.K * slots;
    auto wd = random_device<T>(static_cast<std::size_t>(mats) * s.N * s.K, 5);
    const double td = s.moe ? time_us([&](cudaStream_t st) { cuda::ops::moe_gemv<T>(x.get(), k, wd.get(), ids.get(), slots, s.N, s.K, y.get(), st); }, iters)
                            : time_us([&](cudaStream_t st) { gemm.linear<T>(x.get(), 1, wd.get(), s.N, s.K, y.get(), st); }, iters);
    double tq[2];
    for (int c = 0; c < 2; ++c) {
      std::vector<quant::Packed4> ps;
      for (int e = 0; e < mats; ++e) ps.push_back(packed(c == 0 ? quant::Packed4::Code::Affine : quant::Packed4::Code::Nf4, s.N, s.K, 7 + e));
      cuda::q::Weight w;
      cuda::PinnedUploader up;
      w.upload(ps, up);
      tq[c] = s.moe ? time_us([&](cudaStream_t st) { w.moe_gemv<T>(x.get(), s.K, k, ids.get(), slots, y.get(), s.N, st); }, iters)
                    : time_us([&](cudaStream_t st) { w.gemv<T>(x.get(), 1, s.K, y.get(), s.N, st); }, iters);
    }
    layer_dense += td, layer_awq += tq[0], layer_nf4 += tq[1];
    std::printf("%-20s N %5d K %4d: bf16 %6.1f us (%4.0f GB/s) | affine-4bit %6.1f us (%4.0f GB/s of codes) | nf4 %6.1f us\n", s.name, s.N,
                s.K, td, w_elems * 2 / td / 1e3, tq[0], w_elems * 0.5 / tq[0] / 1e3, tq[1]);
  }
  auto lm = random_device<T>(static_cast<std::size_t>(V) * H, 6);
  const double tl = layer_only ? 0 : time_us([&](cudaStream_t st) { gemm.linear<T>(x.get(), 1, lm.get(), static_cast<int>(V), H, y.get(), st); }, iters / 4 + 1);
  if (!layer_only) std::printf("lm_head bf16 N %lld K %d: %.1f us (%.0f GB/s)\n", V, H, tl, static_cast<double>(V) * H * 2 / tl / 1e3);
  // ---- the other kernels of a batch-1 decode step ----
  if (!layer_only) {
    cuda::DeviceBuffer<float> nw(static_cast<std::size_t>(H)), inv(static_cast<std::size_t>(D / 2));
    std::vector<float> ones(static_cast<std::size_t>(H), 1.0f), invh(static_cast<std::size_t>(D / 2));
    for (int i = 0; i < D / 2; ++i) invh[static_cast<std::size_t>(i)] = std::pow(1e6f, -2.0f * i / D);
    nw.upload(ones.data(), ones.size());
    inv.upload(invh.data(), invh.size());
    auto xa = random_device<T>(static_cast<std::size_t>(H), 11), xb = random_device<T>(static_cast<std::size_t>(H), 12);
    auto qkv = random_device<T>(static_cast<std::size_t>(q_dim + 2 * kv_dim), 13);
    auto ye = random_device<T>(static_cast<std::size_t>(k) * H, 14), gu = random_device<T>(static_cast<std::size_t>(k) * 2 * I, 15);
    auto rl = random_device<T>(static_cast<std::size_t>(E), 16);
    cuda::DeviceBuffer<T> hn(static_cast<std::size_t>(H)), act(static_cast<std::size_t>(k) * I);
    cuda::DeviceBuffer<std::int32_t> rids(static_cast<std::size_t>(k));
    cuda::DeviceBuffer<float> rw(static_cast<std::size_t>(k));
    std::vector<float> wts_h(static_cast<std::size_t>(k), 0.125f);
    rw.upload(wts_h.data(), wts_h.size());
    const double t_norm = time_us([&](cudaStream_t st) { cuda::ops::rmsnorm<T>(xa.get(), nullptr, nw.get(), hn.get(), 1, H, 1e-6f, st); }, iters);
    const double t_addnorm = time_us([&](cudaStream_t st) { cuda::ops::add_rmsnorm<T>(xa.get(), xb.get(), nw.get(), hn.get(), 1, H, 1e-6f, st); }, iters);
    const double t_rope = time_us([&](cudaStream_t st) {
      cuda::ops::qk_norm_rope<T>(qkv.get(), dseq.get(), dlast.get(), 1, nw.get(), nw.get(), inv.get(), kt.get(), vt.get(), nh, nkv, D, 1e-6f, st);
    }, iters);
    auto rwt = random_device<T>(static_cast<std::size_t>(E) * H, 17);
    const double t_rgemv = time_us([&](cudaStream_t st) { gemm.linear<T>(xa.get(), 1, rwt.get(), E, H, rl.get(), st); }, iters);
    const double t_router = time_us([&](cudaStream_t st) { cuda::ops::router<T>(rl.get(), 1, E, k, true, rids.get(), rw.get(), st); }, iters);
    const double t_swiglu = time_us([&](cudaStream_t st) { cuda::ops::swiglu<T>(gu.get(), act.get(), k, I, st); }, iters);
    rw.upload(wts_h.data(), wts_h.size());
    const double t_comb = time_us([&](cudaStream_t st) { cuda::ops::moe_combine<T>(xa.get(), ye.get(), nullptr, rw.get(), 1, k, H, st); }, iters);
    cuda::DeviceBuffer<std::int32_t> top(11);
    cuda::DeviceBuffer<float> toplp(10);
    cuda::ops::LsmScratch lsm;
    const double t_lsm = time_us([&](cudaStream_t st) { cuda::ops::log_softmax_topk<T>(y.get(), 1, V, 10, top.get(), toplp.get(), top.get() + 10, lsm, st); }, iters / 4 + 1);
    const double small = t_norm + t_addnorm + t_rope + t_rgemv + t_router + t_swiglu + t_comb;
    std::printf("small kernels: rmsnorm %.2f, add_rmsnorm %.2f, qk_norm_rope %.2f, router gemv %.2f, router top-k %.2f, swiglu %.2f, "
                "moe_combine %.2f us: %.1f us per layer (x 48: %.2f ms); log_softmax + top-k %.1f us\n",
                t_norm, t_addnorm, t_rope, t_rgemv, t_router, t_swiglu, t_comb, small, small * 48 / 1e3, t_lsm);
    std::printf("decode step estimate (flash): %.2f ms = 48 x (products %.1f + attention %.1f + small %.1f us) + lm_head %.1f + lsm %.1f us\n",
                (48 * (layer_dense + df + small) + tl + t_lsm) / 1e3, layer_dense, df, small, tl, t_lsm);
  }
  // ---- whole 4-bit decode layers, as the backend runs them, over kLayers distinct weight sets ----
  // The kernels above reread one weight set, which then sits in the 50 MB L2; a decode step reads 2.65 GB. Here
  // each of kLayers layers has its own q/k/v and o weights and KV cache, and its MoE slots take experts no other
  // layer takes (kLayers disjoint sets of 8 of the 128), so every layer reads from HBM as in a real step. One layer
  // is: rmsnorm, q/k/v GEMV, q/k norm + RoPE, flash decode, o GEMV, add + rmsnorm, router GEMV + top-k, gate_up GEMV,
  // SwiGLU, down GEMV, combine. Run with FPF_PDL=0 to time it without programmatic dependent launch.
  {
    constexpr int kLayers = 16;
    std::vector<quant::Packed4> pq, po, pgu, pdn;
    pq.push_back(packed(quant::Packed4::Code::Affine, q_dim + 2 * kv_dim, H, 21));
    po.push_back(packed(quant::Packed4::Code::Affine, H, q_dim, 22));
    for (int e = 0; e < E; ++e) {
      pgu.push_back(packed(quant::Packed4::Code::Affine, 2 * I, H, 100 + e));
      pdn.push_back(packed(quant::Packed4::Code::Affine, H, I, 300 + e));
    }
    cuda::PinnedUploader up;
    std::vector<cuda::q::Weight> wq(kLayers), wo(kLayers);
    for (int l = 0; l < kLayers; ++l) wq[l].upload(pq, up), wo[l].upload(po, up);
    cuda::q::Weight wgu, wdn;
    wgu.upload(pgu, up);
    wdn.upload(pdn, up);
    auto router_w = random_device<T>(static_cast<std::size_t>(E) * H, 23);
    std::vector<std::int32_t> sets(static_cast<std::size_t>(kLayers) * k);
    for (int l = 0; l < kLayers; ++l)
      for (int j = 0; j < k; ++j) sets[static_cast<std::size_t>(l * k + j)] = j * kLayers + l;  // disjoint, spread out
    cuda::DeviceBuffer<std::int32_t> lids(sets.size()), rids(static_cast<std::size_t>(k));
    lids.upload(sets.data(), sets.size());
    std::vector<cuda::DeviceBuffer<T>> kcs, vcs;
    std::vector<T*> kps, vps;
    for (int l = 0; l < kLayers; ++l) {
      kcs.push_back(random_device<T>(static_cast<std::size_t>(keys) * kv_dim, 30 + l));
      vcs.push_back(random_device<T>(static_cast<std::size_t>(keys) * kv_dim, 60 + l));
      kps.push_back(kcs.back().get()), vps.push_back(vcs.back().get());
    }
    cuda::DeviceBuffer<T*> ktab(kLayers), vtab(kLayers);
    ktab.upload(kps.data(), kps.size());
    vtab.upload(vps.data(), vps.size());
    cuda::DeviceBuffer<float> nw(static_cast<std::size_t>(H)), inv(static_cast<std::size_t>(D / 2)), rw(static_cast<std::size_t>(k));
    std::vector<float> ones(static_cast<std::size_t>(H), 1.0f), invh(static_cast<std::size_t>(D / 2));
    for (int i = 0; i < D / 2; ++i) invh[static_cast<std::size_t>(i)] = std::pow(1e6f, -2.0f * i / D);
    nw.upload(ones.data(), ones.size());
    inv.upload(invh.data(), invh.size());
    cuda::DeviceBuffer<unsigned> counter(1);
    FPF_CUDA(cudaMemset(counter.get(), 0, sizeof(unsigned)));
    auto xr = random_device<T>(static_cast<std::size_t>(H), 24);
    cuda::DeviceBuffer<T> hn(static_cast<std::size_t>(H)), qkvb(static_cast<std::size_t>(q_dim + 2 * kv_dim)),
        att(static_cast<std::size_t>(q_dim)),
        ob(static_cast<std::size_t>(H)), rl(static_cast<std::size_t>(E)), gub(static_cast<std::size_t>(k) * 2 * I),
        actb(static_cast<std::size_t>(k) * I), yeb(static_cast<std::size_t>(k) * H);
    int layer = 0;
    // Which kernels run (bit i: stage_names[i]): the layer is stages 0-8; 9 and 10 (the router's product and its
    // top-k as two kernels) are timed alone, against the fused router (6).
    constexpr unsigned kLayerStages = (1u << 9) - 1;
    unsigned stages = kLayerStages;
    const char* const stage_names[] = {"rmsnorm", "qkv", "qk_norm_rope", "flash", "o", "add_rmsnorm", "router", "gate_up+swiglu",
                                       "down+combine", "router gemv alone", "router top-k alone", "taps"};
    cuda::DeviceBuffer<float> tap_stage(static_cast<std::size_t>(H + kv_dim));
    bool fused = true;  // gate_up + SwiGLU and down + combine in one kernel each, as the backend
    bool routed = false;  // the backend's decode MoE: add + norm + router in one launch (add_rmsnorm_router)
    auto one_layer = [&](cudaStream_t st) {
      const int l = layer++ % kLayers;
      const float eps = 1e-6f;
      auto on = [&](int stage) { return (stages >> stage) & 1u; };
      // --prefetch: on a side stream, the next layer's KV after stage pf_kv, its q/k/v and o weights after pf_w (in
      // whole layers and the layers without one kernel, not in a kernel alone).
      auto prefetch_after = [&](int stage) {
        if (prefetch == 0 || !on(stage) || std::popcount(stages & kLayerStages) < 2 || (stage != pf_kv && stage != pf_w)) return;
        const int ln = (l + 1) % kLayers;
        cuda::ops::PrefetchList pl;
        if (stage == pf_w) wq[ln].device_ranges(pl), wo[ln].device_ranges(pl);
        const bool kv = stage == pf_kv;
        fork_side(st);
        cuda::ops::prefetch_l2<T>(pl, kv ? ktab.get() + ln : nullptr, vtab.get() + ln, dseq.get(), dlast.get(), 1, kv_dim, g_side);
      };
      const bool taps = on(11);  // a tapped layer's fp32 copies of the hidden state and the keys, as the backend
      if (on(0)) cuda::ops::rmsnorm<T>(xr.get(), nullptr, nw.get(), hn.get(), 1, H, eps, st, {taps ? tap_stage.get() : nullptr});
      prefetch_after(0);
      if (on(1)) wq[l].gemv<T>(hn.get(), 1, H, qkvb.get(), q_dim + 2 * kv_dim, st);
      prefetch_after(1);
      if (on(2))
        cuda::ops::qk_norm_rope<T>(qkvb.get(), dseq.get(), dlast.get(), 1, nw.get(), nw.get(), inv.get(), ktab.get() + l,
                                   vtab.get() + l, nh, nkv, D, eps, st, {taps ? tap_stage.get() + H : nullptr});
      prefetch_after(2);
      attn::CudaArgs<T> al = d;
      al.q = qkvb.get();
      al.q_stride = q_dim + 2 * kv_dim;
      al.kcache = ktab.get() + l;
      al.vcache = vtab.get() + l;
      al.out = att.get();
      if (on(3)) {
        if (flash_chunk == 32) attn::detail::launch_flash_decode<T, 16, 32>(al, st);
        else if (flash_chunk == 128) attn::detail::launch_flash_decode<T, 16, 128>(al, st);
        else attn::Cuda<attn::Flash<>>::run<T>(al, st);
      }
      prefetch_after(3);
      if (on(4)) wo[l].gemv<T>(att.get(), 1, q_dim, ob.get(), H, st);
      prefetch_after(4);
      const std::int32_t* ids_l = lids.get() + static_cast<std::size_t>(l) * k;
      if (routed) {  // stages 5 (now with the router), 7 and 8; no stage 6
        if (on(5))
          cuda::ops::add_rmsnorm_router<T>(xr.get(), ob.get(), nw.get(), hn.get(), 1, H, eps, router_w.get(), E, rl.get(), k, true,
                                           rids.get(), rw.get(), st);
        if (on(7)) wgu.moe_gemv_swiglu<T>(hn.get(), H, k, ids_l, k, actb.get(), I, st);
        prefetch_after(7);
        if (on(8)) wdn.moe_gemv_combine<T>(actb.get(), I, ids_l, rw.get(), 1, k, xr.get(), H, st);
        return;
      }
      if (on(5)) cuda::ops::add_rmsnorm<T>(xr.get(), ob.get(), nw.get(), hn.get(), 1, H, eps, st);
      prefetch_after(5);
      if (on(6))
        cuda::ops::router_gemv<T>(hn.get(), 1, router_w.get(), E, H, rl.get(), k, true, rids.get(), rw.get(), counter.get(), st);
      prefetch_after(6);
      if (on(9)) cuda::ops::gemv<T>(hn.get(), 1, router_w.get(), E, H, rl.get(), st);
      if (on(10)) cuda::ops::router<T>(rl.get(), 1, E, k, true, rids.get(), rw.get(), st);
      if (fused) {
        if (on(7)) wgu.moe_gemv_swiglu<T>(hn.get(), H, k, ids_l, k, actb.get(), I, st);
        prefetch_after(7);
        if (on(8)) wdn.moe_gemv_combine<T>(actb.get(), I, ids_l, rw.get(), 1, k, xr.get(), H, st);
      } else {
        wgu.moe_gemv<T>(hn.get(), H, k, ids_l, k, gub.get(), 2 * I, st);
        cuda::ops::swiglu<T>(gub.get(), actb.get(), k, I, st);
        wdn.moe_gemv<T>(actb.get(), I, 1, ids_l, k, yeb.get(), H, st);
        cuda::ops::moe_combine<T>(xr.get(), yeb.get(), nullptr, rw.get(), 1, k, H, st);
      }
    };
    const double t_layer = time_us(one_layer, 4 * kLayers);
    fused = false;
    const double t_apart = time_us(one_layer, 4 * kLayers);
    fused = true;
    routed = true;
    const double t_routed = time_us(one_layer, 4 * kLayers), t_again = time_us(one_layer, 4 * kLayers);
    routed = false;
    std::printf("add + norm + router in one cluster launch (add_rmsnorm_router; the backend's): %.1f, %.1f us per "
                "layer; with the router launch: %.1f, %.1f us\n",
                t_routed, t_again, t_layer, time_us(one_layer, 4 * kLayers));
    const double layer_bytes = static_cast<double>(wq[0].bytes_per_matrix() + wo[0].bytes_per_matrix() +
                                                   k * (wgu.bytes_per_matrix() + wdn.bytes_per_matrix())) +
                               static_cast<double>(E) * H * sizeof(T) + kv_bytes;
    std::printf("affine-4bit decode layer (%d distinct layers, cold L2, PDL %s): %.1f us per layer (%.1f MB: %.0f GB/s), "
                "%.1f us with swiglu and combine apart; x 48 + lm_head (0 with --layer-only): %.2f ms per token\n",
                kLayers, cuda::pdl_enabled() ? "on" : "off", t_layer, layer_bytes / 1e6, layer_bytes / t_layer / 1e3, t_apart,
                (48 * t_layer + tl) / 1e3);
    if (quick) return 0;
    // Each kernel alone, back to back over the kLayers weight sets (cold L2, PDL as above): where the layer's time goes.
    std::printf("  each alone (cold):");
    double sum = 0;
    for (int i = 0; i < 11; ++i) {
      stages = 1u << i;
      const double t = time_us(one_layer, 4 * kLayers);
      if (i < 9) sum += t;
      std::printf(" %s %.1f", stage_names[i], t);
    }
    std::printf(" us; sum of the layer's %.1f us\n", sum);
    // Each kernel's cost inside the chain: the layer minus the layer without it (what fusing it away could save at
    // most), and the layer with a tapped layer's copy added.
    std::printf("  each's share of the chain (layer - layer without it):");
    for (int i = 0; i < 9; ++i) {
      stages = kLayerStages & ~(1u << i);
      std::printf(" %s %.1f", stage_names[i], t_layer - time_us(one_layer, 4 * kLayers));
    }
    stages = kLayerStages | (1u << 11);
    std::printf(" us; with the taps: %.1f us\n", time_us(one_layer, 4 * kLayers));
    stages = kLayerStages;
    trace_gaps(one_layer, 4 * kLayers);
    routed = true;  // the same with add_rmsnorm_router
    std::printf("  add_rmsnorm_router:");
    trace_gaps(one_layer, 4 * kLayers);
    routed = false;
  }
  if (!layer_only)
    std::printf("products per layer: bf16 %.1f us, affine-4bit %.1f us, nf4 %.1f us; x 48 layers: %.2f / %.2f / %.2f ms\n",
                layer_dense, layer_awq, layer_nf4, layer_dense * 48 / 1e3, layer_awq * 48 / 1e3, layer_nf4 * 48 / 1e3);
  return 0;
}
