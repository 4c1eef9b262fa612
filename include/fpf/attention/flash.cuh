#pragma once
// attn::Flash<Bc> on the GPU: the same algorithm as Flash<Bc>::cpu: the keys in tiles of Bc with an online
// softmax (running max m, running sum l, output rescaled by exp(m_old - m_new) when the max grows), normalized
// once at the end. One warp per (query row, head): lane j scores key j of a tile (Bc <= 32), lane i owns output
// dims i, i + 32, ...; the tile's sum uses one fixed butterfly order and keys are accumulated in index order.
#include <fpf/attention/attention.hpp>
#include <fpf/attention/cuda_args.cuh>

namespace fpf::attn {

namespace detail {

// Without split: one warp walks all keys and writes the normalized output. With split (Split = true): warp z walks
// keys [z * chunk, (z + 1) * chunk) (chunk a multiple of Bc, so the tiles are the same) and writes its unnormalized
// output with its running max and sum; k_flash_combine merges the chunks in order.
template <class T, int Bc, int DR, bool Split = false>
__global__ void k_flash(CudaArgs<T> a) {
  __shared__ float qs[DR * 32];
  const int D = a.head_dim, r = blockIdx.x, h = blockIdx.y, lane = threadIdx.x;
  const int kvh = h / (a.num_heads / a.num_kv_heads), kv_stride = a.num_kv_heads * D;
  const int n_all = a.row_pos[r] + 1;
  constexpr int chunk = (kSplitKeys + Bc - 1) / Bc * Bc;
  const int j_begin = Split ? static_cast<int>(blockIdx.z) * chunk : 0;
  const int n = Split ? min(n_all, j_begin + chunk) : n_all;
  const T* q = a.q + static_cast<std::size_t>(r) * a.q_stride + h * D;
  const T* K = a.kcache[a.row_seq[r]] + kvh * D;
  const T* V = a.vcache[a.row_seq[r]] + kvh * D;
  for (int d = lane; d < D; d += 32) qs[d] = cuda::to_f(q[d]);
  __syncwarp();
  constexpr int Vn = cuda::ops::Vec<T>::n;
  float acc[DR];
#pragma unroll
  for (int i = 0; i < DR; ++i) acc[i] = 0.0f;
  float m = -INFINITY, l = 0.0f;
  for (int j0 = j_begin; j0 < n; j0 += Bc) {
    const int nb = min(Bc, n - j0);
    float s = -INFINITY;
    if (lane < nb) {
      const auto* kr = reinterpret_cast<const cuda::ops::Vec<T>*>(K + static_cast<std::size_t>(j0 + lane) * kv_stride);
      float d0 = 0.0f;
      for (int c = 0; c < D / Vn; ++c) {
        const cuda::ops::Vec<T> kv = kr[c];
#pragma unroll
        for (int i = 0; i < Vn; ++i) d0 += qs[c * Vn + i] * cuda::to_f(kv.v[i]);
      }
      s = d0 * a.scale;
    }
    const float m_new = fmaxf(m, cuda::warp_max(s));
    const float corr = expf(m - m_new);
    const float p = lane < nb ? expf(s - m_new) : 0.0f;
    l = l * corr + cuda::warp_sum(p);
#pragma unroll
    for (int i = 0; i < DR; ++i) acc[i] *= corr;
    for (int jj = 0; jj < nb; ++jj) {
      const float pj = __shfl_sync(0xffffffffu, p, jj);
      const T* vr = V + static_cast<std::size_t>(j0 + jj) * kv_stride;
#pragma unroll
      for (int i = 0; i < DR; ++i)
        if (lane + 32 * i < D) acc[i] += pj * cuda::to_f(vr[lane + 32 * i]);
    }
    m = m_new;
  }
  if constexpr (Split) {
    const std::size_t rh = static_cast<std::size_t>(r) * a.num_heads + h;
    float* part = a.scratch + (rh * gridDim.z + blockIdx.z) * (D + 2);
#pragma unroll
    for (int i = 0; i < DR; ++i)
      if (lane + 32 * i < D) part[lane + 32 * i] = acc[i];
    if (lane == 0) part[D] = m, part[D + 1] = l;  // m = -inf, l = 0 for a chunk past the row's keys
    return;
  }
  const float inv_l = 1.0f / l;
  T* o = a.out + static_cast<std::size_t>(r) * a.num_heads * D + h * D;
#pragma unroll
  for (int i = 0; i < DR; ++i)
    if (lane + 32 * i < D) o[lane + 32 * i] = cuda::from_f<T>(acc[i] * inv_l);
}

// Merges the chunks of one (row, head) in chunk order: m = max m_c, l = sum l_c e^(m_c - m),
// out = sum acc_c e^(m_c - m) / l.
template <class T>
__global__ void k_flash_combine(CudaArgs<T> a, int chunks) {
  const int D = a.head_dim, r = blockIdx.x, h = blockIdx.y;
  const std::size_t rh = static_cast<std::size_t>(r) * a.num_heads + h;
  const float* part = a.scratch + rh * chunks * (D + 2);
  float m = -INFINITY;
  for (int c = 0; c < chunks; ++c) m = fmaxf(m, part[static_cast<std::size_t>(c) * (D + 2) + D]);
  float l = 0.0f;
  for (int c = 0; c < chunks; ++c) {
    const float* pc = part + static_cast<std::size_t>(c) * (D + 2);
    if (pc[D + 1] > 0.0f) l += pc[D + 1] * expf(pc[D] - m);
  }
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.0f;
    for (int c = 0; c < chunks; ++c) {
      const float* pc = part + static_cast<std::size_t>(c) * (D + 2);
      if (pc[D + 1] > 0.0f) acc += pc[d] * expf(pc[D] - m);
    }
    a.out[rh * D + d] = cuda::from_f<T>(acc / l);
  }
}

}  // namespace detail

template <int Bc>
struct Cuda<Flash<Bc>> {
  static_assert(Bc <= 32, "the CUDA flash kernel scores one tile per warp: Bc <= 32");
  template <class T>
  static void run(const CudaArgs<T>& a, cudaStream_t s = 0) {
    if (a.rows == 0) return;
    if (a.head_dim % 8 != 0 || a.head_dim > 256)
      throw Error("config.json: head_dim", "the CUDA attention kernels need a multiple of 8, at most 256");
    const dim3 grid(a.rows, a.num_heads);
    if (a.scratch && a.rows <= kSplitMaxRows) {
      constexpr int chunk = (kSplitKeys + Bc - 1) / Bc * Bc;
      const int chunks = (a.max_keys + chunk - 1) / chunk;
      const dim3 g3(a.rows, a.num_heads, chunks);
      if (a.head_dim <= 32) detail::k_flash<T, Bc, 1, true><<<g3, 32, 0, s>>>(a);
      else if (a.head_dim <= 128) detail::k_flash<T, Bc, 4, true><<<g3, 32, 0, s>>>(a);
      else detail::k_flash<T, Bc, 8, true><<<g3, 32, 0, s>>>(a);
      detail::k_flash_combine<T><<<grid, 32, 0, s>>>(a, chunks);
      FPF_CUDA_LAUNCH("attention flash (split keys)");
      return;
    }
    if (a.head_dim <= 32) detail::k_flash<T, Bc, 1><<<grid, 32, 0, s>>>(a);
    else if (a.head_dim <= 128) detail::k_flash<T, Bc, 4><<<grid, 32, 0, s>>>(a);
    else detail::k_flash<T, Bc, 8><<<grid, 32, 0, s>>>(a);
    FPF_CUDA_LAUNCH("attention flash");
  }
};

}  // namespace fpf::attn
