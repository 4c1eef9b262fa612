#pragma once
// attn::Flash decode on the GPU (flash-decoding): few query rows, long caches. Each row's keys are cut into chunks of
// C = flash_chunk_keys(Bc) keys; one block per (row, KV head, chunk) computes, for each of the G query heads of the
// GQA group, the chunk's online softmax exactly as Flash<Bc>::cpu walks it: tiles of Bc keys, m_new = max(m, tile
// max), corr = exp(m - m_new), l = l * corr + sum p, acc = acc * corr + sum p v, keys in index order. The chunk's
// (acc, m, l) go to scratch; k_flash_merge then combines a row's chunks in chunk order.
// Two split kernels: k_flash_decode_tc on tensor cores (bf16/fp16, Bc = 16, head_dim 64/128, G <= 16; below) and
// k_flash_decode (SIMT, one warp per query head; everything else).
//
// Layout of one k_flash_decode block, chosen for bandwidth (the whole KV cache is read once per step):
//  - the chunk's K and V rows are copied to shared memory with cp.async by all threads at once (K first, so the
//    scores can start while V is still in flight); K rows are padded by 16 bytes, so the 8 lanes of a 16-byte
//    shared-memory phase read 8 different bank groups;
//  - scores: lane j of warp g takes keys j, j + 32, ... of the chunk, each a sequential dot product (two partial
//    sums over alternating 16-byte pieces, added at the end) with q_g (fp32, in shared memory);
//  - the tile maxima and p = exp(s - M_tile) are written to shared memory once per warp; then lane i accumulates
//    dims [DPL i, DPL i + DPL) of p V, reading each p as a broadcast.
// Nothing is atomic and no order depends on timing: repetitions are bit-identical.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

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

// Tensor-core building blocks (raw PTX, sm_80+), shared with k_flash_tc (flash.cuh).
__device__ __forceinline__ void tc_cp_async16(void* dst, const void* src, bool valid) {  // zero-fills when !valid
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void tc_ldsm_x4(std::uint32_t (&r)[4], const void* p) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}
__device__ __forceinline__ void tc_ldsm_x4_t(std::uint32_t (&r)[4], const void* p) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}
// c += a b: A 16x16 (row), B 16x8 (col), C 16x8 fp32.
template <class T>
__device__ __forceinline__ void tc_mma(float (&c)[4], const std::uint32_t (&a)[4], std::uint32_t b0, std::uint32_t b1) {
  if constexpr (std::is_same_v<T, cuda::bf16>)
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
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
  cuda::pdl_begin();
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

// ---- Tensor-core split kernel (bf16/fp16, Bc = 16, head_dim 64 or 128, up to 16 query heads per KV head) ----
// Same grid, numerics contract and scratch as k_flash_decode: one block per (row, KV head, chunk of C keys), each
// query head's (acc, m, l) of the chunk to part[(rh * chunks + chunk) * (D + 2)], acc unnormalized. The SIMT kernel
// has every head-warp read the whole K and V tile from shared memory; here the GQA group is the n dimension of
// mma.sync m16n8k16 (T operands, fp32 accumulation), so K and V are read from shared memory once. C / 16 warps.
//  - Loads: the group's G query rows are read into registers first (their loads return before the chunk's), then
//    all of K (one cp.async group) and all of V (a second group), rows padded by 16 bytes (conflict-free ldmatrix);
//    every row past the row's last key is zero-filled, never read from the cache (NaN there cannot leak); Q goes to
//    shared memory as T, padded with zero heads to 8 NT (NT n-tiles of 8 heads). Scores start once K has landed.
//  - Scores S^T = K Q^T: warp w owns key tile w (keys 16w .. 16w + 15: one Bc tile), A = K (ldmatrix), B = Q^T
//    (ldmatrix of the [head, dim] rows); even and odd 16-dim steps in two accumulators, added at the end;
//    s = (q.k) * scale, -inf past the row's last key. Thread (g, t) = (lane / 4, lane % 4) holds keys g, g + 8 of
//    heads 2t, 2t + 1 of each n-tile.
//  - Online softmax per head, tiles in key order: the tile max (a fixed butterfly over the 8 lanes that hold a head)
//    goes to shared memory; then M_w = max(tile max 0 .. w) (the running max after tile w, as the sequential walk
//    has it: max is exact), p = exp(s - M_w) in fp32, the tile's sum of p (the thread's two keys, then a fixed
//    butterfly), and p as two T values, hi = T(p), lo = T(p - hi) (hi + lo carries p to ~16 bits, so P V loses
//    nothing measurable against the SIMT kernel's fp32 p). A tile wholly past the row's keys has tile max -inf,
//    p = 0, sum 0: corr = 1 and nothing added, an exact identity, so every loop below has a fixed trip count.
//  - O^T = V^T P^T: warp w owns output dims 16 (w + k C/16) .. + 15; A = V^T (ldmatrix.trans of the [key, dim]
//    rows), B = P^T (the [head, key] rows). corr_t = exp(M_{t-1} - M_t) (0 on the first tile), l = l * corr_t +
//    sum_t and all B fragments are computed first; then, tiles in key order, acc = acc * corr_t + V_t^T lo_t^T +
//    V_t^T hi_t^T (fp32). m = M_last and l go beside acc, as in k_flash_decode.
// No atomics, no timing-dependent order: bit-identical across runs. H100, Qwen3-30B-A3B decode at 6000 keys (32/4
// heads, D 128, C 64): 5.7 us (2.2 TB/s of the 12.3 MB KV, graph-timed, L2-warm) against the SIMT kernel's 14.8 us.
// Shared memory: K, V [C, D + 8], Q [8 NT, D + 8], P hi, P lo [8 NT, C + 8] in T; tile maxima and sums [C / 16, 8 NT]
// in fp32.
template <class T>
__host__ __device__ constexpr std::size_t flash_decode_tc_smem(int D, int C, int NT) {
  return (static_cast<std::size_t>(2 * C + 8 * NT) * (D + 8) + 2 * static_cast<std::size_t>(8 * NT) * (C + 8)) * sizeof(T) +
         2 * static_cast<std::size_t>(C / 16) * (8 * NT) * sizeof(float);
}

template <class T, int D, int C, int NT>
__global__ void __launch_bounds__(2 * C) k_flash_decode_tc(CudaArgs<T> a) {
  static_assert(D % 32 == 0 && C % 32 == 0 && NT >= 1);
  constexpr int NW = C / 16, kS = D + 8, PS = C + 8, H = 8 * NT, MT = D / 16, VPR = D / 8;
  constexpr int MPW = (MT + NW - 1) / NW;
  constexpr int QPT = (H * (D / 2) + 2 * C - 1) / (2 * C);  // Q words per thread
  extern __shared__ __align__(16) unsigned char tc_smem[];
  T* Ks = reinterpret_cast<T*>(tc_smem);
  T* Vs = Ks + C * kS;
  T* Qs = Vs + C * kS;
  T* Ph = Qs + H * kS;
  T* Pl = Ph + H * PS;
  float* tmax = reinterpret_cast<float*>(Pl + H * PS);
  float* tsum = tmax + NW * H;
  const int r = blockIdx.x, kvh = blockIdx.y, w = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int G = a.num_heads / a.num_kv_heads;
  // The cache pointers are read before the early exit, so their loads overlap row_pos's.
  const int n = a.row_pos[r] + 1, j0 = static_cast<int>(blockIdx.z) * C, seq = a.row_seq[r];
  const std::size_t kv_stride = static_cast<std::size_t>(a.num_kv_heads) * D;
  const T* K = a.kcache[seq] + kvh * D + static_cast<std::size_t>(j0) * kv_stride;
  const T* V = a.vcache[seq] + kvh * D + static_cast<std::size_t>(j0) * kv_stride;
  // PDL: the cached keys and values of earlier steps are fixed, so a chunk without this step's key (which the
  // q/k norm + RoPE kernel just before stores) issues its K/V loads before pdl_wait, overlapping that kernel; the
  // chunk holding it, and q, wait. (row_pos, row_seq and the cache tables are written before the step's first
  // kernel.) Every block waits before it lets the next kernel start.
  const bool fresh = j0 <= n - 1 && n - 1 < j0 + C;
  if (j0 >= n) {  // past the row's keys (the cache's capacity sizes the grid): k_flash_merge skips it
    cuda::pdl_begin();
    return;
  }
  if (fresh) cuda::pdl_wait();
  const int nb = min(C, n - j0), ntiles = (nb + 15) / 16;
  // Evict first: a decode step reads the cached keys and values once (common.cuh).
  const std::uint64_t pol = cuda::l2_evict_first();
  for (int i = threadIdx.x; i < C * VPR; i += blockDim.x) {
    const int row = i / VPR, c = i % VPR;
    const bool ok = row < nb;
    cuda::cp_async16_hint(Ks + row * kS + 8 * c, K + (ok ? row : 0) * kv_stride + 8 * c, ok, pol);
  }
  cp_async_commit();
  for (int i = threadIdx.x; i < C * VPR; i += blockDim.x) {
    const int row = i / VPR, c = i % VPR;
    const bool ok = row < nb;
    cuda::cp_async16_hint(Vs + row * kS + 8 * c, V + (ok ? row : 0) * kv_stride + 8 * c, ok, pol);
  }
  cp_async_commit();
  cuda::pdl_begin();
  std::uint32_t qv[QPT];
  {
    const T* q = a.q + static_cast<std::size_t>(r) * a.q_stride + static_cast<std::size_t>(kvh) * G * D;
#pragma unroll
    for (int k = 0; k < QPT; ++k) {
      const int i = threadIdx.x + k * 2 * C, hh = i / (D / 2), c = i % (D / 2);
      qv[k] = i < H * (D / 2) && hh < G ? *reinterpret_cast<const std::uint32_t*>(q + hh * D + 2 * c) : 0u;
    }
  }
#pragma unroll
  for (int k = 0; k < QPT; ++k) {
    const int i = threadIdx.x + k * 2 * C, hh = i / (D / 2), c = i % (D / 2);
    if (i < H * (D / 2)) *reinterpret_cast<std::uint32_t*>(Qs + hh * kS + 2 * c) = qv[k];
  }
  cp_async_wait<1>();  // K has landed
  __syncthreads();

  float s[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = -INFINITY;
  if (w < ntiles) {
    float s0[NT][4], s1[NT][4];  // even and odd 16-dim steps (two independent mma chains)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s0[nt][e] = s1[nt][e] = 0.0f;
    const T* kt = Ks + 16 * w * kS;
#pragma unroll
    for (int cp = 0; cp < D / 32; ++cp) {
      std::uint32_t ka[4], kb[4], qb[NT][4];
      tc_ldsm_x4(ka, kt + (lane & 15) * kS + 32 * cp + (lane >> 4) * 8);
      tc_ldsm_x4(kb, kt + (lane & 15) * kS + 32 * cp + 16 + (lane >> 4) * 8);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) tc_ldsm_x4(qb[nt], Qs + (8 * nt + (lane & 7)) * kS + 32 * cp + (lane >> 3) * 8);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) tc_mma<T>(s0[nt], ka, qb[nt][0], qb[nt][1]);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) tc_mma<T>(s1[nt], kb, qb[nt][2], qb[nt][3]);
    }
    const int key_a = 16 * w + g, key_b = key_a + 8;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = (e < 2 ? key_a : key_b) < nb ? (s0[nt][e] + s1[nt][e]) * a.scale : -INFINITY;
  }
  {
    float mx[NT][2];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) mx[nt][0] = fmaxf(s[nt][0], s[nt][2]), mx[nt][1] = fmaxf(s[nt][1], s[nt][3]);
#pragma unroll
    for (int x = 4; x <= 16; x <<= 1)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) mx[nt][e] = fmaxf(mx[nt][e], __shfl_xor_sync(0xffffffffu, mx[nt][e], x));
    if (g == 0)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) tmax[w * H + 8 * nt + 2 * t] = mx[nt][0], tmax[w * H + 8 * nt + 2 * t + 1] = mx[nt][1];
  }
  __syncthreads();
  {
    // p = exp(s - M_w); tiles past the row's keys (w >= ntiles): s = -inf, so p = 0, sum 0 and tile max -inf.
    float ls[NT][2];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      float mw[2];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int h = 8 * nt + 2 * t + e;
        mw[e] = tmax[h];
#pragma unroll
        for (int u = 1; u < NW; ++u)
          if (u <= w) mw[e] = fmaxf(mw[e], tmax[u * H + h]);
      }
      float p[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) p[e] = expf(s[nt][e] - mw[e & 1]);
      ls[nt][0] = p[0] + p[2];
      ls[nt][1] = p[1] + p[3];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int idx = (8 * nt + 2 * t + (e & 1)) * PS + 16 * w + g + (e >> 1) * 8;
        const T hi = cuda::from_f<T>(p[e]);
        Ph[idx] = hi;
        Pl[idx] = cuda::from_f<T>(p[e] - cuda::to_f(hi));
      }
    }
#pragma unroll
    for (int x = 4; x <= 16; x <<= 1)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) ls[nt][e] += __shfl_xor_sync(0xffffffffu, ls[nt][e], x);
    if (g == 0)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) tsum[w * H + 8 * nt + 2 * t] = ls[nt][0], tsum[w * H + 8 * nt + 2 * t + 1] = ls[nt][1];
  }
  cp_async_wait<0>();  // V has landed
  __syncthreads();

  // corr and l of every tile, and every B fragment, before the mma chain.
  float corr[NW][NT][2], l[NT][2], mrun[NT][2];
  std::uint32_t bh[NW][NT][2], bl[NW][NT][2];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) mrun[nt][0] = mrun[nt][1] = -INFINITY, l[nt][0] = l[nt][1] = 0.0f;
#pragma unroll
  for (int u = 0; u < NW; ++u)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int h = 8 * nt + 2 * t + e;
        const float mn = fmaxf(mrun[nt][e], tmax[u * H + h]);
        corr[u][nt][e] = expf(mrun[nt][e] - mn);
        mrun[nt][e] = mn;
        l[nt][e] = l[nt][e] * corr[u][nt][e] + tsum[u * H + h];
      }
      const int pb = (8 * nt + g) * PS + 16 * u + 2 * t;
      bh[u][nt][0] = *reinterpret_cast<const std::uint32_t*>(Ph + pb);
      bh[u][nt][1] = *reinterpret_cast<const std::uint32_t*>(Ph + pb + 8);
      bl[u][nt][0] = *reinterpret_cast<const std::uint32_t*>(Pl + pb);
      bl[u][nt][1] = *reinterpret_cast<const std::uint32_t*>(Pl + pb + 8);
    }
  float o[MPW][NT][4];
#pragma unroll
  for (int mp = 0; mp < MPW; ++mp)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) o[mp][nt][0] = o[mp][nt][1] = o[mp][nt][2] = o[mp][nt][3] = 0.0f;
#pragma unroll
  for (int u = 0; u < NW; ++u) {
#pragma unroll
    for (int mp = 0; mp < MPW; ++mp) {
      const int mt = w + NW * mp;
      if (mt < MT) {
        std::uint32_t va[4];
        tc_ldsm_x4_t(va, Vs + (16 * u + (lane & 7) + (lane >> 4) * 8) * kS + 16 * mt + ((lane >> 3) & 1) * 8);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          o[mp][nt][0] *= corr[u][nt][0], o[mp][nt][1] *= corr[u][nt][1];
          o[mp][nt][2] *= corr[u][nt][0], o[mp][nt][3] *= corr[u][nt][1];
          tc_mma<T>(o[mp][nt], va, bl[u][nt][0], bl[u][nt][1]);
          tc_mma<T>(o[mp][nt], va, bh[u][nt][0], bh[u][nt][1]);
        }
      }
    }
  }
  const int chunks = static_cast<int>(gridDim.z);
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int hl = 8 * nt + 2 * t + e;
      if (hl >= G) continue;
      const std::size_t rh = static_cast<std::size_t>(r) * a.num_heads + kvh * G + hl;
      float* part = a.scratch + (rh * chunks + blockIdx.z) * (D + 2);
#pragma unroll
      for (int mp = 0; mp < MPW; ++mp) {
        const int mt = w + NW * mp;
        if (mt < MT) part[16 * mt + g] = o[mp][nt][e], part[16 * mt + g + 8] = o[mp][nt][e + 2];
      }
      if (w == 0 && g == 0) part[D] = mrun[nt][e], part[D + 1] = l[nt][e];
    }
}

// Merges the chunks of one (row, head) that hold keys, in a fixed order: m = max m_c, w_c = exp(m_c - m),
// l = sum_c l_c w_c, out_d = (sum_c acc_c,d w_c) / l, where warp w sums the chunks c = w, w + 8, ... in increasing c
// and the 8 warps' sums are added in warp order. One block per (row, head, 64-dim slice): launch it with gridDim.z =
// ceil(head_dim / 64); lane i holds dims 2i, 2i + 1 of the slice. One pass over the scratch: every load of a warp's
// first kMergeChunks chunks (acc pieces and (m_c, l_c)) is issued before the block's max is known; chunks past
// 8 kMergeChunks are read in a second loop.
inline constexpr int kMergeWarps = 8, kMergeChunks = 16;
template <class T>
__global__ void __launch_bounds__(32 * kMergeWarps) k_flash_merge(CudaArgs<T> a, int chunks, int C) {
  const int used = (a.row_pos[blockIdx.x] + 1 + C - 1) / C;  // the host's metadata: before pdl_wait
  cuda::pdl_begin();
  constexpr int NW = kMergeWarps, MC = kMergeChunks;
  __shared__ float wm[NW], wl[NW];
  __shared__ float2 wacc[NW][32];
  const int D = a.head_dim, r = blockIdx.x, h = blockIdx.y, w = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int d0 = static_cast<int>(blockIdx.z) * 64;
  const std::size_t rh = static_cast<std::size_t>(r) * a.num_heads + h;
  const float* part = a.scratch + rh * chunks * (D + 2);
  float2 ml[MC], v[MC];
  float m = -INFINITY;
#pragma unroll
  for (int i = 0; i < MC; ++i) {
    const int c = w + NW * i;
    if (c < used) {
      const float* pc = part + static_cast<std::size_t>(c) * (D + 2);
      ml[i] = *reinterpret_cast<const float2*>(pc + D);
      if (d0 + 2 * lane < D) v[i] = *reinterpret_cast<const float2*>(pc + d0 + 2 * lane);
    }
  }
#pragma unroll
  for (int i = 0; i < MC; ++i)
    if (w + NW * i < used) m = fmaxf(m, ml[i].x);
  for (int c = w + NW * MC; c < used; c += NW) m = fmaxf(m, part[static_cast<std::size_t>(c) * (D + 2) + D]);
  if (lane == 0) wm[w] = m;
  __syncthreads();
  m = wm[0];
#pragma unroll
  for (int i = 1; i < NW; ++i) m = fmaxf(m, wm[i]);
  float l = 0.0f;
  float2 acc = make_float2(0.0f, 0.0f);
#pragma unroll
  for (int i = 0; i < MC; ++i) {
    if (w + NW * i < used) {
      const float wc = expf(ml[i].x - m);
      l += ml[i].y * wc;
      acc.x += v[i].x * wc, acc.y += v[i].y * wc;
    }
  }
  for (int c = w + NW * MC; c < used; c += NW) {
    const float* pc = part + static_cast<std::size_t>(c) * (D + 2);
    const float wc = expf(pc[D] - m);
    l += pc[D + 1] * wc;
    if (d0 + 2 * lane < D) {
      const float2 x = *reinterpret_cast<const float2*>(pc + d0 + 2 * lane);
      acc.x += x.x * wc, acc.y += x.y * wc;
    }
  }
  if (lane == 0) wl[w] = l;
  wacc[w][lane] = acc;
  __syncthreads();
  const int i = threadIdx.x, d = d0 + 2 * i;
  if (i < 32 && d < D) {
    float2 o = wacc[0][i];
    float L = wl[0];
#pragma unroll
    for (int u = 1; u < NW; ++u) o.x += wacc[u][i].x, o.y += wacc[u][i].y, L += wl[u];
    a.out[rh * D + d] = cuda::from_f<T>(o.x / L);
    a.out[rh * D + d + 1] = cuda::from_f<T>(o.y / L);
  }
}

// Launches the split and the merge; returns false (nothing launched) where the block's shared memory would not fit,
// so the caller takes the whole-row kernel. bf16/fp16 with Bc = 16, C a multiple of 32 up to 128 (the default is
// 64), head_dim 64 or 128 and at most 16 query heads per KV head take k_flash_decode_tc, everything else
// k_flash_decode; both write the same scratch, which k_flash_merge reads (one block per 64 output dims).
template <class T, int Bc, int C = flash_chunk_keys(Bc)>
bool launch_flash_decode(const CudaArgs<T>& a, cudaStream_t s) {
  const int G = a.num_heads / a.num_kv_heads, D = a.head_dim;
  static const int max_optin = [] {
    int v = 0, dev = 0;
    FPF_CUDA(cudaGetDevice(&dev));
    FPF_CUDA(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    return v;
  }();
  const int chunks = static_cast<int>((a.max_keys + C - 1) / C);
  const dim3 grid(a.rows, a.num_kv_heads, chunks);
  bool tc = false;
  if constexpr (!std::is_same_v<T, float> && Bc == 16 && C % 32 == 0 && C <= 128) {
    auto go = [&]<int Dt, int NT>() {
      const std::size_t smem = flash_decode_tc_smem<T>(Dt, C, NT);
      if (smem > static_cast<std::size_t>(max_optin)) return;
      auto* k = k_flash_decode_tc<T, Dt, C, NT>;
      if (smem > 48 * 1024) FPF_CUDA(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
      cuda::launch("flash_decode_tc", k, grid, 2 * C, smem, s, a);
      tc = true;
    };
    if (D == 128 && G <= 8) go.template operator()<128, 1>();
    else if (D == 128 && G <= 16) go.template operator()<128, 2>();
    else if (D == 64 && G <= 8) go.template operator()<64, 1>();
    else if (D == 64 && G <= 16) go.template operator()<64, 2>();
  }
  if (!tc) {
    const std::size_t smem = flash_decode_smem<T>(G, D, C, C / Bc);
    if (smem > static_cast<std::size_t>(max_optin)) return false;
    auto go = [&]<int DPL, bool Full>() {
      auto* k = k_flash_decode<T, Bc, C, DPL, Full>;
      if (smem > 48 * 1024) FPF_CUDA(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
      cuda::launch("flash_decode", k, grid, 32 * G, smem, s, a);
    };
    if (D == 32) go.template operator()<1, true>();
    else if (D < 32) go.template operator()<1, false>();
    else if (D == 64) go.template operator()<2, true>();
    else if (D < 64) go.template operator()<2, false>();
    else if (D == 128) go.template operator()<4, true>();
    else if (D < 128) go.template operator()<4, false>();
    else if (D == 256) go.template operator()<8, true>();
    else go.template operator()<8, false>();
  }
  cuda::launch("flash_merge", k_flash_merge<T>, dim3(a.rows, a.num_heads, (D + 63) / 64), 32 * kMergeWarps, 0, s, a, chunks, C);
  return true;
}

}  // namespace fpf::attn::detail
