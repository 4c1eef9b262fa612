// Every CUDA op against its CPU reference (backend/cpu/ops.hpp, attention.hpp, rope.hpp) on fresh random inputs:
// fp32 within 1e-5 relative L2, bf16/fp16 within the storage type's unit roundoff (cuda_test_util.cuh says why);
// outputs poisoned before each launch, and each launch repeated to check it is bit-identical to itself.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <type_traits>

#include <fpf/attention/attention.hpp>
#include <fpf/attention/cuda.cuh>
#include <fpf/backend/cpu/ops.hpp>
#include <fpf/backend/cuda/gemm.cuh>
#include <fpf/backend/cuda/ops.cuh>
#include <fpf/model/rope.hpp>
#include <fpf/taps/capture.hpp>

#include "../reference_signals.hpp"
#include "cuda_test_util.cuh"

using namespace fpf;
using namespace fpf::cuda;
using namespace fpf::cuda::testing;

namespace {

template <class T>
void poison(DeviceBuffer<T>& d) {
  FPF_CUDA(cudaMemset(d.get(), 0xff, d.size() * sizeof(T)));  // NaN in every float type
}

template <class T>
std::vector<T> raw(const DeviceBuffer<T>& d, std::size_t n) {
  FPF_CUDA(cudaDeviceSynchronize());
  return d.download(n);
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

template <class T>
void test_rmsnorm(int rows, int n, std::uint32_t seed) {
  std::vector<float> x = randn(static_cast<std::size_t>(rows) * n, seed, 3.0f), w = randn(n, seed + 1);
  const auto xt = round_to<T>(x);
  auto dx = to_device(xt);
  auto dw = to_device(w);
  DeviceBuffer<T> dy(x.size());
  poison(dy);
  ops::rmsnorm<T>(dx.get(), nullptr, dw.get(), dy.get(), rows, n, 1e-6f);
  const auto got = to_host(dy, x.size());
  const auto bits = raw(dy, x.size());
  ops::rmsnorm<T>(dx.get(), nullptr, dw.get(), dy.get(), rows, n, 1e-6f);
  CHECK(same_bits(bits, raw(dy, x.size())));
  {  // The tap: row r's input, widened, at slot[r] (rows with slot -1 copy nothing); the output is unchanged.
    std::vector<std::int32_t> slot(static_cast<std::size_t>(rows), -1);
    for (int r = 0, c = 0; r < rows; ++r)
      if (r % 2 == 0) slot[static_cast<std::size_t>(r)] = c++;
    const int nc = (rows + 1) / 2;
    auto dslot = to_device(slot);
    DeviceBuffer<float> tap(static_cast<std::size_t>(nc) * n + 1);
    poison(tap);
    ops::rmsnorm<T>(dx.get(), nullptr, dw.get(), dy.get(), rows, n, 1e-6f, 0, {tap.get(), dslot.get()});
    CHECK(same_bits(bits, raw(dy, x.size())));
    const std::vector<float> got_tap = to_host(tap, tap.size());
    const std::vector<float> xw = to_host(dx, x.size());
    for (int r = 0; r < rows; ++r)
      if (slot[static_cast<std::size_t>(r)] >= 0)
        CHECK(std::memcmp(got_tap.data() + static_cast<std::size_t>(slot[static_cast<std::size_t>(r)]) * n,
                          xw.data() + static_cast<std::size_t>(r) * n, n * sizeof(float)) == 0);
    CHECK(std::isnan(got_tap.back()));  // nothing past the captured rows
  }
  std::vector<float> ref(x.size());
  for (int r = 0; r < rows; ++r) cpu::rmsnorm(x.data() + r * n, w.data(), ref.data() + r * n, n, 1e-6f);
  const double e = rel_l2(got, ref);
  MESSAGE("rmsnorm " << dtype_name(dtype_of<T>()) << " rows " << rows << " n " << n << ": rel L2 " << e);
  CHECK(e <= tolerance<T>());

  // add_rmsnorm: bit for bit what add() then rmsnorm() give.
  const std::vector<float> yv = randn(x.size(), seed + 2, 1.0f);
  std::vector<float> yc = yv;
  auto dy2 = to_device(round_to<T>(yc));
  auto dx1 = to_device(xt), dx2 = to_device(xt);
  DeviceBuffer<T> o1(x.size()), o2(x.size());
  ops::add<T>(dx1.get(), dy2.get(), x.size());
  ops::rmsnorm<T>(dx1.get(), nullptr, dw.get(), o1.get(), rows, n, 1e-6f);
  ops::add_rmsnorm<T>(dx2.get(), dy2.get(), dw.get(), o2.get(), rows, n, 1e-6f);
  CHECK(same_bits(raw(dx1, x.size()), raw(dx2, x.size())));
  CHECK(same_bits(raw(o1, x.size()), raw(o2, x.size())));
}

template <class T>
void test_linear(int M, int N, int K, std::uint32_t seed, bool force_lt) {
  static Gemm gemm;
  std::vector<float> x = randn(static_cast<std::size_t>(M) * K, seed), w = randn(static_cast<std::size_t>(N) * K, seed + 1, 0.05f);
  const auto xt = round_to<T>(x);
  const auto wt = round_to<T>(w);
  auto dx = to_device(xt);
  auto dw = to_device(wt);
  DeviceBuffer<T> dy(static_cast<std::size_t>(M) * N);
  poison(dy);
  gemm.linear<T>(dx.get(), M, dw.get(), N, K, dy.get(), 0, force_lt);
  const auto got = to_host(dy, dy.size());
  const auto bits = raw(dy, dy.size());
  poison(dy);
  gemm.linear<T>(dx.get(), M, dw.get(), N, K, dy.get(), 0, force_lt);
  CHECK(same_bits(bits, raw(dy, dy.size())));
  std::vector<float> ref(dy.size());
  for (int m = 0; m < M; ++m) cpu::matvec(w.data(), x.data() + static_cast<std::size_t>(m) * K, ref.data() + static_cast<std::size_t>(m) * N, N, K);
  const double e = rel_l2(got, ref);
  MESSAGE("linear " << dtype_name(dtype_of<T>()) << " " << M << "x" << N << "x" << K << std::string(M <= ops::kGemvMaxRows && !force_lt ? " (gemv)" : " (cublasLt)")
                    << ": rel L2 " << e);
  CHECK(e <= tolerance<T>());
}

template <class T>
void test_qk_norm_rope(std::uint32_t seed) {
  const int rows = 5, nh = 8, nkv = 2, D = 128, q_dim = nh * D, kv_dim = nkv * D, qkv_dim = q_dim + 2 * kv_dim;
  std::vector<float> qkv = randn(static_cast<std::size_t>(rows) * qkv_dim, seed, 2.0f);
  std::vector<float> qn = randn(D, seed + 1), kn = randn(D, seed + 2);
  const auto qkv_t = round_to<T>(qkv);
  const std::vector<std::int32_t> seq{0, 0, 1, 1, 1}, pos{0, 5000, 3, 4, 17};
  const std::vector<float> inv = model::rope_inv_freq(1e6, D);
  auto dqkv = to_device(qkv_t);
  auto dseq = to_device(seq);
  auto dpos = to_device(pos);
  auto dqn = to_device(qn);
  auto dkn = to_device(kn);
  auto dinv = to_device(inv);
  const int cap = 5001;
  DeviceBuffer<T> k0(static_cast<std::size_t>(cap) * kv_dim), k1(static_cast<std::size_t>(cap) * kv_dim),
      v0(static_cast<std::size_t>(cap) * kv_dim), v1(static_cast<std::size_t>(cap) * kv_dim);
  auto kt = to_device(std::vector<T*>{k0.get(), k1.get()});
  auto vt = to_device(std::vector<T*>{v0.get(), v1.get()});
  // Rows 1 and 3 are captured (slots 1 and 0): the key tap holds their rotated keys, widened.
  const std::vector<std::int32_t> slot{-1, 1, -1, 0, -1};
  auto dslot = to_device(slot);
  DeviceBuffer<float> ktap(2 * static_cast<std::size_t>(kv_dim));
  poison(ktap);
  ops::qk_norm_rope<T>(dqkv.get(), dseq.get(), dpos.get(), rows, dqn.get(), dkn.get(), dinv.get(), kt.get(), vt.get(), nh, nkv, D,
                       1e-6f, 0, {ktap.get(), dslot.get()});
  const auto got = to_host(dqkv, qkv.size());
  const std::vector<float> got_ktap = to_host(ktap, ktap.size());
  for (int r : {1, 3})
    CHECK(std::memcmp(got_ktap.data() + static_cast<std::size_t>(slot[static_cast<std::size_t>(r)]) * kv_dim,
                      got.data() + static_cast<std::size_t>(r) * qkv_dim + q_dim, kv_dim * sizeof(float)) == 0);
  std::vector<float> ref = qkv;
  for (int r = 0; r < rows; ++r)
    for (int h = 0; h < nh + nkv; ++h) {
      float* x = ref.data() + static_cast<std::size_t>(r) * qkv_dim + h * D;
      cpu::rmsnorm(x, h < nh ? qn.data() : kn.data(), x, D, 1e-6f);
      model::apply_rope(x, inv, pos[r]);
    }
  const double e = rel_l2(got, ref);
  MESSAGE("qk_norm_rope " << dtype_name(dtype_of<T>()) << ": rel L2 " << e);
  CHECK(e <= tolerance<T>());
  // The cache holds exactly the rotated keys and the values, at each row's position in its sequence's cache.
  for (int r = 0; r < rows; ++r) {
    const DeviceBuffer<T>& kc = seq[r] == 0 ? k0 : k1;
    const DeviceBuffer<T>& vc = seq[r] == 0 ? v0 : v1;
    std::vector<T> kr(kv_dim), vr(kv_dim);
    FPF_CUDA(cudaMemcpy(kr.data(), kc.get() + static_cast<std::size_t>(pos[r]) * kv_dim, kv_dim * sizeof(T), cudaMemcpyDeviceToHost));
    FPF_CUDA(cudaMemcpy(vr.data(), vc.get() + static_cast<std::size_t>(pos[r]) * kv_dim, kv_dim * sizeof(T), cudaMemcpyDeviceToHost));
    const auto row = raw(dqkv, qkv.size());
    CHECK(std::memcmp(kr.data(), row.data() + static_cast<std::size_t>(r) * qkv_dim + q_dim, kv_dim * sizeof(T)) == 0);
    CHECK(std::memcmp(vr.data(), qkv_t.data() + static_cast<std::size_t>(r) * qkv_dim + q_dim + kv_dim, kv_dim * sizeof(T)) == 0);
  }
}

// Query rows over two sequences' KV caches (lengths len[0], len[1], capacity 512 each); every cache slot a row may
// not see (later positions, and the unused capacity) holds NaN, so any read of them would show in the output.
template <class T>
struct AttnCase {
  int nh, nkv, D, rows;
  std::vector<std::int32_t> seq, pos;
  std::vector<float> q;                      // the T values, widened
  std::vector<std::vector<float>> kh, vh;    // per sequence [len, kv_dim], the T values
  DeviceBuffer<T> dq, out;
  std::vector<DeviceBuffer<T>> kd, vd;
  DeviceBuffer<std::int32_t> dseq, dpos;
  DeviceBuffer<T*> kt, vt;
  attn::CudaArgs<T> a;

  AttnCase(int nh_, int nkv_, int D_, std::uint32_t seed, std::vector<std::int32_t> seq_, std::vector<std::int32_t> pos_,
           const std::vector<int>& len)
      : nh(nh_), nkv(nkv_), D(D_), rows(static_cast<int>(seq_.size())), seq(std::move(seq_)), pos(std::move(pos_)) {
    const int kv_dim = nkv * D, q_dim = nh * D, cap = 512;
    q = randn(static_cast<std::size_t>(rows) * q_dim, seed, 1.0f);
    kh.resize(2), vh.resize(2);
    for (int s = 0; s < 2; ++s) {
      kh[s] = randn(static_cast<std::size_t>(len[s]) * kv_dim, seed + 10 + s, 1.0f);
      vh[s] = randn(static_cast<std::size_t>(len[s]) * kv_dim, seed + 20 + s, 1.0f);
      const auto ktv = round_to<T>(kh[s]);
      const auto vtv = round_to<T>(vh[s]);
      kd.emplace_back(static_cast<std::size_t>(cap) * kv_dim);
      vd.emplace_back(static_cast<std::size_t>(cap) * kv_dim);
      poison(kd.back());
      poison(vd.back());
      kd.back().upload(ktv.data(), ktv.size());
      vd.back().upload(vtv.data(), vtv.size());
    }
    dq = to_device(round_to<T>(q));
    dseq = to_device(seq);
    dpos = to_device(pos);
    kt = to_device(std::vector<T*>{kd[0].get(), kd[1].get()});
    vt = to_device(std::vector<T*>{vd[0].get(), vd[1].get()});
    out.resize(static_cast<std::size_t>(rows) * q_dim);
    poison(out);
    a.q = dq.get();
    a.q_stride = q_dim;
    a.kcache = kt.get();
    a.vcache = vt.get();
    a.row_seq = dseq.get();
    a.row_pos = dpos.get();
    a.rows = rows;
    a.num_heads = nh;
    a.num_kv_heads = nkv;
    a.head_dim = D;
    a.max_keys = std::max(len[0], len[1]);
    a.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
    a.out = out.get();
  }

  // Runs the kernel twice (bit-identical to itself) and returns rel L2 against Policy::cpu.
  template <class Policy, class Run>
  double check(Run&& run) {
    run();
    const auto got = to_host(out, out.size());
    const auto bits = raw(out, out.size());
    run();
    CHECK(same_bits(bits, raw(out, out.size())));
    std::vector<float> ref(out.size());
    const std::size_t q_dim = static_cast<std::size_t>(nh) * D;
    for (int r = 0; r < rows; ++r)
      Policy::cpu(attn::CpuArgs{q.data() + r * q_dim, kh[seq[r]].data(), vh[seq[r]].data(), pos[r] + 1, nh, nkv, D, a.scale,
                                ref.data() + r * q_dim});
    return rel_l2(got, ref);
  }
};

// Decode-like rows: a few positions of each of two sequences (37 and 300 keys).
template <class Policy, class T>
void test_attention(int nh, int nkv, int D, std::uint32_t seed, bool split = false) {
  std::vector<std::int32_t> seq, pos;
  const std::vector<int> len{37, 300};
  for (int s = 0; s < 2; ++s)
    for (int p : {0, 1, len[s] / 2, len[s] - 1}) seq.push_back(s), pos.push_back(p);
  AttnCase<T> c(nh, nkv, D, seed, seq, pos, len);
  DeviceBuffer<float> scratch(attn::split_scratch_floats(c.rows, nh, D, c.a.max_keys));
  if (split) c.a.scratch = scratch.get();
  const double e = c.template check<Policy>([&] { attn::Cuda<Policy>::template run<T>(c.a); });
  MESSAGE("attention " << Policy::name << std::string(split ? " split-keys " : " ") << dtype_name(dtype_of<T>()) << " nh " << nh << " nkv " << nkv << " D " << D
                       << ": rel L2 " << e);
  CHECK(e <= tolerance<T>());
}

// The flash prefill entry (run_prefill: tensor cores for bf16/fp16 at head_dim 64/128, else the SIMT kernel): two
// sequences, the second continuing a cached prefix of 250 keys. bf16/fp16 round the tile's probabilities to T before
// the P V product, one rounding more than the SIMT kernel: bound 2u.
template <class T>
void test_flash_prefill(int nh, int nkv, int D, std::uint32_t seed) {
  const int n0 = 37, p1 = 250, n1 = 50;
  std::vector<std::int32_t> seq, pos;
  for (int t = 0; t < n0; ++t) seq.push_back(0), pos.push_back(t);
  for (int t = 0; t < n1; ++t) seq.push_back(1), pos.push_back(p1 + t);
  AttnCase<T> c(nh, nkv, D, seed, seq, pos, {n0, p1 + n1});
  const std::vector<attn::PrefillSeq<T>> segs{{0, n0, 0, c.kd[0].get(), c.vd[0].get()}, {n0, n1, p1, c.kd[1].get(), c.vd[1].get()}};
  static Gemm gemm;
  DeviceBuffer<float> S;
  DeviceBuffer<T> P;
  const double e = c.template check<attn::Flash<16>>([&] { attn::Cuda<attn::Flash<16>>::run_prefill<T>(c.a, segs, {gemm, S, P}); });
  MESSAGE("attention flash prefill " << dtype_name(dtype_of<T>()) << " nh " << nh << " nkv " << nkv << " D " << D << ": rel L2 " << e);
  CHECK(e <= 2 * tolerance<T>());
}

// The eager prefill path (materialized scores via cuBLASLt): two sequences, one continuing a cached prefix.
template <class T>
void test_eager_gemm(int nh, int nkv, int D, std::uint32_t seed) {
  static Gemm gemm;
  const int kv_dim = nkv * D, q_dim = nh * D;
  const std::vector<int> p0{0, 23}, rows{37, 41};
  std::vector<std::vector<float>> kh(2), vh(2);
  std::vector<DeviceBuffer<T>> kd, vd;
  std::vector<std::int32_t> seq, pos;
  for (int s = 0; s < 2; ++s) {
    const int len = p0[s] + rows[s];
    kh[s] = randn(static_cast<std::size_t>(len) * kv_dim, seed + 10 + s);
    vh[s] = randn(static_cast<std::size_t>(len) * kv_dim, seed + 20 + s);
    const auto kt = round_to<T>(kh[s]);
    const auto vt = round_to<T>(vh[s]);
    kd.push_back(to_device(kt));
    vd.push_back(to_device(vt));
    for (int t = 0; t < rows[s]; ++t) seq.push_back(s), pos.push_back(p0[s] + t);
  }
  const int R = static_cast<int>(seq.size());
  std::vector<float> q = randn(static_cast<std::size_t>(R) * q_dim, seed);
  const auto qt = round_to<T>(q);
  auto dq = to_device(qt);
  DeviceBuffer<T> out(static_cast<std::size_t>(R) * q_dim);
  poison(out);
  attn::CudaArgs<T> a;
  a.q = dq.get();
  a.q_stride = q_dim;
  a.rows = R;
  a.num_heads = nh;
  a.num_kv_heads = nkv;
  a.head_dim = D;
  a.max_keys = 64;
  a.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  a.out = out.get();
  std::vector<attn::PrefillSeq<T>> segs{{0, rows[0], p0[0], kd[0].get(), vd[0].get()}, {rows[0], rows[1], p0[1], kd[1].get(), vd[1].get()}};
  DeviceBuffer<float> S;
  DeviceBuffer<T> P;
  attn::Cuda<attn::Eager>::run_prefill<T>(a, segs, {gemm, S, P});
  const auto got = to_host(out, out.size());
  const auto bits = raw(out, out.size());
  attn::Cuda<attn::Eager>::run_prefill<T>(a, segs, {gemm, S, P});
  CHECK(same_bits(bits, raw(out, out.size())));
  std::vector<float> ref(out.size());
  for (int r = 0; r < R; ++r)
    attn::Eager::cpu(attn::CpuArgs{q.data() + static_cast<std::size_t>(r) * q_dim, kh[seq[r]].data(), vh[seq[r]].data(), pos[r] + 1, nh, nkv,
                                   D, a.scale, ref.data() + static_cast<std::size_t>(r) * q_dim});
  const double e = rel_l2(got, ref);
  MESSAGE("attention eager prefill (cublasLt) " << dtype_name(dtype_of<T>()) << " nh " << nh << " nkv " << nkv << " D " << D << ": rel L2 " << e);
  // P is rounded to T before P.V (as Hugging Face's eager): one more rounding than the other attention paths.
  CHECK(e <= 2 * tolerance<T>());
}

template <class T>
void test_swiglu(std::uint32_t seed) {
  const int rows = 7, I = 768;
  std::vector<float> gu = randn(static_cast<std::size_t>(rows) * 2 * I, seed, 3.0f);
  const auto gut = round_to<T>(gu);
  auto d = to_device(gut);
  DeviceBuffer<T> a(static_cast<std::size_t>(rows) * I);
  poison(a);
  ops::swiglu<T>(d.get(), a.get(), rows, I);
  const auto got = to_host(a, a.size());
  std::vector<float> ref(a.size());
  for (int r = 0; r < rows; ++r)
    for (int i = 0; i < I; ++i) ref[r * I + i] = cpu::silu(gu[r * 2 * I + i]) * gu[r * 2 * I + I + i];
  const double e = rel_l2(got, ref);
  MESSAGE("swiglu " << dtype_name(dtype_of<T>()) << ": rel L2 " << e);
  CHECK(e <= tolerance<T>());
}

// ties: logits rounded to integers, so that many are equal (the lower id wins, as on the CPU).
template <class T>
void test_router(int E, int k, bool norm, std::uint32_t seed, bool ties = false) {
  CAPTURE(E);
  CAPTURE(k);
  CAPTURE(ties);
  const int rows = 9;
  std::vector<float> lg = randn(static_cast<std::size_t>(rows) * E, seed, 2.0f);
  if (ties)
    for (float& v : lg) v = std::round(v);
  const auto lgt = round_to<T>(lg);
  auto d = to_device(lgt);
  DeviceBuffer<std::int32_t> ids(static_cast<std::size_t>(rows) * k);
  DeviceBuffer<float> wts(static_cast<std::size_t>(rows) * k);
  ops::router<T>(d.get(), rows, E, k, norm, ids.get(), wts.get());
  FPF_CUDA(cudaDeviceSynchronize());
  const auto gi = ids.download(ids.size());
  const auto gw = wts.download(wts.size());
  std::vector<float> rw, gws;
  for (int r = 0; r < rows; ++r) {
    std::vector<float> p(lg.begin() + r * E, lg.begin() + (r + 1) * E);
    cpu::softmax(p.data(), p.size());
    std::vector<std::int32_t> top = cpu::topk_indices(p, k);
    std::vector<float> w;
    float sum = 0;
    for (auto t : top) sum += p[t], w.push_back(p[t]);
    if (norm)
      for (float& v : w) v /= sum;
    std::vector<std::size_t> order(k);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](auto a, auto b) { return top[a] < top[b]; });
    for (int s = 0; s < k; ++s) {
      CHECK(gi[r * k + s] == top[order[s]]);
      rw.push_back(w[order[s]]);
      gws.push_back(gw[r * k + s]);
    }
  }
  const double e = rel_l2(gws, rw);
  MESSAGE("router " << dtype_name(dtype_of<T>()) << " E " << E << " k " << k << std::string(norm ? " norm" : "") << ": weights rel L2 " << e);
  CHECK(e <= 1e-5);  // softmax and weights are fp32 whatever T
}

// The decode router in one launch (ops::router_gemv: logits as gemv, then the last block routes, or on sm_90 block 0
// of a cluster): logits, ids and weights bit-identical to gemv then router, for 1..8 rows and over repeated launches
// (the counter resets itself), with each kernel.
template <class T>
void test_router_gemv(int E, int k, int K, std::uint32_t seed) {
  std::vector<float> x = randn(static_cast<std::size_t>(8) * K, seed), w = randn(static_cast<std::size_t>(E) * K, seed + 1, 0.2f);
  auto dx = to_device(round_to<T>(x));
  auto dw = to_device(round_to<T>(w));
  DeviceBuffer<unsigned> counter(1);
  FPF_CUDA(cudaMemset(counter.get(), 0, sizeof(unsigned)));
  const bool cluster_default = ops::router_cluster_enabled();  // sm_90: k_router_cluster; both kernels are checked
  for (int M : {1, 3, 8})
  for (const bool cluster : {false, true}) {
    if (cluster && !cluster_default) continue;
    ops::router_cluster_enabled() = cluster;
    CAPTURE(M);
    CAPTURE(cluster);
    REQUIRE(ops::router_gemv_fits<T>(dx.get(), dw.get(), M, E, K, k));
    DeviceBuffer<T> la(static_cast<std::size_t>(M) * E), lb(static_cast<std::size_t>(M) * E);
    DeviceBuffer<std::int32_t> ia(static_cast<std::size_t>(M) * k), ib(static_cast<std::size_t>(M) * k);
    DeviceBuffer<float> wa(static_cast<std::size_t>(M) * k), wb(static_cast<std::size_t>(M) * k);
    ops::gemv<T>(dx.get(), M, dw.get(), E, K, la.get());
    ops::router<T>(la.get(), M, E, k, true, ia.get(), wa.get());
    for (int rep = 0; rep < 3; ++rep) {
      poison(lb);
      FPF_CUDA(cudaMemset(ib.get(), 0xff, ib.size() * sizeof(std::int32_t)));
      ops::router_gemv<T>(dx.get(), M, dw.get(), E, K, lb.get(), k, true, ib.get(), wb.get(), counter.get());
      FPF_CUDA(cudaDeviceSynchronize());
      CHECK(fpf::testing::bit_differences(to_host(lb, lb.size()), to_host(la, la.size())) == 0);
      CHECK(ib.download(ib.size()) == ia.download(ia.size()));
      CHECK(fpf::testing::bit_differences(wb.download(wb.size()), wa.download(wa.size())) == 0);
    }
  }
  ops::router_cluster_enabled() = cluster_default;
}

// route_row_warp (k_router_cluster's routing by one warp, in registers) against route_row (the block's) bit for bit,
// on one launch that runs both over the same logits.
__global__ void k_route_both(const float* lg, int E, int k, int norm, std::int32_t* ia, float* wa, std::int32_t* ib, float* wb) {
  extern __shared__ float p[];
  __shared__ ops::RouteSmem sm;
  const float* x = lg + static_cast<std::size_t>(blockIdx.x) * E;
  ops::route_row([&](int e) { return x[e]; }, E, k, norm, p, sm, ia + blockIdx.x * k, wa + blockIdx.x * k);
  if (threadIdx.x < 32) ops::route_row_warp([&](int e) { return x[e]; }, E, k, norm, ib + blockIdx.x * k, wb + blockIdx.x * k);
}

// Logits of four kinds: random; integers (many ties, the lower id wins); NaN entries (row 0 all NaN: every p is NaN,
// so every key ties); -inf, +-0 and -200 entries (p = 0 exactly after exp underflows: ties at zero).
void test_route_row_warp(std::uint32_t seed) {
  const int rows = 16;
  for (int E : {1, 7, 60, 128})
    for (int k : {1, 4, 8, 32}) {
      if (k > E) continue;
      for (int norm : {0, 1})
        for (int kind = 0; kind < 4; ++kind) {
          CAPTURE(E);
          CAPTURE(k);
          CAPTURE(norm);
          CAPTURE(kind);
          std::vector<float> lg = randn(static_cast<std::size_t>(rows) * E, seed + static_cast<std::uint32_t>(E * 64 + k), 3.0f);
          for (int r = 0; r < rows; ++r)
            for (int e = 0; e < E; ++e) {
              float& v = lg[static_cast<std::size_t>(r) * E + e];
              if (kind == 1) v = std::round(v);
              if (kind == 2 && (r == 0 || e % 5 == r % 5)) v = std::numeric_limits<float>::quiet_NaN();
              if (kind == 3 && e % 4 == r % 4) v = (e % 3 == 0) ? -std::numeric_limits<float>::infinity() : (e % 3 == 1) ? -200.0f : (r % 2 ? 0.0f : -0.0f);
            }
          auto d = to_device(lg);
          const std::size_t n = static_cast<std::size_t>(rows) * k;
          DeviceBuffer<std::int32_t> ia(n), ib(n);
          DeviceBuffer<float> wa(n), wb(n);
          FPF_CUDA(cudaMemset(ib.get(), 0xff, n * sizeof(std::int32_t)));
          FPF_CUDA(cudaMemset(wb.get(), 0xff, n * sizeof(float)));
          k_route_both<<<rows, 128, E * sizeof(float)>>>(d.get(), E, k, norm, ia.get(), wa.get(), ib.get(), wb.get());
          FPF_CUDA(cudaGetLastError());
          FPF_CUDA(cudaDeviceSynchronize());
          CHECK(ib.download(n) == ia.download(n));
          CHECK(fpf::testing::bit_differences(wb.download(n), wa.download(n)) == 0);
        }
    }
}

// ops::route_group against a host stable counting sort: every slot at its expert's start (or e * Mmax when padded)
// plus its rank among the earlier slots of the same expert; padding rows -1; offsets, Mmax and the choice.
void test_route_group(int P, int E, bool skewed, bool allow_pad, std::uint32_t seed) {
  std::mt19937 g(seed);
  std::vector<std::int32_t> ids(static_cast<std::size_t>(P));
  for (auto& id : ids) id = skewed && g() % 2 ? static_cast<std::int32_t>(g() % 3) : static_cast<std::int32_t>(g() % E);
  std::vector<int> cnt(static_cast<std::size_t>(E), 0);
  for (auto id : ids) ++cnt[static_cast<std::size_t>(id)];
  const int mx = *std::max_element(cnt.begin(), cnt.end());
  const bool pad = allow_pad && static_cast<long long>(E) * mx <= 2LL * P;
  std::vector<int> start(static_cast<std::size_t>(E) + 1, 0);
  for (int e = 0; e < E; ++e) start[e + 1] = start[e] + cnt[e];
  const int G = pad ? E * mx : P;
  std::vector<std::int32_t> rows(static_cast<std::size_t>(G), -1), slot_row(static_cast<std::size_t>(P));
  std::vector<int> seen(static_cast<std::size_t>(E), 0);
  for (int p = 0; p < P; ++p) {
    const int e = ids[p], at = (pad ? e * mx : start[e]) + seen[e]++;
    rows[at] = p, slot_row[p] = at;
  }
  DeviceBuffer<std::int32_t> d_ids(static_cast<std::size_t>(P)), d_rows(2 * static_cast<std::size_t>(P)),
      d_slot(static_cast<std::size_t>(P)), d_info(static_cast<std::size_t>(E) + 3);
  d_ids.upload(ids.data(), ids.size());
  for (int rep = 0; rep < 2; ++rep) {
    ops::route_group(d_ids.get(), P, E, d_rows.get(), d_slot.get(), d_info.get(), allow_pad);
    FPF_CUDA(cudaDeviceSynchronize());
    const auto gr = d_rows.download(static_cast<std::size_t>(G)), gs = d_slot.download(static_cast<std::size_t>(P));
    const auto gi = d_info.download(static_cast<std::size_t>(E) + 3);
    CHECK(gr == rows);
    CHECK(gs == slot_row);
    CHECK(std::vector<int>(gi.begin(), gi.begin() + E + 1) == start);
    CHECK(gi[static_cast<std::size_t>(E) + 1] == mx);
    CHECK(gi[static_cast<std::size_t>(E) + 2] == (pad ? 1 : 0));
  }
  MESSAGE("route_group P " << P << " E " << E << std::string(skewed ? " skewed" : "") << ": Mmax " << mx
                            << std::string(pad ? " padded" : " unpadded"));
}

template <class T>
void test_moe_gemv_combine(std::uint32_t seed) {
  const int R = 3, k = 4, E = 6, N = 96, K = 64;
  std::vector<float> x = randn(static_cast<std::size_t>(R) * K, seed), w = randn(static_cast<std::size_t>(E) * N * K, seed + 1, 0.1f);
  const auto xt = round_to<T>(x);
  const auto wt = round_to<T>(w);
  const std::vector<std::int32_t> ids{0, 2, 3, 5, 1, 2, 4, 5, 0, 1, 2, 3};
  auto dx = to_device(xt);
  auto dw = to_device(wt);
  auto di = to_device(ids);
  DeviceBuffer<T> y(static_cast<std::size_t>(R) * k * N);
  poison(y);
  ops::moe_gemv<T>(dx.get(), k, dw.get(), di.get(), R * k, N, K, y.get());
  const auto got = to_host(y, y.size());
  std::vector<float> ref(y.size());
  for (int p = 0; p < R * k; ++p) cpu::matvec(w.data() + static_cast<std::size_t>(ids[p]) * N * K, x.data() + (p / k) * K, ref.data() + p * N, N, K);
  const double e = rel_l2(got, ref);
  MESSAGE("moe_gemv " << dtype_name(dtype_of<T>()) << ": rel L2 " << e);
  CHECK(e <= tolerance<T>());
  // combine + residual: x_res[r] += sum_s wts * ye[slot] in slot order
  const int H = N;
  std::vector<float> res = randn(static_cast<std::size_t>(R) * H, seed + 5), wts = randn(static_cast<std::size_t>(R) * k, seed + 6, 0.3f);
  const auto rest = round_to<T>(res);
  auto dres = to_device(rest);
  auto dwts = to_device(wts);
  std::vector<float> yr = got;  // ye exactly as the device holds it
  ops::moe_combine<T>(dres.get(), y.get(), nullptr, dwts.get(), R, k, H);
  const auto gotc = to_host(dres, res.size());
  std::vector<float> refc(res.size());
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < H; ++j) {
      float acc = 0;
      for (int s = 0; s < k; ++s) acc += yr[(r * k + s) * H + j] * wts[r * k + s];
      refc[r * H + j] = res[r * H + j] + to_host_f(to_t<T>(acc));
    }
  const double ec = rel_l2(gotc, refc);
  MESSAGE("moe_combine " << dtype_name(dtype_of<T>()) << ": rel L2 " << ec);
  CHECK(ec <= tolerance<T>());
}

template <class T>
void test_log_softmax_topk(long long V, int topk, std::uint32_t seed) {
  const int rows = 3;
  std::vector<float> lg = randn(static_cast<std::size_t>(rows * V), seed, 4.0f);
  if (V > 7) lg[5] = lg[7] = 30.0f;  // a tie at the top: the lower id first
  const auto lgt = round_to<T>(lg);
  auto d = to_device(lgt);
  DeviceBuffer<std::int32_t> ids(static_cast<std::size_t>(rows) * topk), am(rows);
  DeviceBuffer<float> lp(static_cast<std::size_t>(rows) * topk);
  ops::LsmScratch scratch;
  ops::log_softmax_topk<T>(d.get(), rows, V, topk, ids.get(), lp.get(), am.get(), scratch);
  FPF_CUDA(cudaDeviceSynchronize());
  const auto gi = ids.download(ids.size());
  const auto gl = lp.download(lp.size());
  const auto ga = am.download(rows);
  std::vector<float> rl, gls;
  for (int r = 0; r < rows; ++r) {
    taps::PositionSignals ps;
    taps::set_logits(ps, std::span<const float>(lg.data() + r * V, static_cast<std::size_t>(V)), topk);
    CHECK(ga[r] == ps.argmax);
    for (int s = 0; s < topk; ++s) {
      if (s >= static_cast<int>(ps.logprobs.token_ids.size())) {  // top-k past the vocabulary: id 0x7fffffff, -inf
        CHECK(gi[r * topk + s] == 0x7fffffff);
        CHECK((std::isinf(gl[r * topk + s]) && gl[r * topk + s] < 0));
        continue;
      }
      CHECK(gi[r * topk + s] == ps.logprobs.token_ids[s]);
      rl.push_back(ps.logprobs.log_probs[s]);
      gls.push_back(gl[r * topk + s]);
    }
  }
  const double e = rel_l2(gls, rl);
  MESSAGE("log_softmax_topk " << dtype_name(dtype_of<T>()) << " V " << V << ": rel L2 " << e);
  CHECK(e <= 1e-5);  // computed in fp32/double from the logits as stored
}

// ops::copy_words both ways between page-locked host memory and the device (a decode graph's upload and read-back).
void test_copy_words(std::size_t n) {
  HostBuffer<std::uint32_t> up, back;
  up.reserve(n);
  back.reserve(n);
  for (std::size_t i = 0; i < n; ++i) up.get()[i] = static_cast<std::uint32_t>(i * 2654435761u + 12345u), back.get()[i] = 0u;
  DeviceBuffer<std::uint32_t> d(n);
  ops::copy_words(up.get(), d.get(), n, 0);
  ops::copy_words(d.get(), back.get(), n, 0);
  FPF_CUDA(cudaDeviceSynchronize());
  const auto on_device = d.download(n);
  std::size_t bad_device = 0, bad_back = 0;
  for (std::size_t i = 0; i < n; ++i) {
    bad_device += on_device[i] != up.get()[i] ? 1 : 0;
    bad_back += back.get()[i] != up.get()[i] ? 1 : 0;
  }
  CHECK(bad_device == 0);
  CHECK(bad_back == 0);
}

template <class T>
void all_ops(std::uint32_t seed) {
  test_rmsnorm<T>(5, 2048, seed);
  test_rmsnorm<T>(3, 48, seed + 1);
  for (int M : {1, 3, 8}) test_linear<T>(M, 1536, 2048, seed + 2 + M, false);
  test_linear<T>(5, 100, 48, seed + 20, false);  // unaligned rows: the scalar GEMV path
  test_linear<T>(37, 512, 2048, seed + 21, false);
  test_linear<T>(12, 96, 48, seed + 22, false);
  test_linear<T>(3, 64, 32, seed + 23, true);
  test_qk_norm_rope<T>(seed + 30);
  test_attention<attn::Eager, T>(8, 2, 128, seed + 40);
  test_attention<attn::Flash<16>, T>(8, 2, 128, seed + 41);
  test_attention<attn::Flash<4>, T>(4, 1, 16, seed + 42);
  test_attention<attn::Eager, T>(4, 4, 8, seed + 43);
  test_attention<attn::Eager, T>(8, 2, 128, seed + 44, true);
  test_attention<attn::Flash<16>, T>(8, 2, 128, seed + 45, true);
  test_attention<attn::Flash<4>, T>(4, 1, 16, seed + 46, true);
  test_attention<attn::Flash<12>, T>(4, 2, 64, seed + 47, true);
  test_attention<attn::Eager, T>(4, 4, 8, seed + 48, true);
  test_flash_prefill<T>(32, 4, 128, seed + 52);
  test_flash_prefill<T>(8, 2, 64, seed + 53);
  test_flash_prefill<T>(4, 2, 16, seed + 54);
  test_eager_gemm<T>(8, 2, 128, seed + 49);
  test_eager_gemm<T>(4, 2, 16, seed + 51);
  test_swiglu<T>(seed + 50);
  test_router<T>(128, 8, true, seed + 60);
  test_router<T>(6, 3, false, seed + 61);
  test_router<T>(128, 8, true, seed + 62, true);
  test_router<T>(256, 8, true, seed + 63, true);
  test_router<T>(200, 64, false, seed + 64, true);  // the most picks the CUDA router takes
  test_router<T>(45, 45, true, seed + 65);          // every expert picked
  test_router_gemv<T>(128, 8, 2048, seed + 66);
  test_router_gemv<T>(60, 4, 64, seed + 67);
  if constexpr (std::is_same_v<T, float>) {
    test_route_row_warp(seed + 68);
    for (bool pad : {true, false}) {
      test_route_group(48000, 128, false, pad, seed + 62);
      test_route_group(1000, 128, true, pad, seed + 63);
      test_route_group(37, 6, false, pad, seed + 64);
      test_route_group(5, 4, false, pad, seed + 65);
    }
  }
  test_moe_gemv_combine<T>(seed + 70);
  test_log_softmax_topk<T>(151936, 10, seed + 80);
  test_log_softmax_topk<T>(384, 10, seed + 81);
  test_log_softmax_topk<T>(6, 9, seed + 83);  // fewer logits than picks
  // 256 picks over the vocabulary: the final kernel's lists no longer fit its shared memory (the global-memory merge)
  if constexpr (std::is_same_v<T, float>) test_log_softmax_topk<T>(151936, 256, seed + 82);
}

}  // namespace

TEST_CASE("cuda ops fp32 match the CPU reference within 1e-5") { all_ops<float>(1000); }
TEST_CASE("copy_words moves words between page-locked host memory and the device") {
  for (std::size_t n : {std::size_t{1}, std::size_t{1000}, std::size_t{300001}}) test_copy_words(n);
}
TEST_CASE("cuda ops bf16 match the CPU reference within the bf16 unit roundoff") { all_ops<bf16>(2000); }
TEST_CASE("cuda ops fp16 match the CPU reference within the fp16 unit roundoff") { all_ops<fp16>(3000); }
