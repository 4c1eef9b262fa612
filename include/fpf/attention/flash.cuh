#pragma once
// attn::Flash<Bc> on the GPU: the same algorithm as Flash<Bc>::cpu: the keys in tiles of Bc with an online
// softmax (running max m, running sum l, output rescaled by exp(m_old - m_new) when the max grows), normalized
// once at the end.
// - Decode (at most kSplitMaxRows rows, scratch given): flash_decode.cuh (chunks of keys over blocks, on tensor cores
//   for bf16/fp16, then a merge in chunk order).
// - Whole rows (k_flash): one block per (query row, KV head) with one warp per query head of the GQA group: each tile
//   of Bc keys and values is loaded once into shared memory (coalesced) and read by every head of the group. In a
//   warp, lane j scores key j of the tile (Bc <= 32) as one sequential dot product, lane i owns output dims i,
//   i + 32, ...; the tile's sum uses one fixed butterfly order and keys are accumulated in index order.
// - Prefill of whole sequences in bf16/fp16: k_flash_tc on tensor cores.
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include <fpf/attention/attention.hpp>
#include <fpf/attention/cuda_args.cuh>
#include <fpf/attention/flash_decode.cuh>

namespace fpf::attn {

namespace detail {

template <class T, int Bc, int DR>
__global__ void k_flash(CudaArgs<T> a) {
  extern __shared__ float smem[];
  constexpr int Vn = cuda::ops::Vec<T>::n;
  const int D = a.head_dim, r = blockIdx.x, kvh = blockIdx.y, w = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int G = blockDim.x >> 5, h = kvh * G + w, kv_stride = a.num_kv_heads * D, KS = D + Vn;  // KS: padded row
  float* qs = smem + w * (DR * 32);
  T* Ks = reinterpret_cast<T*>(smem + G * (DR * 32));
  T* Vs = Ks + Bc * KS;
  const int n = a.row_pos[r] + 1;
  const T* q = a.q + static_cast<std::size_t>(r) * a.q_stride + h * D;
  const T* K = a.kcache[a.row_seq[r]] + kvh * D;
  const T* V = a.vcache[a.row_seq[r]] + kvh * D;
  for (int d = lane; d < D; d += 32) qs[d] = cuda::to_f(q[d]);
  float acc[DR];
#pragma unroll
  for (int i = 0; i < DR; ++i) acc[i] = 0.0f;
  float m = -INFINITY, l = 0.0f;
  const int vec_per_row = D / Vn;
  for (int j0 = 0; j0 < n; j0 += Bc) {
    const int nb = min(Bc, n - j0);
    __syncthreads();  // the previous tile is consumed (and qs written, on the first pass)
    for (int idx = threadIdx.x; idx < nb * vec_per_row; idx += blockDim.x) {
      const int row = idx / vec_per_row, c = idx % vec_per_row;
      const std::size_t src = static_cast<std::size_t>(j0 + row) * kv_stride + c * Vn;
      *reinterpret_cast<cuda::ops::Vec<T>*>(Ks + row * KS + c * Vn) = *reinterpret_cast<const cuda::ops::Vec<T>*>(K + src);
      *reinterpret_cast<cuda::ops::Vec<T>*>(Vs + row * D + c * Vn) = *reinterpret_cast<const cuda::ops::Vec<T>*>(V + src);
    }
    __syncthreads();
    float s = -INFINITY;
    if (lane < nb) {
      // Four partial sums over interleaved 16-byte chunks (independent chains), added in a fixed order.
      const auto* kr = reinterpret_cast<const cuda::ops::Vec<T>*>(Ks + lane * KS);
      float d4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      for (int c0 = 0; c0 < vec_per_row; c0 += 4) {
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int c = c0 + u;
          if (c < vec_per_row) {
            const cuda::ops::Vec<T> kv = kr[c];
#pragma unroll
            for (int i = 0; i < Vn; ++i) d4[u] += qs[c * Vn + i] * cuda::to_f(kv.v[i]);
          }
        }
      }
      s = ((d4[0] + d4[1]) + (d4[2] + d4[3])) * a.scale;
    }
    const float m_new = fmaxf(m, cuda::warp_max(s));
    const float corr = expf(m - m_new);
    const float p = lane < nb ? expf(s - m_new) : 0.0f;
    l = l * corr + cuda::warp_sum(p);
#pragma unroll
    for (int i = 0; i < DR; ++i) acc[i] *= corr;
#pragma unroll
    for (int jj = 0; jj < Bc; ++jj) {
      if (jj >= nb) break;
      const float pj = __shfl_sync(0xffffffffu, p, jj);
      const T* vr = Vs + jj * D;
#pragma unroll
      for (int i = 0; i < DR; ++i)
        if (lane + 32 * i < D) acc[i] += pj * cuda::to_f(vr[lane + 32 * i]);
    }
    m = m_new;
  }
  const std::size_t rh = static_cast<std::size_t>(r) * a.num_heads + h;
  const float inv_l = 1.0f / l;
  T* o = a.out + rh * D;
#pragma unroll
  for (int i = 0; i < DR; ++i)
    if (lane + 32 * i < D) o[lane + 32 * i] = cuda::from_f<T>(acc[i] * inv_l);
}

// Prefill on tensor cores (bf16/fp16 only), FlashAttention-2 style, on raw mma.sync m16n8k16 (T operands, fp32
// accumulation): softmax(q k^T * scale) v with the same online softmax as Flash<16>::cpu.
// Layout: one block of kTcWarps warps per (16 R query rows of one sequence, hb query heads of one KV head), one warp
// per (16 rows, head): warp w owns head w % hb of the block's heads and rows 16 (w / hb) .. of the block's rows
// (flash_tc_shape: hb the largest divisor of G up to kTcWarps, R = kTcWarps / hb). Blocks start with the longest
// rows. K and V come into shared memory in tiles of kTcKeys keys (cp.async, two stages; rows padded by 16 bytes so
// ldmatrix is conflict-free; keys past the block's last visible key are zero-filled, never read from the cache),
// and every warp of the block reads them: the hb heads share each tile (GQA).
// Per warp, in registers: Q as A fragments, the scores S = Q K^T of the tile (m16n8 C fragments), the output O
// (16 x D, fp32). Thread (g, t) = (lane / 4, lane % 4) holds rows g and g + 8, columns 2t, 2t + 1 of each 8-column
// piece, so a row's (m, l) lives in the 4 threads of a quad. V^T fragments come from ldmatrix.trans.
// Numerics, per 16-key tile in key order (Bc = 16): s = (q.k) * scale (fp32; keys past the row's position -inf, so
// a tile with no visible key leaves m, l and O exactly as they are), tile max by a fixed butterfly over the quad,
// m_new = max(m, tile max), corr = exp(m - m_new), p = exp(s - m_new) in fp32, l = l * corr + (the thread's 4 p, in a
// fixed order), O = O * corr (skipped when every corr of the warp in the shared-memory tile is 1: O * 1 is exact),
// then O += P V with P rounded to T (the S accumulators become the A operand) and fp32 accumulation. At the end l is
// summed over the quad in a fixed order and O / l is written, for rows inside the segment only. No atomics, no
// timing-dependent order: bit-identical across runs.
inline constexpr int kTcKeys = 32;  // keys per shared-memory tile (two 16-key softmax tiles)
inline constexpr int kTcWarps = 4;  // warps per block; up to 3 blocks per SM (registers: <= 168 per thread)
// (tc_cp_async16, tc_ldsm_x4, tc_ldsm_x4_t, tc_mma: flash_decode.cuh, shared with k_flash_decode_tc; cuda::pack2: common.cuh.)

template <class T, int D>
__global__ void __launch_bounds__(32 * kTcWarps, 3) k_flash_tc(CudaArgs<T> a, int first_row, int nrows, int hb) {
  static_assert(D % 32 == 0 && D <= 128 && kTcKeys % 16 == 0);
  constexpr int kN = kTcKeys, kS = D + 8, NT = kN / 8;  // keys per tile, padded row (elements), 8-key pieces
  constexpr int DK = D / 16, DN = D / 8;                // k-steps of Q K^T, 8-column pieces of O
  __shared__ __align__(16) unsigned char kv_raw[4 * kN * kS * sizeof(T)];  // K stage 0, 1, then V stage 0, 1
  __shared__ int warp_keys[kTcWarps];
  T* kv = reinterpret_cast<T*>(kv_raw);
  const int W = blockDim.x >> 5, w = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int G = a.num_heads / a.num_kv_heads, groups = G / hb, R = W / hb;
  const int kvh = blockIdx.y / groups, h = kvh * G + (blockIdx.y % groups) * hb + w % hb;
  const int rw = ((gridDim.x - 1 - blockIdx.x) * R + w / hb) * 16;  // the warp's first row (longest rows first)
  const int ra = rw + g, rb = rw + g + 8;                            // this thread's two rows
  const int na = ra < nrows ? a.row_pos[first_row + ra] + 1 : 0;     // keys each row sees (0: past the segment)
  const int nb = rb < nrows ? a.row_pos[first_row + rb] + 1 : 0;
  const int n_warp = __reduce_max_sync(0xffffffffu, max(na, nb));
  const int n_min = __reduce_min_sync(0xffffffffu, min(na, nb));
  if (lane == 0) warp_keys[w] = n_warp;
  const int kv_stride = a.num_kv_heads * D, seq = a.row_seq[first_row];
  const T* K = a.kcache[seq] + kvh * D;
  const T* V = a.vcache[seq] + kvh * D;

  std::uint32_t qa[DK][4];  // Q as A fragments, dims 16c .. 16c + 15 (rows past the segment: 0)
  {
    const T* qa_p = a.q + static_cast<std::size_t>(first_row + (ra < nrows ? ra : 0)) * a.q_stride + h * D + 2 * t;
    const T* qb_p = a.q + static_cast<std::size_t>(first_row + (rb < nrows ? rb : 0)) * a.q_stride + h * D + 2 * t;
#pragma unroll
    for (int c = 0; c < DK; ++c) {
      qa[c][0] = ra < nrows ? *reinterpret_cast<const std::uint32_t*>(qa_p + 16 * c) : 0u;
      qa[c][1] = rb < nrows ? *reinterpret_cast<const std::uint32_t*>(qb_p + 16 * c) : 0u;
      qa[c][2] = ra < nrows ? *reinterpret_cast<const std::uint32_t*>(qa_p + 16 * c + 8) : 0u;
      qa[c][3] = rb < nrows ? *reinterpret_cast<const std::uint32_t*>(qb_p + 16 * c + 8) : 0u;
    }
  }
  __syncthreads();
  int n_block = 0;
  for (int i = 0; i < W; ++i) n_block = max(n_block, warp_keys[i]);
  const int ntiles = (n_block + kN - 1) / kN;
  auto load = [&](int it) {  // tile it into stage it & 1
    const int j0 = it * kN;
    T* ks = kv + (it & 1) * kN * kS;
    T* vs = ks + 2 * kN * kS;
    for (int i = threadIdx.x; i < kN * (D / 8); i += blockDim.x) {
      const int r = i / (D / 8), c = i % (D / 8);
      const bool ok = j0 + r < n_block;
      const std::size_t src = static_cast<std::size_t>(ok ? j0 + r : 0) * kv_stride + 8 * c;
      tc_cp_async16(ks + r * kS + 8 * c, K + src, ok);
      tc_cp_async16(vs + r * kS + 8 * c, V + src, ok);
    }
    asm volatile("cp.async.commit_group;\n" ::: "memory");
  };

  float o[DN][4];
#pragma unroll
  for (int i = 0; i < DN; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
  float ma = -INFINITY, mb = -INFINITY, la = 0.0f, lb = 0.0f;
  const float scale = a.scale;
  if (ntiles > 0) load(0);
  for (int it = 0; it < ntiles; ++it) {
    if (it + 1 < ntiles) {
      load(it + 1);
      asm volatile("cp.async.wait_group 1;\n" ::: "memory");
    } else {
      asm volatile("cp.async.wait_group 0;\n" ::: "memory");
    }
    __syncthreads();
    const int j0 = it * kN;
    if (j0 < n_warp) {
      const T* ks = kv + (it & 1) * kN * kS;
      const T* vs = ks + 2 * kN * kS;
      // S = Q K^T: s[nt] covers keys j0 + 8nt .. + 7 (independent accumulators; dims in order).
      float s[NT][4];
#pragma unroll
      for (int i = 0; i < NT; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.0f;
#pragma unroll
      for (int cp = 0; cp < DK / 2; ++cp) {
        std::uint32_t b[NT][4];  // dims 32cp + 0/8/16/24 of keys 8nt .. 8nt + 7
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) tc_ldsm_x4(b[nt], ks + (8 * nt + (lane & 7)) * kS + 32 * cp + (lane >> 3) * 8);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) tc_mma<T>(s[nt], qa[2 * cp], b[nt][0], b[nt][1]);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) tc_mma<T>(s[nt], qa[2 * cp + 1], b[nt][2], b[nt][3]);
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] *= scale;
      if (j0 + kN > n_min) {  // some key of the tile is past some row's position
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (j0 + 8 * nt + 2 * t + (e & 1) >= (e < 2 ? na : nb)) s[nt][e] = -INFINITY;
      }
      constexpr int kSub = kN / 16;  // 16-key softmax tiles
      float mxa[kSub], mxb[kSub];
#pragma unroll
      for (int u = 0; u < kSub; ++u) {
        mxa[u] = fmaxf(fmaxf(s[2 * u][0], s[2 * u][1]), fmaxf(s[2 * u + 1][0], s[2 * u + 1][1]));
        mxb[u] = fmaxf(fmaxf(s[2 * u][2], s[2 * u][3]), fmaxf(s[2 * u + 1][2], s[2 * u + 1][3]));
      }
#pragma unroll
      for (int x = 1; x <= 2; x <<= 1)
#pragma unroll
        for (int u = 0; u < kSub; ++u) {
          mxa[u] = fmaxf(mxa[u], __shfl_xor_sync(0xffffffffu, mxa[u], x));
          mxb[u] = fmaxf(mxb[u], __shfl_xor_sync(0xffffffffu, mxb[u], x));
        }
      float ca[kSub], cb[kSub];
      std::uint32_t pa[kSub][4];
      bool rescale = false;
#pragma unroll
      for (int u = 0; u < kSub; ++u) {
        const float mna = fmaxf(ma, mxa[u]), mnb = fmaxf(mb, mxb[u]);
        // A row with no visible key yet (only rows past the segment) keeps m = -inf and p = 0.
        const float sa = mna == -INFINITY ? 0.0f : mna, sb = mnb == -INFINITY ? 0.0f : mnb;
        ca[u] = expf(ma - sa), cb[u] = expf(mb - sb);
        ma = mna, mb = mnb;
        rescale |= ca[u] != 1.0f || cb[u] != 1.0f;
        float p[2][4];
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int e = 0; e < 4; ++e) p[i][e] = expf(s[2 * u + i][e] - (e < 2 ? sa : sb));
        la = la * ca[u] + ((p[0][0] + p[0][1]) + (p[1][0] + p[1][1]));
        lb = lb * cb[u] + ((p[0][2] + p[0][3]) + (p[1][2] + p[1][3]));
        pa[u][0] = cuda::pack2<T>(p[0][0], p[0][1]);
        pa[u][1] = cuda::pack2<T>(p[0][2], p[0][3]);
        pa[u][2] = cuda::pack2<T>(p[1][0], p[1][1]);
        pa[u][3] = cuda::pack2<T>(p[1][2], p[1][3]);
      }
      // O = O * corr + P V per 16-key tile, in key order (two 8-column pieces of V^T per ldmatrix.trans).
      auto pv = [&](int u) {
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          std::uint32_t b[4];
          tc_ldsm_x4_t(b, vs + (16 * u + (lane & 7) + ((lane >> 3) & 1) * 8) * kS + 16 * dp + (lane >> 4) * 8);
          tc_mma<T>(o[2 * dp], pa[u], b[0], b[1]);
          tc_mma<T>(o[2 * dp + 1], pa[u], b[2], b[3]);
        }
      };
      if (__any_sync(0xffffffffu, rescale)) {
#pragma unroll
        for (int u = 0; u < kSub; ++u) {
#pragma unroll
          for (int i = 0; i < DN; ++i) o[i][0] *= ca[u], o[i][1] *= ca[u], o[i][2] *= cb[u], o[i][3] *= cb[u];
          pv(u);
        }
      } else {
#pragma unroll
        for (int u = 0; u < kSub; ++u) pv(u);
      }
    }
    __syncthreads();  // this stage is consumed before the next load overwrites it
  }
  la += __shfl_xor_sync(0xffffffffu, la, 1);
  lb += __shfl_xor_sync(0xffffffffu, lb, 1);
  la += __shfl_xor_sync(0xffffffffu, la, 2);
  lb += __shfl_xor_sync(0xffffffffu, lb, 2);
  const float ia = 1.0f / la, ib = 1.0f / lb;
  T* out_a = a.out + (static_cast<std::size_t>(first_row + ra) * a.num_heads + h) * D + 2 * t;
  T* out_b = a.out + (static_cast<std::size_t>(first_row + rb) * a.num_heads + h) * D + 2 * t;
#pragma unroll
  for (int i = 0; i < DN; ++i) {
    if (ra < nrows) *reinterpret_cast<std::uint32_t*>(out_a + 8 * i) = cuda::pack2<T>(o[i][0] * ia, o[i][1] * ia);
    if (rb < nrows) *reinterpret_cast<std::uint32_t*>(out_b + 8 * i) = cuda::pack2<T>(o[i][2] * ib, o[i][3] * ib);
  }
}

// k_flash_tc's block shape for G query heads per KV head: hb heads (the largest divisor of G up to kTcWarps) times
// R = kTcWarps / hb tiles of 16 rows.
inline void flash_tc_shape(int G, int& hb, int& R) {
  hb = 1;
  for (int d = 1; d <= kTcWarps && d <= G; ++d)
    if (G % d == 0) hb = d;
  R = kTcWarps / hb;
}

template <class T, int Bc>
void launch_flash(const CudaArgs<T>& a, dim3 grid, cudaStream_t s) {
  const int G = a.num_heads / a.num_kv_heads;
  auto go = [&]<int DR>() {
    const std::size_t smem = static_cast<std::size_t>(G) * DR * 32 * sizeof(float) +
                             static_cast<std::size_t>(Bc) * (2 * a.head_dim + cuda::ops::Vec<T>::n) * sizeof(T);
    if (smem > 48 * 1024)
      FPF_CUDA(cudaFuncSetAttribute(k_flash<T, Bc, DR>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    k_flash<T, Bc, DR><<<grid, 32 * G, smem, s>>>(a);
  };
  if (a.head_dim <= 32) go.template operator()<1>();
  else if (a.head_dim <= 128) go.template operator()<4>();
  else go.template operator()<8>();
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
    if (a.num_heads % a.num_kv_heads != 0 || a.num_heads / a.num_kv_heads > 32)
      throw Error("config.json: num_key_value_heads", "the CUDA flash kernel needs at most 32 query heads per KV head");
    if (a.scratch && a.rows <= kSplitMaxRows && detail::launch_flash_decode<T, Bc>(a, s)) {
      FPF_CUDA_LAUNCH("attention flash (decode: split keys)");
      return;
    }
    detail::launch_flash<T, Bc>(a, dim3(a.rows, a.num_kv_heads), s);
    FPF_CUDA_LAUNCH("attention flash");
  }

  // Prefill of whole sequences (segs: each sequence's rows, consecutive in a): on tensor cores for bf16/fp16 with
  // Bc = 16, head_dim 64 or 128 and at most 16 query heads per KV head (k_flash_tc, one launch per sequence), else
  // run().
  template <class T>
  static void run_prefill(const CudaArgs<T>& a, const std::vector<PrefillSeq<T>>& segs, PrefillWork<T>, cudaStream_t s = 0) {
    const int G = a.num_heads / a.num_kv_heads;
    if constexpr (!std::is_same_v<T, float> && Bc == 16) {
      if ((a.head_dim == 128 || a.head_dim == 64) && a.num_heads % a.num_kv_heads == 0 && G <= 16) {
        int hb, R;
        detail::flash_tc_shape(G, hb, R);
        auto go = [&]<int D>() {
          for (const PrefillSeq<T>& sq : segs)
            if (sq.rows > 0)
              detail::k_flash_tc<T, D><<<dim3((sq.rows + 16 * R - 1) / (16 * R), a.num_kv_heads * (G / hb)), 32 * hb * R, 0, s>>>(
                  a, sq.first_row, sq.rows, hb);
        };
        if (a.head_dim == 128) go.template operator()<128>();
        else go.template operator()<64>();
        FPF_CUDA_LAUNCH("attention flash (tensor cores)");
        return;
      }
    }
    run<T>(a, s);
  }
};

}  // namespace fpf::attn
