#pragma once
// attn::Eager on the GPU: the same algorithm as Eager::cpu: all scores of a query materialized (in shared memory),
// softmax in fp32 (max-subtracted, then divided by the sum), then P.V. One block per (query row, head); thread j
// computes score j as one sequential dot product; sums over the block use one fixed tree order.
#include <vector>

#include <fpf/attention/attention.hpp>
#include <fpf/attention/cuda_args.cuh>
#include <fpf/backend/cuda/gemm.cuh>

namespace fpf::attn {

namespace detail {

template <class T, int HD>
__global__ void k_eager(CudaArgs<T> a) {
  extern __shared__ float sm[];
  __shared__ float scratch[32];
  const int D = a.head_dim, r = blockIdx.x, h = blockIdx.y;
  const int kvh = h / (a.num_heads / a.num_kv_heads), kv_stride = a.num_kv_heads * D;
  const int n = a.row_pos[r] + 1;
  float* qs = sm;
  float* sc = sm + D;
  const T* q = a.q + static_cast<std::size_t>(r) * a.q_stride + h * D;
  const T* K = a.kcache[a.row_seq[r]] + kvh * D;
  const T* V = a.vcache[a.row_seq[r]] + kvh * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) qs[d] = cuda::to_f(q[d]);
  __syncthreads();
  constexpr int Vn = cuda::ops::Vec<T>::n;
  float mx = -INFINITY;
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    const auto* kr = reinterpret_cast<const cuda::ops::Vec<T>*>(K + static_cast<std::size_t>(j) * kv_stride);
    float s = 0.0f;
    const int nc = HD ? HD / Vn : D / Vn;  // a compile-time head_dim unrolls the row: all its loads in flight
#pragma unroll
    for (int c = 0; c < nc; ++c) {
      const cuda::ops::Vec<T> kv = kr[c];
#pragma unroll
      for (int i = 0; i < Vn; ++i) s += qs[c * Vn + i] * cuda::to_f(kv.v[i]);
    }
    s *= a.scale;
    sc[j] = s;
    mx = fmaxf(mx, s);
  }
  mx = cuda::block_max(mx, scratch);
  float sum = 0.0f;
  for (int j = threadIdx.x; j < n; j += blockDim.x) sum += (sc[j] = expf(sc[j] - mx));
  sum = cuda::block_sum(sum, scratch);
  for (int j = threadIdx.x; j < n; j += blockDim.x) sc[j] = sc[j] / sum;
  __syncthreads();
  T* o = a.out + static_cast<std::size_t>(r) * a.num_heads * D + h * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.0f;
#pragma unroll 32
    for (int j = 0; j < n; ++j) acc += sc[j] * cuda::to_f(V[static_cast<std::size_t>(j) * kv_stride + d]);
    o[d] = cuda::from_f<T>(acc);
  }
}

// Split path. E1: scores of one chunk of keys, thread per key, into S [rows, heads, max_keys].
template <class T, int HD>
__global__ void k_eager_scores(CudaArgs<T> a) {
  extern __shared__ float qs[];
  const int D = a.head_dim, r = blockIdx.x, h = blockIdx.y;
  const int kvh = h / (a.num_heads / a.num_kv_heads), kv_stride = a.num_kv_heads * D;
  const int n = a.row_pos[r] + 1, j = blockIdx.z * kSplitKeys + threadIdx.x;
  const T* q = a.q + static_cast<std::size_t>(r) * a.q_stride + h * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) qs[d] = cuda::to_f(q[d]);
  __syncthreads();
  if (j >= n) return;
  const T* K = a.kcache[a.row_seq[r]] + kvh * D;
  constexpr int Vn = cuda::ops::Vec<T>::n;
  const auto* kr = reinterpret_cast<const cuda::ops::Vec<T>*>(K + static_cast<std::size_t>(j) * kv_stride);
  float s = 0.0f;
  const int nc = HD ? HD / Vn : D / Vn;
#pragma unroll
  for (int c = 0; c < nc; ++c) {
    const cuda::ops::Vec<T> kv = kr[c];
#pragma unroll
    for (int i = 0; i < Vn; ++i) s += qs[c * Vn + i] * cuda::to_f(kv.v[i]);
  }
  a.scratch[(static_cast<std::size_t>(r) * a.num_heads + h) * a.max_keys + j] = s * a.scale;
}
// E2: softmax of one (row, head) in place: max, exp, block sum, divide.
template <class T>
__global__ void k_eager_softmax(CudaArgs<T> a) {
  __shared__ float scratch[32];
  const int r = blockIdx.x, h = blockIdx.y, n = a.row_pos[r] + 1;
  float* sc = a.scratch + (static_cast<std::size_t>(r) * a.num_heads + h) * a.max_keys;
  float mx = -INFINITY;
  for (int j = threadIdx.x; j < n; j += blockDim.x) mx = fmaxf(mx, sc[j]);
  mx = cuda::block_max(mx, scratch);
  float sum = 0.0f;
  for (int j = threadIdx.x; j < n; j += blockDim.x) sum += (sc[j] = expf(sc[j] - mx));
  sum = cuda::block_sum(sum, scratch);
  for (int j = threadIdx.x; j < n; j += blockDim.x) sc[j] = sc[j] / sum;
}
// E3: P.V over one chunk of keys, thread per output dim, keys in order.
template <class T>
__global__ void k_eager_pv(CudaArgs<T> a) {
  const int D = a.head_dim, r = blockIdx.x, h = blockIdx.y, c = blockIdx.z, d = threadIdx.x;
  const int kvh = h / (a.num_heads / a.num_kv_heads), kv_stride = a.num_kv_heads * D;
  const int n = a.row_pos[r] + 1, j0 = c * kSplitKeys, j1 = min(n, j0 + kSplitKeys);
  const std::size_t rh = static_cast<std::size_t>(r) * a.num_heads + h;
  const float* p = a.scratch + rh * a.max_keys;
  float* part = a.scratch + static_cast<std::size_t>(a.rows) * a.num_heads * a.max_keys +
                (rh * split_chunks(a.max_keys) + c) * D;
  if (d >= D) return;
  const T* V = a.vcache[a.row_seq[r]] + kvh * D + d;
  float acc = 0.0f;
#pragma unroll 32
  for (int j = j0; j < j1; ++j) acc += p[j] * cuda::to_f(V[static_cast<std::size_t>(j) * kv_stride]);
  part[d] = acc;
}
// E4: the chunks' sums, in chunk order.
template <class T>
__global__ void k_eager_reduce(CudaArgs<T> a) {
  const int D = a.head_dim, r = blockIdx.x, h = blockIdx.y, d = threadIdx.x;
  if (d >= D) return;
  const int n = a.row_pos[r] + 1, chunks = (n + kSplitKeys - 1) / kSplitKeys;
  const std::size_t rh = static_cast<std::size_t>(r) * a.num_heads + h;
  const float* part = a.scratch + static_cast<std::size_t>(a.rows) * a.num_heads * a.max_keys + rh * split_chunks(a.max_keys) * D;
  float acc = 0.0f;
#pragma unroll 8
  for (int c = 0; c < chunks; ++c) acc += part[static_cast<std::size_t>(c) * D + d];
  a.out[rh * D + d] = cuda::from_f<T>(acc);
}

// Prefill path: the causal softmax of one sequence's score rows S [rows, ld] (fp32, already scaled); row t sees
// p0 + t + 1 keys. Writes P [rows, ld] in T, zero past each row's last visible key.
template <class T>
__global__ void k_eager_softmax_rows(const float* __restrict__ S, int n, int ld, int p0, T* __restrict__ P) {
  __shared__ float scratch[32];
  const int t = blockIdx.x, valid = p0 + t + 1;
  const float* s = S + static_cast<std::size_t>(t) * ld;
  T* p = P + static_cast<std::size_t>(t) * ld;
  float mx = -INFINITY;
  for (int j = threadIdx.x; j < valid; j += blockDim.x) mx = fmaxf(mx, s[j]);
  mx = cuda::block_max(mx, scratch);
  float sum = 0.0f;
  for (int j = threadIdx.x; j < valid; j += blockDim.x) sum += expf(s[j] - mx);
  sum = cuda::block_sum(sum, scratch);
  for (int j = threadIdx.x; j < n; j += blockDim.x) p[j] = cuda::from_f<T>(j < valid ? expf(s[j] - mx) / sum : 0.0f);
}

}  // namespace detail

template <>
struct Cuda<Eager> {
  // Prefill (many rows): HF's eager exactly: per sequence and head, the scores S = scale * Q K^T materialized in fp32
  // by one product (cuBLASLt, fp32 accumulation), the causal softmax in fp32 rounded to T, then O = P V by a second
  // product. The full [rows, keys] square is computed; the masked part gets probability 0.
  template <class T>
  static void run_prefill(const CudaArgs<T>& a, const std::vector<PrefillSeq<T>>& seqs, PrefillWork<T> w,
                          cudaStream_t s = 0) {
    cuda::Gemm& gemm = w.gemm;
    cuda::DeviceBuffer<float>& S = w.scores;
    cuda::DeviceBuffer<T>& P = w.probs;
    const int D = a.head_dim, G = a.num_heads / a.num_kv_heads, kv_dim = a.num_kv_heads * D, q_dim = a.num_heads * D;
    for (const PrefillSeq<T>& sq : seqs) {
      if (sq.rows == 0) continue;
      const int n = sq.p0 + sq.rows, ld = (n + 7) / 8 * 8;
      S.resize(static_cast<std::size_t>(sq.rows) * ld);
      P.resize(static_cast<std::size_t>(sq.rows) * ld);
      for (int h = 0; h < a.num_heads; ++h) {
        const int g = h / G;
        gemm.gemm<T, float>(a.q + static_cast<std::size_t>(sq.first_row) * a.q_stride + h * D, static_cast<int>(a.q_stride), sq.rows,
                            sq.k + g * D, kv_dim, true, n, D, S.get(), ld, a.scale, s);
        detail::k_eager_softmax_rows<T><<<sq.rows, 256, 0, s>>>(S.get(), n, ld, sq.p0, P.get());
        FPF_CUDA_LAUNCH("attention eager softmax");
        gemm.gemm<T, T>(P.get(), ld, sq.rows, sq.v + g * D, kv_dim, false, D, n,
                        a.out + static_cast<std::size_t>(sq.first_row) * q_dim + h * D, q_dim, 1.0f, s);
      }
    }
  }

  template <class T>
  static void run(const CudaArgs<T>& a, cudaStream_t s = 0) {
    if (a.rows == 0) return;
    if (a.head_dim % 8 != 0 || a.head_dim > 1024) throw Error("config.json: head_dim", "the CUDA attention kernels need a multiple of 8");
    if (a.scratch && a.rows <= kSplitMaxRows) {
      const dim3 rh(a.rows, a.num_heads), rhc(a.rows, a.num_heads, static_cast<unsigned>(split_chunks(a.max_keys)));
      const unsigned dt = static_cast<unsigned>((a.head_dim + 31) / 32 * 32);
      if (a.head_dim == 128) detail::k_eager_scores<T, 128><<<rhc, kSplitKeys, a.head_dim * sizeof(float), s>>>(a);
      else detail::k_eager_scores<T, 0><<<rhc, kSplitKeys, a.head_dim * sizeof(float), s>>>(a);
      detail::k_eager_softmax<T><<<rh, 1024, 0, s>>>(a);
      detail::k_eager_pv<T><<<rhc, dt, 0, s>>>(a);
      detail::k_eager_reduce<T><<<rh, dt, 0, s>>>(a);
      FPF_CUDA_LAUNCH("attention eager (split keys)");
      return;
    }
    const std::size_t smem = (static_cast<std::size_t>(a.max_keys) + a.head_dim) * sizeof(float);
    static std::size_t raised = 48 * 1024;
    if (smem > raised) {
      int dev = 0, optin = 0;
      FPF_CUDA(cudaGetDevice(&dev));
      FPF_CUDA(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
      if (smem > static_cast<std::size_t>(optin))
        throw Error("attention", "eager attention keeps all " + std::to_string(a.max_keys) +
                                     " scores of a query in shared memory; this GPU allows " + std::to_string(optin / 4) +
                                     " (use --attention flash for longer sequences)");
      FPF_CUDA(cudaFuncSetAttribute(detail::k_eager<T, 0>, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
      FPF_CUDA(cudaFuncSetAttribute(detail::k_eager<T, 128>, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
      raised = static_cast<std::size_t>(optin);
    }
    if (a.head_dim == 128) detail::k_eager<T, 128><<<dim3(a.rows, a.num_heads), 128, smem, s>>>(a);
    else detail::k_eager<T, 0><<<dim3(a.rows, a.num_heads), 128, smem, s>>>(a);
    FPF_CUDA_LAUNCH("attention eager");
  }
};

}  // namespace fpf::attn
