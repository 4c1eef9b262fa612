#pragma once
// attn::Flash decode on the GPU (flash-decoding): few query rows, long caches. Each row's keys are cut into chunks of
// C = flash_chunk_keys(Bc) keys; one block per (row, KV head, chunk) computes, for each of the G query heads of the
// GQA group (one warp per head), the chunk's online softmax exactly as Flash<Bc>::cpu walks it: tiles of Bc keys,
// m_new = max(m, tile max), corr = exp(m - m_new), l = l * corr + sum p, acc = acc * corr + sum p v, keys in index
// order. The chunk's (acc, m, l) go to scratch; k_flash_merge then combines a row's chunks in chunk order.
//
// Layout of one block, chosen for bandwidth (the whole KV cache is read once per step):
//  - the chunk's K and V rows are copied to shared memory with cp.async by all threads at once (K first, so the
//    scores can start while V is still in flight); K rows are padded by 16 bytes, so the 8 lanes of a 16-byte
//    shared-memory phase read 8 different bank groups;
//  - scores: lane j of warp g takes keys j, j + 32, ... of the chunk, each a sequential dot product (two partial
//    sums over alternating 16-byte pieces, added at the end) with q_g (fp32, in shared memory);
//  - the tile maxima and p = exp(s - M_tile) are written to shared memory once per warp; then lane i accumulates
//    dims [DPL i, DPL i + DPL) of p V, reading each p as a broadcast.
// Nothing is atomic and no order depends on timing: repetitions are bit-identical.
#include <cstddef>

#include <fpf/attention/cuda_args.cuh>

namespace fpf::attn::detail {

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Shared memory of k_flash_decode: q (fp32) [G, D], scores/probabilities [G, C], running maxima [G, tiles + 1]
// (padded to 16 bytes), K [C, D + Vn], V [C, D].
template <class T>
__host__ __device__ constexpr std::size_t flash_decode_floats(int G, int D, int C, int tiles) {
  return (static_cast<std::size_t>(G) * (D + C + tiles + 1) + 3) / 4 * 4;  // K starts 16-byte aligned
}
template <class T>
constexpr std::size_t flash_decode_smem(int G, int D, int C, int tiles) {
  return flash_decode_floats<T>(G, D, C, tiles) * sizeof(float) +
         static_cast<std::size_t>(C) * (2 * D + static_cast<int>(16 / sizeof(T))) * sizeof(T);
}

template <class T, int Bc, int C, int DPL, bool Full>
__global__ void __launch_bounds__(1024) k_flash_decode(CudaArgs<T> a) {
  static_assert(C % Bc == 0, "a chunk is whole tiles");
  constexpr int Vn = cuda::ops::Vec<T>::n, tiles = C / Bc, KPL = (C + 31) / 32;
  extern __shared__ __align__(16) float smem[];
  const int D = a.head_dim, r = blockIdx.x, kvh = blockIdx.y;
  const int G = blockDim.x >> 5, w = threadIdx.x >> 5, lane = threadIdx.x & 31, h = kvh * G + w;
  const int n = a.row_pos[r] + 1, j0 = static_cast<int>(blockIdx.z) * C;
  if (j0 >= n) return;  // past the row's keys (the cache's capacity sizes the grid): k_flash_merge skips it
  const int nb = min(C, n - j0), KS = D + Vn, vec_per_row = D / Vn;
  float* qs = smem;
  float* Ss = qs + G * D;
  float* Ms = Ss + G * C;
  T* Ks = reinterpret_cast<T*>(smem + flash_decode_floats<T>(G, D, C, tiles));
  T* Vs = Ks + C * KS;
  const std::size_t kv_stride = static_cast<std::size_t>(a.num_kv_heads) * D;
  const T* K = a.kcache[a.row_seq[r]] + kvh * D + static_cast<std::size_t>(j0) * kv_stride;
  const T* V = a.vcache[a.row_seq[r]] + kvh * D + static_cast<std::size_t>(j0) * kv_stride;
  for (int i = threadIdx.x; i < nb * vec_per_row; i += blockDim.x) {
    const int row = i / vec_per_row, c = i % vec_per_row;
    cp_async16(Ks + row * KS + c * Vn, K + row * kv_stride + c * Vn);
  }
  cp_async_commit();
  for (int i = threadIdx.x; i < nb * vec_per_row; i += blockDim.x) {
    const int row = i / vec_per_row, c = i % vec_per_row;
    cp_async16(Vs + row * D + c * Vn, V + row * kv_stride + c * Vn);
  }
  cp_async_commit();
  const T* q = a.q + static_cast<std::size_t>(r) * a.q_stride + static_cast<std::size_t>(h) * D;
  float* qw = qs + w * D;
  for (int d = lane; d < D; d += 32) qw[d] = cuda::to_f(q[d]);
  cp_async_wait<1>();  // K has landed
  __syncthreads();

  // ---- scores s_j = (q . k_j) * scale; -inf past the row's keys ----
  float* sw = Ss + w * C;
  {
    float part[KPL][2];
#pragma unroll
    for (int u = 0; u < KPL; ++u) part[u][0] = part[u][1] = 0.0f;
    for (int c = 0; c < vec_per_row; c += 2) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        if (c + half >= vec_per_row) break;
        float qv[Vn];
#pragma unroll
        for (int i = 0; i < Vn; ++i) qv[i] = qw[(c + half) * Vn + i];
#pragma unroll
        for (int u = 0; u < KPL; ++u) {
          const int j = lane + 32 * u;
          if (j < nb) {
            const cuda::ops::Vec<T> kv = *reinterpret_cast<const cuda::ops::Vec<T>*>(Ks + j * KS + (c + half) * Vn);
#pragma unroll
            for (int i = 0; i < Vn; ++i) part[u][half] += qv[i] * cuda::to_f(kv.v[i]);
          }
        }
      }
    }
#pragma unroll
    for (int u = 0; u < KPL; ++u) {
      const int j = lane + 32 * u;
      if (j < C) sw[j] = j < nb ? (part[u][0] + part[u][1]) * a.scale : -INFINITY;
    }
  }
  __syncwarp();
  // ---- running maxima after each tile (every lane walks the same scores in the same order) ----
  float* mw = Ms + w * (tiles + 1);
  {
    float m = -INFINITY;
    for (int t = 0; t * Bc < nb; ++t) {
      float tm = -INFINITY;
#pragma unroll 4
      for (int jj = 0; jj < Bc; ++jj) tm = fmaxf(tm, sw[t * Bc + jj]);
      m = fmaxf(m, tm);
      if (lane == 0) mw[t] = m;
    }
  }
  __syncwarp();
#pragma unroll
  for (int u = 0; u < KPL; ++u) {
    const int j = lane + 32 * u;
    if (j < C) sw[j] = j < nb ? expf(sw[j] - mw[j / Bc]) : 0.0f;
  }
  cp_async_wait<0>();  // V has landed
  __syncthreads();

  // ---- acc = sum_j p_j v_j tile by tile, rescaled when the running max grows ----
  const int d0 = lane * DPL;
  float acc[DPL];
#pragma unroll
  for (int i = 0; i < DPL; ++i) acc[i] = 0.0f;
  float l = 0.0f, m_prev = -INFINITY;
  for (int t = 0; t * Bc < nb; ++t) {
    const float mt = mw[t];
    const float corr = expf(m_prev - mt);  // 0 on the first tile
    l *= corr;
#pragma unroll
    for (int i = 0; i < DPL; ++i) acc[i] *= corr;
    const int je = min(Bc, nb - t * Bc);
#pragma unroll 4
    for (int jj = 0; jj < je; ++jj) {
      const int j = t * Bc + jj;
      const float p = sw[j];
      l += p;
      const T* vr = Vs + j * D + d0;
      if constexpr (Full && (DPL * sizeof(T) == 8 || DPL * sizeof(T) == 16)) {
        struct alignas(DPL * sizeof(T)) Row {
          T v[DPL];
        };
        const Row vv = *reinterpret_cast<const Row*>(vr);
#pragma unroll
        for (int i = 0; i < DPL; ++i) acc[i] += p * cuda::to_f(vv.v[i]);
      } else {
#pragma unroll
        for (int i = 0; i < DPL; ++i)
          if (Full || d0 + i < D) acc[i] += p * cuda::to_f(vr[i]);
      }
    }
    m_prev = mt;
  }
  const std::size_t rh = static_cast<std::size_t>(r) * a.num_heads + h;
  const int chunks = static_cast<int>(gridDim.z);
  float* part = a.scratch + (rh * chunks + blockIdx.z) * (D + 2);
#pragma unroll
  for (int i = 0; i < DPL; ++i)
    if (Full || d0 + i < D) part[d0 + i] = acc[i];
  if (lane == 0) part[D] = m_prev, part[D + 1] = l;
}

// Merges the chunks of one (row, head) that hold keys, in a fixed order: m = max m_c, w_c = exp(m_c - m),
// l = sum l_c w_c (per-thread sums, then block_sum's fixed tree), out_d = (sum_c acc_c,d w_c) / l where warp g sums
// the chunks c = g, g + nw, ... in increasing c and the warps' sums are added in warp order. Two passes over the
// scratch: (m_c, l_c) into shared memory, then the outputs, with every load of a pass independent of the others.
template <class T>
__global__ void k_flash_merge(CudaArgs<T> a, int chunks, int C) {
  extern __shared__ float sm[];  // [used] m_c, then w_c; [used] l_c; [nw, D] the warps' sums
  __shared__ float red[32];
  const int D = a.head_dim, r = blockIdx.x, h = blockIdx.y;
  const int nw = blockDim.x >> 5, w = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int used = (a.row_pos[r] + 1 + C - 1) / C;
  const std::size_t rh = static_cast<std::size_t>(r) * a.num_heads + h;
  const float* part = a.scratch + rh * chunks * (D + 2);
  float* wts = sm;
  float* ls = sm + chunks;
  float* partial = ls + chunks;
  float m = -INFINITY;
  for (int c = threadIdx.x; c < used; c += blockDim.x) {
    const float mc = part[static_cast<std::size_t>(c) * (D + 2) + D];
    wts[c] = mc;
    ls[c] = part[static_cast<std::size_t>(c) * (D + 2) + D + 1];
    m = fmaxf(m, mc);
  }
  m = cuda::block_max(m, red);
  float l = 0.0f;
  for (int c = threadIdx.x; c < used; c += blockDim.x) {
    const float wc = expf(wts[c] - m);
    wts[c] = wc;
    l += ls[c] * wc;
  }
  l = cuda::block_sum(l, red);  // its __syncthreads also publishes wts
  float acc[8];  // dims lane + 32 i (head_dim <= 256), each summed over the warp's chunks in increasing c
#pragma unroll
  for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
#pragma unroll 4
  for (int c = w; c < used; c += nw) {
    const float* pc = part + static_cast<std::size_t>(c) * (D + 2);
    const float wc = wts[c];
#pragma unroll
    for (int i = 0; i < 8; ++i)
      if (lane + 32 * i < D) acc[i] += pc[lane + 32 * i] * wc;
  }
#pragma unroll
  for (int i = 0; i < 8; ++i)
    if (lane + 32 * i < D) partial[w * D + lane + 32 * i] = acc[i];
  __syncthreads();
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.0f;
    for (int g = 0; g < nw; ++g) acc += partial[g * D + d];
    a.out[rh * D + d] = cuda::from_f<T>(acc / l);
  }
}

// Launches the split and the merge; returns false (nothing launched) where the block's shared memory would not fit,
// so the caller takes the whole-row kernel.
template <class T, int Bc, int C = flash_chunk_keys(Bc)>
bool launch_flash_decode(const CudaArgs<T>& a, cudaStream_t s) {
  const int G = a.num_heads / a.num_kv_heads, D = a.head_dim;
  const std::size_t smem = flash_decode_smem<T>(G, D, C, C / Bc);
  static const int max_optin = [] {
    int v = 0, dev = 0;
    FPF_CUDA(cudaGetDevice(&dev));
    FPF_CUDA(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    return v;
  }();
  if (smem > static_cast<std::size_t>(max_optin)) return false;
  const int chunks = static_cast<int>((a.max_keys + C - 1) / C);
  auto go = [&]<int DPL, bool Full>() {
    auto* k = k_flash_decode<T, Bc, C, DPL, Full>;
    if (smem > 48 * 1024) FPF_CUDA(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    k<<<dim3(a.rows, a.num_kv_heads, chunks), 32 * G, smem, s>>>(a);
  };
  if (D == 32) go.template operator()<1, true>();
  else if (D < 32) go.template operator()<1, false>();
  else if (D == 64) go.template operator()<2, true>();
  else if (D < 64) go.template operator()<2, false>();
  else if (D == 128) go.template operator()<4, true>();
  else if (D < 128) go.template operator()<4, false>();
  else if (D == 256) go.template operator()<8, true>();
  else go.template operator()<8, false>();
  constexpr int kMergeThreads = 256;
  const std::size_t msmem = (2 * static_cast<std::size_t>(chunks) + (kMergeThreads / 32) * D) * sizeof(float);
  if (msmem > 48 * 1024)
    FPF_CUDA(cudaFuncSetAttribute(k_flash_merge<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(msmem)));
  k_flash_merge<T><<<dim3(a.rows, a.num_heads), kMergeThreads, msmem, s>>>(a, chunks, C);
  return true;
}

}  // namespace fpf::attn::detail
