#pragma once
// The CUDA kernels of the attention policies: attn::Cuda<Policy>::run<T>(CudaArgs<T>, stream).
#include <fpf/attention/eager.cuh>
#include <fpf/attention/flash.cuh>
