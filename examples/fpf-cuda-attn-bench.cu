// fpf-cuda-attn-bench: times the CUDA attention kernels alone at the real shape (32 query heads, 4 KV heads, head_dim
// 128, bf16): a prefill of --keys rows of one sequence, and a decode row against --keys cached keys.
//   fpf-cuda-attn-bench [--keys 6000] [--reps 5]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <fpf/attention/cuda.cuh>

using namespace fpf;
using T = cuda::bf16;

template <class P>
double time_ms(attn::CudaArgs<T> a, int reps) {
  attn::Cuda<P>::template run<T>(a);
  FPF_CUDA(cudaDeviceSynchronize());
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    attn::Cuda<P>::template run<T>(a);
    FPF_CUDA(cudaDeviceSynchronize());
    t.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

int main(int argc, char** argv) {
  int keys = 6000, reps = 5;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    if (k == "--keys") keys = std::atoi(argv[i + 1]);
    else if (k == "--reps") reps = std::atoi(argv[i + 1]);
    else { std::fprintf(stderr, "usage: fpf-cuda-attn-bench [--keys N] [--reps N]\n"); return 2; }
  }
  const int nh = 32, nkv = 4, D = 128, q_dim = nh * D, kv_dim = nkv * D;
  cuda::DeviceBuffer<T> q(static_cast<std::size_t>(keys) * q_dim), kc(static_cast<std::size_t>(keys) * kv_dim),
      vc(static_cast<std::size_t>(keys) * kv_dim), out(static_cast<std::size_t>(keys) * q_dim);
  std::vector<T> h(static_cast<std::size_t>(keys) * q_dim);
  std::uint64_t s = 1;
  for (auto& x : h) s = s * 6364136223846793005ull + 1, x = __float2bfloat16(static_cast<float>((s >> 40) % 2001) / 1000.0f - 1.0f);
  q.upload(h.data(), h.size());
  kc.upload(h.data(), kc.size());
  vc.upload(h.data() + 7, vc.size());
  std::vector<std::int32_t> seq(keys, 0), pos(keys);
  for (int i = 0; i < keys; ++i) pos[i] = i;
  cuda::DeviceBuffer<std::int32_t> dseq(keys), dpos(keys), dlast(1);
  dseq.upload(seq.data(), keys);
  dpos.upload(pos.data(), keys);
  const std::int32_t last = keys - 1;
  dlast.upload(&last, 1);
  T* kp = kc.get();
  T* vp = vc.get();
  cuda::DeviceBuffer<T*> kt(1), vt(1);
  kt.upload(&kp, 1);
  vt.upload(&vp, 1);
  cuda::DeviceBuffer<float> scratch(attn::split_scratch_floats(1, nh, D, keys));
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
  const double pe = time_ms<attn::Eager>(a, reps), pf = time_ms<attn::Flash<>>(a, reps);
  attn::CudaArgs<T> d = a;
  d.rows = 1;
  d.row_pos = dlast.get();
  d.scratch = scratch.get();
  const double de = time_ms<attn::Eager>(d, reps * 10), df = time_ms<attn::Flash<>>(d, reps * 10);
  const double flops = 4.0 * nh * D * (static_cast<double>(keys) * (keys + 1) / 2);
  std::printf("attention bf16 32/4 heads x 128, %d keys: prefill eager %.2f ms, flash %.2f ms (%.1f / %.1f TFLOP/s); decode "
              "eager %.1f us, flash %.1f us (KV read %.1f MB -> %.0f / %.0f GB/s)\n",
              keys, pe, pf, flops / pe / 1e9, flops / pf / 1e9, de * 1e3, df * 1e3, 2.0 * keys * kv_dim * 2 / 1e6,
              2.0 * keys * kv_dim * 2 / de / 1e6, 2.0 * keys * kv_dim * 2 / df / 1e6);
  return 0;
}
