#pragma once
// attn::Flash<Bc> on the GPU: the same algorithm as Flash<Bc>::cpu: the keys in tiles of Bc with an online
// softmax (running max m, running sum l, output rescaled by exp(m_old - m_new) when the max grows), normalized
// once at the end. One block per (query row, KV head) with one warp per query head of the GQA group: each tile of
// Bc keys and values is loaded once into shared memory (coalesced) and read by every head of the group. In a warp,
// lane j scores key j of the tile (Bc <= 32) as one sequential dot product, lane i owns output dims i, i + 32, ...;
// the tile's sum uses one fixed butterfly order and keys are accumulated in index order.
// Decode (few rows): each row's keys are split into chunks of whole tiles over blocks (flash-decoding); each chunk
// keeps its own (m, l, unnormalized output) and k_flash_combine merges the chunks in chunk order.
#include <mma.h>

#include <type_traits>
#include <vector>

#include <fpf/attention/attention.hpp>
#include <fpf/attention/cuda_args.cuh>

namespace fpf::attn {

namespace detail {

template <class T, int Bc, int DR, bool Split>
__global__ void k_flash(CudaArgs<T> a) {
  extern __shared__ float smem[];
  constexpr int Vn = cuda::ops::Vec<T>::n;
  const int D = a.head_dim, r = blockIdx.x, kvh = blockIdx.y, w = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int G = blockDim.x >> 5, h = kvh * G + w, kv_stride = a.num_kv_heads * D, KS = D + Vn;  // KS: padded row
  float* qs = smem + w * (DR * 32);
  T* Ks = reinterpret_cast<T*>(smem + G * (DR * 32));
  T* Vs = Ks + Bc * KS;
  const int n_all = a.row_pos[r] + 1;
  constexpr int chunk = flash_chunk_keys(Bc);
  const int j_begin = Split ? static_cast<int>(blockIdx.z) * chunk : 0;
  const int n = Split ? min(n_all, j_begin + chunk) : n_all;
  const T* q = a.q + static_cast<std::size_t>(r) * a.q_stride + h * D;
  const T* K = a.kcache[a.row_seq[r]] + kvh * D;
  const T* V = a.vcache[a.row_seq[r]] + kvh * D;
  for (int d = lane; d < D; d += 32) qs[d] = cuda::to_f(q[d]);
  float acc[DR];
#pragma unroll
  for (int i = 0; i < DR; ++i) acc[i] = 0.0f;
  float m = -INFINITY, l = 0.0f;
  const int vec_per_row = D / Vn;
  for (int j0 = j_begin; j0 < n; j0 += Bc) {
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
  if constexpr (Split) {
    float* part = a.scratch + (rh * gridDim.z + blockIdx.z) * (D + 2);
#pragma unroll
    for (int i = 0; i < DR; ++i)
      if (lane + 32 * i < D) part[lane + 32 * i] = acc[i];
    if (lane == 0) part[D] = m, part[D + 1] = l;  // m = -inf, l = 0 for a chunk past the row's keys
    return;
  }
  const float inv_l = 1.0f / l;
  T* o = a.out + rh * D;
#pragma unroll
  for (int i = 0; i < DR; ++i)
    if (lane + 32 * i < D) o[lane + 32 * i] = cuda::from_f<T>(acc[i] * inv_l);
}

// Merges the chunks of one (row, head): m = max m_c, w_c = e^(m_c - m) (0 for a chunk past the row's keys),
// l = sum l_c w_c (fixed tree), out = sum_c acc_c w_c / l. One block per (row, head); warp w sums the chunks
// c = w, w + nw, ... (lane: dims lane, lane + 32, ...) into its partial, then the partials are added in warp order:
// a fixed order, with many independent loads in flight (a long cache has hundreds of chunks).
template <class T>
__global__ void k_flash_combine(CudaArgs<T> a, int chunks) {
  extern __shared__ float wts[];  // [chunks] weights, then [nw, D] partial sums
  __shared__ float red[32];
  const int D = a.head_dim, r = blockIdx.x, h = blockIdx.y;
  const int nw = blockDim.x >> 5, w = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const std::size_t rh = static_cast<std::size_t>(r) * a.num_heads + h;
  const float* part = a.scratch + rh * chunks * (D + 2);
  float m = -INFINITY;
  for (int c = threadIdx.x; c < chunks; c += blockDim.x) m = fmaxf(m, part[static_cast<std::size_t>(c) * (D + 2) + D]);
  m = cuda::block_max(m, red);
  float l = 0.0f;
  for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
    const float* pc = part + static_cast<std::size_t>(c) * (D + 2);
    const float wc = pc[D + 1] > 0.0f ? expf(pc[D] - m) : 0.0f;
    wts[c] = wc;
    l += pc[D + 1] * wc;
  }
  __syncthreads();
  l = cuda::block_sum(l, red);
  // A chunk past the row's keys holds acc = 0 and weight 0: no branch, so the loads overlap.
  float* partial = wts + chunks;
  for (int d = lane; d < D; d += 32) {
    float acc = 0.0f;
#pragma unroll 4
    for (int c = w; c < chunks; c += nw) acc += part[static_cast<std::size_t>(c) * (D + 2) + d] * wts[c];
    partial[w * D + d] = acc;
  }
  __syncthreads();
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.0f;
    for (int i = 0; i < nw; ++i) acc += partial[i * D + d];
    a.out[rh * D + d] = cuda::from_f<T>(acc / l);
  }
}

// Prefill on tensor cores (bf16/fp16 only): the same tiles of Bc = 16 keys and the same online softmax, with the
// two products on WMMA 16x16x16 fragments: S = Q K^T (T operands, fp32 accumulation), then P V with P, the tile's
// probabilities exp(s - m_new), rounded to T (what FlashAttention feeds its second product) and fp32 accumulation.
// One block per (16 query rows of one sequence, KV head): warp w owns query head kvh * G + w, all warps share each
// K/V tile in shared memory. The running output O (16 x D, fp32) lives in shared memory, so each row can be
// rescaled by exp(m_old - m_new) before the tile's P V is added.
template <class T, int D>
__global__ void k_flash_tc(CudaArgs<T> a, int first_row, int nrows) {
  namespace wm = nvcuda::wmma;
  constexpr int kT = 16, DC = D / 16;  // tile rows/keys; 16-wide chunks of the head dimension
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int G = blockDim.x >> 5, w = threadIdx.x >> 5, lane = threadIdx.x & 31, kvh = blockIdx.y, h = kvh * G + w;
  const int row0 = first_row + blockIdx.x * kT, rows = min(kT, nrows - blockIdx.x * kT);
  T* Ks = reinterpret_cast<T*>(smem_raw);                  // [16, D]
  T* Vs = Ks + kT * D;                                     // [16, D]
  T* Qs = Vs + kT * D;                                     // per warp [16, D]
  float* Ss = reinterpret_cast<float*>(Qs + G * kT * D);   // per warp [16, 16]
  T* Ps = reinterpret_cast<T*>(Ss + G * kT * kT);          // per warp [16, 16]
  float* Os = reinterpret_cast<float*>(Ps + G * kT * kT);  // per warp [16, D]
  float* Ts = Os + G * kT * D;                             // per warp [16, 16] (one chunk of P V)
  float* Cs = Ts + G * kT * kT;                            // per warp [16]: the rows' corr, then 1 / l
  T* q_w = Qs + w * kT * D;
  float* s_w = Ss + w * kT * kT;
  T* p_w = Ps + w * kT * kT;
  float* o_w = Os + w * kT * D;
  float* t_w = Ts + w * kT * kT;
  float* c_w = Cs + w * kT;
  const int kv_stride = a.num_kv_heads * D, seq = a.row_seq[row0];
  const T* K = a.kcache[seq] + kvh * D;
  const T* V = a.vcache[seq] + kvh * D;
  // Q rows (zeros past the segment), O = 0; lanes 0..15 keep row state (m, l, visible keys).
  for (int i = lane; i < kT * D / 8; i += 32) {
    const int r = i / (D / 8), c = i % (D / 8);
    uint4 v = make_uint4(0, 0, 0, 0);
    if (r < rows) v = *reinterpret_cast<const uint4*>(a.q + static_cast<std::size_t>(row0 + r) * a.q_stride + h * D + 8 * c);
    *reinterpret_cast<uint4*>(q_w + r * D + 8 * c) = v;
  }
  for (int i = lane; i < kT * D; i += 32) o_w[i] = 0.0f;
  float m = -INFINITY, l = 0.0f;
  const int n_row = lane < rows ? a.row_pos[row0 + lane] + 1 : 0;  // keys row `lane` sees
  int n_max = 0;
  for (int r = 0; r < rows; ++r) n_max = max(n_max, a.row_pos[row0 + r] + 1);
  wm::fragment<wm::matrix_a, 16, 16, 16, T, wm::row_major> qf[DC];
  __syncwarp();
#pragma unroll
  for (int c = 0; c < DC; ++c) wm::load_matrix_sync(qf[c], q_w + 16 * c, D);
  for (int j0 = 0; j0 < n_max; j0 += kT) {
    const int nb = min(kT, n_max - j0);
    __syncthreads();  // the previous tile is consumed
    for (int i = threadIdx.x; i < kT * D / 8; i += blockDim.x) {
      const int r = i / (D / 8), c = i % (D / 8);
      uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
      if (r < nb) {
        const std::size_t src = static_cast<std::size_t>(j0 + r) * kv_stride + 8 * c;
        kv = *reinterpret_cast<const uint4*>(K + src);
        vv = *reinterpret_cast<const uint4*>(V + src);
      }
      *reinterpret_cast<uint4*>(Ks + r * D + 8 * c) = kv;
      *reinterpret_cast<uint4*>(Vs + r * D + 8 * c) = vv;
    }
    __syncthreads();
    // S = Q K^T: K tile [16 keys, D] row-major is K^T column-major.
    wm::fragment<wm::accumulator, 16, 16, 16, float> sf;
    wm::fill_fragment(sf, 0.0f);
#pragma unroll
    for (int c = 0; c < DC; ++c) {
      wm::fragment<wm::matrix_b, 16, 16, 16, T, wm::col_major> kf;
      wm::load_matrix_sync(kf, Ks + 16 * c, D);
      wm::mma_sync(sf, qf[c], kf, sf);
    }
    wm::store_matrix_sync(s_w, sf, kT, wm::mem_row_major);
    __syncwarp();
    // Online softmax, lane r < 16 for row r: m_new, corr = exp(m - m_new), p = exp(s - m_new) (0 past the row's keys).
    float corr = 1.0f;
    if (lane < kT) {
      float mx = -INFINITY;
      for (int j = 0; j < kT; ++j) {
        const float sc = j0 + j < n_row ? s_w[lane * kT + j] * a.scale : -INFINITY;
        s_w[lane * kT + j] = sc;
        mx = fmaxf(mx, sc);
      }
      const float m_new = fmaxf(m, mx);
      float psum = 0.0f;
      for (int j = 0; j < kT; ++j) {
        const float pj = m_new == -INFINITY ? 0.0f : expf(s_w[lane * kT + j] - m_new);
        psum += pj;
        p_w[lane * kT + j] = cuda::from_f<T>(pj);
      }
      corr = m_new == -INFINITY ? 1.0f : expf(m - m_new);
      l = l * corr + psum;
      m = m_new;
      c_w[lane] = corr;
    }
    __syncwarp();
    // O = O * corr (per row) + P V, one 16-column chunk at a time.
    wm::fragment<wm::matrix_a, 16, 16, 16, T, wm::row_major> pf;
    wm::load_matrix_sync(pf, p_w, kT);
#pragma unroll
    for (int c = 0; c < DC; ++c) {
      wm::fragment<wm::matrix_b, 16, 16, 16, T, wm::row_major> vf;
      wm::load_matrix_sync(vf, Vs + 16 * c, D);
      wm::fragment<wm::accumulator, 16, 16, 16, float> tf;
      wm::fill_fragment(tf, 0.0f);
      wm::mma_sync(tf, pf, vf, tf);
      wm::store_matrix_sync(t_w, tf, kT, wm::mem_row_major);
      __syncwarp();
      for (int i = lane; i < kT * kT; i += 32) {
        const int r = i / kT, cc = i % kT;
        float& o = o_w[r * D + 16 * c + cc];
        o = o * c_w[r] + t_w[i];
      }
      __syncwarp();
    }
  }
  if (lane < kT) c_w[lane] = 1.0f / l;
  __syncwarp();
  for (int i = lane; i < rows * D; i += 32) {
    const int r = i / D, d = i % D;
    a.out[(static_cast<std::size_t>(row0 + r) * a.num_heads + h) * D + d] = cuda::from_f<T>(o_w[i] * c_w[r]);
  }
}

// Shared memory of k_flash_tc for G query heads per KV head.
template <class T>
constexpr std::size_t flash_tc_smem(int G, int D) {
  return static_cast<std::size_t>(2 * 16 * D + G * 16 * D + G * 256) * sizeof(T) +
         static_cast<std::size_t>(G * 256 + G * 16 * D + G * 256 + G * 16) * sizeof(float);
}

template <class T, int Bc, bool Split>
void launch_flash(const CudaArgs<T>& a, dim3 grid, cudaStream_t s) {
  const int G = a.num_heads / a.num_kv_heads;
  auto go = [&]<int DR>() {
    const std::size_t smem = static_cast<std::size_t>(G) * DR * 32 * sizeof(float) +
                             static_cast<std::size_t>(Bc) * (2 * a.head_dim + cuda::ops::Vec<T>::n) * sizeof(T);
    if (smem > 48 * 1024)
      FPF_CUDA(cudaFuncSetAttribute(k_flash<T, Bc, DR, Split>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    k_flash<T, Bc, DR, Split><<<grid, 32 * G, smem, s>>>(a);
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
    if (a.scratch && a.rows <= kSplitMaxRows) {
      const int chunks = static_cast<int>(flash_split_chunks(a.max_keys, Bc));
      detail::launch_flash<T, Bc, true>(a, dim3(a.rows, a.num_kv_heads, chunks), s);
      constexpr int kCombineThreads = 256;
      const std::size_t smem = (static_cast<std::size_t>(chunks) + (kCombineThreads / 32) * a.head_dim) * sizeof(float);
      if (smem > 48 * 1024)
        FPF_CUDA(cudaFuncSetAttribute(detail::k_flash_combine<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
      detail::k_flash_combine<T><<<dim3(a.rows, a.num_heads), kCombineThreads, smem, s>>>(a, chunks);
      FPF_CUDA_LAUNCH("attention flash (split keys)");
      return;
    }
    detail::launch_flash<T, Bc, false>(a, dim3(a.rows, a.num_kv_heads), s);
    FPF_CUDA_LAUNCH("attention flash");
  }

  // Prefill of whole sequences (segs: each sequence's rows, consecutive in a): on tensor cores for bf16/fp16 with
  // Bc = 16 and head_dim 64 or 128 (k_flash_tc), else run().
  template <class T>
  static void run_prefill(const CudaArgs<T>& a, const std::vector<PrefillSeq<T>>& segs, PrefillWork<T>, cudaStream_t s = 0) {
    const int G = a.num_heads / a.num_kv_heads;
    if constexpr (!std::is_same_v<T, float> && Bc == 16) {
      if ((a.head_dim == 128 || a.head_dim == 64) && a.num_heads % a.num_kv_heads == 0 && G <= 16) {
        auto go = [&]<int D>() {
          const std::size_t smem = detail::flash_tc_smem<T>(G, D);
          static std::size_t raised = 48 * 1024;
          if (smem > raised) {
            FPF_CUDA(cudaFuncSetAttribute(detail::k_flash_tc<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
            raised = smem;
          }
          for (const PrefillSeq<T>& sq : segs)
            if (sq.rows > 0)
              detail::k_flash_tc<T, D><<<dim3((sq.rows + 15) / 16, a.num_kv_heads), 32 * G, smem, s>>>(a, sq.first_row, sq.rows);
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
