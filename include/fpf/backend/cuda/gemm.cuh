#pragma once
// Dense products Y[M, N] = X[M, K] W[N, K]^T (PyTorch's Linear, W row-major [out, in]) through cuBLASLt, with the
// determinism rules of DESIGN.md: the algorithm is chosen once per (shape, dtype, alignment) by one heuristic query
// and pinned for the life of the handle; split-K reductions are excluded (CUBLASLT_REDUCTION_SCHEME_NONE), the
// workspace size is fixed, and fp32 runs with CUBLAS_COMPUTE_32F (never _FAST_TF32). bf16/fp16 operands accumulate
// in fp32 (CUBLAS_COMPUTE_32F, fp32 alpha/beta) and the output is rounded once to the storage type.
// Products with at most ops::kGemvMaxRows rows (decode) go to ops::gemv instead: one warp per output, fixed order.
#include <cublasLt.h>

#include <map>
#include <tuple>

#include <fpf/backend/cuda/common.cuh>
#include <fpf/backend/cuda/ops.cuh>

namespace fpf::cuda {

inline void check_lt(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS) throw Error("cublasLt", std::string(what) + " failed: status " + std::to_string(static_cast<int>(s)));
}
#define FPF_LT(call) ::fpf::cuda::check_lt((call), #call)

template <class T> constexpr cudaDataType_t cuda_type();
template <> constexpr cudaDataType_t cuda_type<float>() { return CUDA_R_32F; }
template <> constexpr cudaDataType_t cuda_type<bf16>() { return CUDA_R_16BF; }
template <> constexpr cudaDataType_t cuda_type<fp16>() { return CUDA_R_16F; }

class Gemm {
 public:
  static constexpr std::size_t kWorkspaceBytes = 32u << 20;

  Gemm() {
    FPF_LT(cublasLtCreate(&h_));
    workspace_.resize(kWorkspaceBytes);
  }
  Gemm(const Gemm&) = delete;
  Gemm& operator=(const Gemm&) = delete;
  ~Gemm() {
    for (auto& [key, p] : plans_) {
      cublasLtMatmulDescDestroy(p.desc);
      cublasLtMatrixLayoutDestroy(p.a);
      cublasLtMatrixLayoutDestroy(p.b);
      cublasLtMatrixLayoutDestroy(p.c);
    }
    if (h_) cublasLtDestroy(h_);
  }

  // Y = X W^T. Uses ops::gemv for M <= kGemvMaxRows unless force_lt.
  template <class T>
  void linear(const T* X, int M, const T* W, int N, int K, T* Y, cudaStream_t s = 0, bool force_lt = false) {
    if (M == 0) return;
    if (M <= ops::kGemvMaxRows && !force_lt) return ops::gemv<T>(X, M, W, N, K, Y, s);
    gemm<T, T>(X, K, M, W, K, /*w_is_nk=*/true, N, K, Y, N, 1.0f, s);
  }

  // batch products at once: Y_b[M, N] = X_b[M, K] W_b[N, K]^T for b < batch, each operand a run of matrices at a
  // fixed stride (elements). Always cuBLASLt (one launch: the prefill's experts, padded to a common M).
  template <class T>
  void linear_batched(const T* X, int M, const T* W, int N, int K, T* Y, int batch, long long sx, long long sw, long long sy,
                      cudaStream_t s = 0) {
    if (M == 0 || N == 0 || batch == 0) return;
    const Plan& p = plan<T, T>(M, N, K, K, K, N, true, align(X), align(W), align(Y), batch, sx, sw, sy);
    const float alpha = 1.0f, beta = 0.0f;
    FPF_LT(cublasLtMatmul(h_, p.desc, &alpha, W, p.a, X, p.b, &beta, Y, p.c, Y, p.c, &p.algo, workspace_.get(),
                          kWorkspaceBytes, s));
  }

  // The general product on row-major matrices with leading dimensions: Y[M, N] (ld ldy, type TY) = alpha * X[M, K]
  // (ld ldx) * op(W), where op(W) = W^T for W [N, K] (w_is_nk) or W for W [K, N], ld ldw. fp32 accumulation.
  template <class T, class TY>
  void gemm(const T* X, int ldx, int M, const T* W, int ldw, bool w_is_nk, int N, int K, TY* Y, int ldy, float alpha,
            cudaStream_t s = 0) {
    if (M == 0 || N == 0) return;
    const Plan& p = plan<T, TY>(M, N, K, ldx, ldw, ldy, w_is_nk, align(X), align(W), align(Y));
    const float beta = 0.0f;
    FPF_LT(cublasLtMatmul(h_, p.desc, &alpha, W, p.a, X, p.b, &beta, Y, p.c, Y, p.c, &p.algo, workspace_.get(),
                          kWorkspaceBytes, s));
  }

  std::size_t plans() const { return plans_.size(); }

 private:
  struct Plan {
    cublasLtMatmulDesc_t desc{};
    cublasLtMatrixLayout_t a{}, b{}, c{};
    cublasLtMatmulAlgo_t algo{};
  };
  using Key = std::tuple<int, int, int, int, int, int, int, int, int, unsigned, unsigned, unsigned, int, long long, long long,
                         long long>;

  static unsigned align(const void* p) {
    const auto a = reinterpret_cast<std::uintptr_t>(p);
    unsigned al = 256;
    while (al > 1 && a % al != 0) al >>= 1;
    return al;
  }

  template <class T, class TY>
  const Plan& plan(int M, int N, int K, int ldx, int ldw, int ldy, bool w_is_nk, unsigned ax, unsigned aw, unsigned ay,
                   int batch = 1, long long sx = 0, long long sw = 0, long long sy = 0) {
    const Key key{M, N, K, ldx, ldw, ldy, w_is_nk ? 1 : 0, static_cast<int>(cuda_type<T>()), static_cast<int>(cuda_type<TY>()),
                  ax, aw, ay, batch, sx, sw, sy};
    if (auto it = plans_.find(key); it != plans_.end()) return it->second;
    Plan p;
    const cudaDataType_t t = cuda_type<T>(), ty = cuda_type<TY>();
    FPF_LT(cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t opA = w_is_nk ? CUBLAS_OP_T : CUBLAS_OP_N, opN = CUBLAS_OP_N;
    FPF_LT(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &opA, sizeof opA));
    FPF_LT(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &opN, sizeof opN));
    // Column-major view: Y^T [N, M] = op(W) [N, K] * X^T [K, M].
    if (w_is_nk) FPF_LT(cublasLtMatrixLayoutCreate(&p.a, t, K, N, ldw));
    else FPF_LT(cublasLtMatrixLayoutCreate(&p.a, t, N, K, ldw));
    FPF_LT(cublasLtMatrixLayoutCreate(&p.b, t, K, M, ldx));
    FPF_LT(cublasLtMatrixLayoutCreate(&p.c, ty, N, M, ldy));
    if (batch > 1) {
      const std::int32_t b = batch;
      const std::int64_t strides[3] = {sw, sx, sy};
      cublasLtMatrixLayout_t* layouts[3] = {&p.a, &p.b, &p.c};
      for (int i = 0; i < 3; ++i) {
        FPF_LT(cublasLtMatrixLayoutSetAttribute(*layouts[i], CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &b, sizeof b));
        FPF_LT(cublasLtMatrixLayoutSetAttribute(*layouts[i], CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &strides[i], sizeof strides[i]));
      }
    }
    cublasLtMatmulPreference_t pref{};
    FPF_LT(cublasLtMatmulPreferenceCreate(&pref));
    const std::uint64_t ws = kWorkspaceBytes;
    const std::uint32_t no_split_reduction = CUBLASLT_REDUCTION_SCHEME_NONE;
    FPF_LT(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws));
    FPF_LT(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &no_split_reduction,
                                                sizeof no_split_reduction));
    const std::uint32_t a_al = aw, b_al = ax, c_al = ay;
    FPF_LT(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &a_al, sizeof a_al));
    FPF_LT(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &b_al, sizeof b_al));
    FPF_LT(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &c_al, sizeof c_al));
    FPF_LT(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &c_al, sizeof c_al));
    cublasLtMatmulHeuristicResult_t res{};
    int found = 0;
    const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(h_, p.desc, p.a, p.b, p.c, p.c, pref, 1, &res, &found);
    cublasLtMatmulPreferenceDestroy(pref);
    if (st != CUBLAS_STATUS_SUCCESS || found == 0)
      throw Error("cublasLt", "no algorithm for " + std::to_string(M) + "x" + std::to_string(N) + "x" + std::to_string(K));
    p.algo = res.algo;
    return plans_.emplace(key, p).first->second;
  }

  cublasLtHandle_t h_{};
  DeviceBuffer<std::byte> workspace_;
  std::map<Key, Plan> plans_;
};

}  // namespace fpf::cuda
