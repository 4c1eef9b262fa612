#pragma once
// CUDA plumbing shared by the backend's kernels: error checks that name the call, an owning device buffer, and the
// element types the backend computes in (fp32, bf16, fp16 storage; every op accumulates in fp32).
//
// Floating-point contraction: nvcc fuses a*b+c into FMA by default (--fmad=true) and fpf keeps that default for
// CUDA code. The GPU is never expected to be bit-identical to the CPU reference (its reduction orders differ
// anyway); it must be bit-identical to itself, which FMA does not endanger (the same SASS runs every time), and it
// must stay within the parity tolerances (1e-5 relative per op in fp32), which the tests in tests/cuda check.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <algorithm>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <fpf/core/dtype.hpp>
#include <fpf/core/error.hpp>

namespace fpf::cuda {

inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw Error("cuda", std::string(what) + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")");
}
#define FPF_CUDA(call) ::fpf::cuda::check((call), #call)
// After a kernel launch: launch errors at once (no synchronisation).
#define FPF_CUDA_LAUNCH(what) ::fpf::cuda::check(cudaGetLastError(), what)

using bf16 = __nv_bfloat16;
using fp16 = __half;

// The storage type's dtype, for conversions and messages.
template <class T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::F32; }
template <> constexpr DType dtype_of<bf16>() { return DType::BF16; }
template <> constexpr DType dtype_of<fp16>() { return DType::F16; }

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(fp16 x) { return __half2float(x); }
template <class T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f<bf16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ fp16 from_f<fp16>(float x) { return __float2half_rn(x); }

// An owning, move-only device allocation of n elements of T (cudaMalloc, never managed memory).
template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(std::size_t n) { resize(n); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      release();
      p_ = std::exchange(o.p_, nullptr);
      n_ = std::exchange(o.n_, 0);
    }
    return *this;
  }
  ~DeviceBuffer() { release(); }

  // Drops the contents; reallocates only when growing. Returns whether the allocation moved.
  bool resize(std::size_t n) {
    if (n <= n_ && p_ != nullptr) return false;
    release();
    if (n == 0) return true;
    void* p = nullptr;
    const cudaError_t e = cudaMalloc(&p, n * sizeof(T));
    if (e != cudaSuccess)
      throw Error("cuda", "cudaMalloc of " + std::to_string(n * sizeof(T)) + " bytes failed: " + cudaGetErrorString(e));
    p_ = static_cast<T*>(p);
    n_ = n;
    return true;
  }
  void upload(const T* host, std::size_t n, std::size_t offset = 0) {
    FPF_CUDA(cudaMemcpy(p_ + offset, host, n * sizeof(T), cudaMemcpyHostToDevice));
  }
  void upload(const std::vector<T>& host) {
    resize(host.size());
    upload(host.data(), host.size());
  }
  std::vector<T> download(std::size_t n) const {
    std::vector<T> out(n);
    if (n) FPF_CUDA(cudaMemcpy(out.data(), p_, n * sizeof(T), cudaMemcpyDeviceToHost));
    return out;
  }
  T* get() const { return p_; }
  std::size_t size() const { return n_; }

 private:
  void release() noexcept {
    if (p_) cudaFree(p_);
    p_ = nullptr;
    n_ = 0;
  }
  T* p_ = nullptr;
  std::size_t n_ = 0;
};

// Page-locked host memory (cudaMallocHost), so that copies to and from the device are direct DMA and may be
// asynchronous. reserve() grows only (dropping the contents).
template <class T>
class HostBuffer {
 public:
  HostBuffer() = default;
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;
  ~HostBuffer() {
    if (p_ != nullptr) cudaFreeHost(p_);
  }
  // Returns whether the buffer moved (a captured graph copying to or from it must be captured again).
  bool reserve(std::size_t n) {
    if (n <= n_) return false;
    if (p_ != nullptr) cudaFreeHost(p_);
    p_ = nullptr, n_ = 0;
    void* p = nullptr;
    check(cudaMallocHost(&p, n * sizeof(T)), "cudaMallocHost");
    p_ = static_cast<T*>(p), n_ = n;
    return true;
  }
  T* get() const { return p_; }

 private:
  T* p_ = nullptr;
  std::size_t n_ = 0;
};

// Host-to-device copies of large pageable data (mmapped checkpoints, repacked weights) through two pinned staging
// buffers: the host copy into one buffer overlaps the DMA out of the other. Pageable cudaMemcpy stages through the
// driver's own small buffer, which is several times slower at this size.
class PinnedUploader {
 public:
  explicit PinnedUploader(std::size_t buffer_bytes = 64u << 20) : kBuffer(buffer_bytes) {
    for (int i = 0; i < 2; ++i) {
      buf_[i].reserve(kBuffer);
      check(cudaEventCreateWithFlags(&done_[i], cudaEventDisableTiming), "cudaEventCreate");
    }
    check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
  }
  PinnedUploader(const PinnedUploader&) = delete;
  PinnedUploader& operator=(const PinnedUploader&) = delete;
  ~PinnedUploader() {
    cudaStreamSynchronize(stream_);  // before the buffers are freed (after this body)
    for (int i = 0; i < 2; ++i) cudaEventDestroy(done_[i]);
    cudaStreamDestroy(stream_);
  }
  void copy(void* dst, const void* src, std::size_t bytes) {
    auto* d = static_cast<std::byte*>(dst);
    const auto* h = static_cast<const std::byte*>(src);
    for (std::size_t done = 0; done < bytes;) {
      const std::size_t n = std::min(kBuffer, bytes - done);
      check(cudaEventSynchronize(done_[cur_]), "cudaEventSynchronize");  // this buffer's previous DMA has finished
      std::memcpy(buf_[cur_].get(), h + done, n);
      check(cudaMemcpyAsync(d + done, buf_[cur_].get(), n, cudaMemcpyHostToDevice, stream_), "cudaMemcpyAsync");
      check(cudaEventRecord(done_[cur_], stream_), "cudaEventRecord");
      cur_ ^= 1;
      done += n;
    }
  }
  // Waits for every copy so far (before the device data is used on another stream).
  void finish() { check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize"); }

 private:
  std::size_t kBuffer;
  HostBuffer<std::byte> buf_[2];
  cudaEvent_t done_[2]{};
  cudaStream_t stream_{};
  int cur_ = 0;
};

// ---- block / warp reductions with one fixed order (butterfly within a warp, then warp 0 over the warp sums) ----
template <class V>
__device__ __forceinline__ V warp_sum(V v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result. scratch: 32 V.
template <class V>
__device__ __forceinline__ V block_sum(V v, V* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  V t = lane < nw ? scratch[lane] : V(0);
  t = warp_sum(t);
  return t;
}
__device__ __forceinline__ float block_max(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float t = lane < nw ? scratch[lane] : -INFINITY;
  return warp_max(t);
}

// ---- programmatic dependent launch (PDL, sm_90) ----
// A kernel launched by cuda::launch may start while the kernel before it in the stream is still running (its blocks
// are scheduled as soon as the earlier kernel's blocks have all passed their pdl_begin), so its start-up overlaps
// the earlier kernel's tail instead of following the earlier kernel's last block. Such a kernel must call pdl_wait
// (or pdl_begin) in every block before it reads or writes global memory that an earlier kernel writes or reads:
// pdl_wait returns when the earlier kernel has finished and its writes are visible. Before it only data that no
// kernel writes may be read (weights). A kernel launched with <<<>>> needs none of this (it starts after the
// earlier kernel has finished), and pdl_wait in a kernel launched that way returns at once, so the values never
// depend on whether PDL is on: it changes when blocks start, not what they compute.
#ifdef FPF_PDL_TRACE
// Instrumentation for fpf-cuda-kernel-bench's layer trace (FPF_PDL_TRACE is defined in that program only): the GPU
// times at which block (0, 0, 0) of each launch reaches and leaves pdl_wait, with the launch's shape. The gaps
// between the launches' releases are the time each kernel adds to the chain.
struct PdlTraceRec {
  unsigned long long t, arrive;  // leaving pdl_wait, reaching it
  unsigned gx, gy, gz, bx;
};
__device__ PdlTraceRec* g_pdl_trace;
__device__ unsigned g_pdl_trace_n, g_pdl_trace_cap;
#endif
__device__ __forceinline__ void pdl_wait() {
#ifdef FPF_PDL_TRACE
  unsigned long long t0;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
#endif
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
#ifdef FPF_PDL_TRACE
  if (threadIdx.x == 0 && blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0 && g_pdl_trace != nullptr) {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    const unsigned i = atomicAdd(&g_pdl_trace_n, 1u);
    if (i < g_pdl_trace_cap) g_pdl_trace[i] = {t, t0, gridDim.x, gridDim.y, gridDim.z, blockDim.x};
  }
#endif
}
// Lets the next kernel's blocks be scheduled (they wait in their own pdl_wait for this kernel to finish).
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_begin() {
  pdl_wait();
  pdl_trigger();
}

// ---- L2 eviction policy for decode's streaming reads (sm_80+) ----
// A decode step reads each weight and each cached key / value once, and the next read of the same bytes is a whole
// step (gigabytes) later: they are loaded with an evict-first policy, so that these streams do not push out of L2
// what the decode's L2 prefetch brought in for the next kernels (the next layer's KV caches and weights).
__device__ __forceinline__ std::uint64_t l2_evict_first() {
  std::uint64_t pol = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
#endif
  return pol;
}
// 16 bytes, zero-filled where !valid (src must still be a valid address), with an L2 policy.
__device__ __forceinline__ void cp_async16_hint(void* dst, const void* src, bool valid, std::uint64_t pol) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(d), "l"(src), "r"(valid ? 16 : 0),
               "l"(pol)
               : "memory");
#endif
}
// 16 bytes by a non-coherent load with an L2 policy (data no kernel of the step writes).
__device__ __forceinline__ uint4 ldg16(const uint4* p, std::uint64_t pol) {
  uint4 v;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p), "l"(pol));
#else
  v = *p;
#endif
  return v;
}

// ---- thread-block clusters (sm_90; call only from code compiled for it) ----
// Raw PTX: cooperative_groups' header brings a namespace `cuda` that clashes with fpf::cuda.
__device__ __forceinline__ unsigned cluster_rank() {  // this block's rank in its cluster
  unsigned r = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
#endif
  return r;
}
// The shared::cluster address of `smem` (this block's shared memory) in block `rank` of the cluster.
__device__ __forceinline__ std::uint32_t cluster_map(const void* smem, unsigned rank) {
  std::uint32_t r = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const auto a = static_cast<std::uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(rank));
#endif
  return r;
}
__device__ __forceinline__ void cluster_store(std::uint32_t addr, float v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("st.shared::cluster.f32 [%0], %1;" ::"r"(addr), "f"(v) : "memory");
#endif
}
// Every thread of every block of the cluster: the stores before it (shared::cluster ones included) are visible to
// every thread of the cluster after it (arrive.release, wait.acquire).
__device__ __forceinline__ void cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
#endif
}

// The current device's attributes that kernels' launchers choose by, queried once per device.
struct DeviceInfo {
  int id = 0, sms = 0, major = 0, smem_optin = 0;
};
inline const DeviceInfo& device_info() {
  static DeviceInfo info[64];
  int dev = 0;
  FPF_CUDA(cudaGetDevice(&dev));
  DeviceInfo& d = info[dev & 63];
  if (d.sms == 0) {
    d.id = dev;
    FPF_CUDA(cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, dev));
    FPF_CUDA(cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    FPF_CUDA(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev));
  }
  return d;
}

// Whether cuda::launch asks for PDL: on sm_90 (the build's native code there holds griddepcontrol; other GPUs run
// the PTX for sm_80, which has none) unless FPF_PDL=0. Tests flip it to compare both.
inline bool& pdl_enabled() {
  static bool on = [] {
    const char* e = std::getenv("FPF_PDL");
    if (e != nullptr && std::string(e) == "0") return false;
    int dev = 0, major = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess)
      return false;
    return major == 9;
  }();
  return on;
}

// k<<<grid, block, smem, s>>>(args...) with the PDL attribute when pdl_enabled(); k must follow pdl_wait's rule.
// cluster_x > 0: the grid's blocks form thread-block clusters of cluster_x blocks along x (sm_90).
template <class... P, class... A>
void launch_ex(const char* what, void (*k)(P...), unsigned cluster_x, dim3 grid, dim3 block, std::size_t smem, cudaStream_t s,
               A&&... args) {
  cudaLaunchAttribute at[2]{};
  unsigned n = 0;
  if (pdl_enabled()) {
    at[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at[n++].val.programmaticStreamSerializationAllowed = 1;
  }
  if (cluster_x > 0) {
    at[n].id = cudaLaunchAttributeClusterDimension;
    at[n++].val.clusterDim = {cluster_x, 1, 1};
  }
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = s;
  cfg.attrs = at;
  cfg.numAttrs = n;
  check(cudaLaunchKernelEx(&cfg, k, std::forward<A>(args)...), what);
}
template <class... P, class... A>
void launch(const char* what, void (*k)(P...), dim3 grid, dim3 block, std::size_t smem, cudaStream_t s, A&&... args) {
  launch_ex(what, k, 0, grid, block, smem, s, std::forward<A>(args)...);
}

// Two floats rounded to T (bf16 or fp16, nearest even), lo in the low half: a 32-bit tensor-core operand or store.
template <class T>
__device__ __forceinline__ std::uint32_t pack2(float lo, float hi) {
  std::uint32_t r;
  if constexpr (std::is_same_v<T, bf16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    std::memcpy(&r, &v, 4);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    std::memcpy(&r, &v, 4);
  }
  return r;
}

// Tensor-core product (mma.sync, sm_80+), c += a b: A 16x16 (row), B 16x8 (col), C 16x8 fp32.
template <class T>
__device__ __forceinline__ void mma16816(float (&c)[4], const std::uint32_t (&a)[4], std::uint32_t b0, std::uint32_t b1) {
  if constexpr (std::is_same_v<T, bf16>)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

inline unsigned blocks_for(std::size_t n, unsigned threads) { return static_cast<unsigned>((n + threads - 1) / threads); }

}  // namespace fpf::cuda
