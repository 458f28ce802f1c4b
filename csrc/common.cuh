// Shared by the simmim_fast CUDA ops: dtype dispatch, 16-byte vector access, deterministic block sums.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
// c10's CUDA headers only: ATen/cuda/CUDAContext.h would pull cuBLAS/cuSPARSE headers that a
// minimal CUDA toolkit lacks.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

namespace simmim_fast {

constexpr int kThreads = 256;
constexpr int kVectorBytes = 16;

// fp32 / fp16 / bf16 only: every kernel accumulates in fp32, which would silently drop fp64 precision.
#define SIMMIM_DISPATCH_FLOATS(TYPE, NAME, ...)                          \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                         \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

inline void check_kernel_dtype(const at::Tensor& t, const char* name) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, name,
              " must be float32, float16 or bfloat16, got ", dtype);
}

inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
}

// A (B, ...) 0/1 token mask of any dtype as contiguous float32 weights, one per token (tiny: B*L).
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline at::Tensor token_weights(const at::Tensor& mask) {
  return mask.flatten(1).to(at::kFloat).contiguous();
}

inline bool is_aligned(const void* pointer) {
  return reinterpret_cast<std::uintptr_t>(pointer) % kVectorBytes == 0;
}

// 16-byte access needs rows that split into whole vectors (a vector never straddles two rows) and
// 16-byte aligned buffers; nullptr stands for a buffer that is not accessed as vectors.
inline bool vectorisable(int64_t row_length, int vector_width, std::initializer_list<const void*> buffers) {
  if (row_length % vector_width != 0) return false;
  for (const void* buffer : buffers) {
    if (buffer != nullptr && !is_aligned(buffer)) return false;
  }
  return true;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid-stride kernels: enough blocks to fill the device, never more than the work needs.
inline int64_t grid_size(int64_t work_items, int blocks_per_sm = 4) {
  int multiprocessors = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  const int64_t device_blocks = static_cast<int64_t>(multiprocessors) * blocks_per_sm;
  return std::max<int64_t>(1, std::min(ceil_div(work_items, kThreads), device_blocks));
}

// Calls launch(std::integral_constant<int, W>{}) with W = 16 bytes of scalar_t when `use_vectors`, else 1.
template <typename scalar_t, typename Launch>
void with_vector_width(bool use_vectors, Launch&& launch) {
  constexpr int kWide = kVectorBytes / sizeof(scalar_t);
  if (use_vectors) {
    launch(std::integral_constant<int, kWide>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
}

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t values[VEC];
};

// VEC consecutive elements as fp32; one 16-byte transaction when VEC > 1 (caller guarantees alignment).
template <typename scalar_t, int VEC>
__device__ __forceinline__ void load_floats(const scalar_t* source, float (&out)[VEC]) {
  const Pack<scalar_t, VEC> pack = *reinterpret_cast<const Pack<scalar_t, VEC>*>(source);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = static_cast<float>(pack.values[i]);
}

template <typename scalar_t, int VEC>
__device__ __forceinline__ void store_floats(scalar_t* destination, const float (&in)[VEC]) {
  Pack<scalar_t, VEC> pack;
#pragma unroll
  for (int i = 0; i < VEC; ++i) pack.values[i] = static_cast<scalar_t>(in[i]);
  *reinterpret_cast<Pack<scalar_t, VEC>*>(destination) = pack;
}

// Sum over the block in a fixed order (warp butterflies, then warp 0 over the warp sums), so the
// result depends only on the values and blockDim, never on timing. Every thread must call it, with
// blockDim.x a multiple of 32; the total is valid in thread 0. Two barriers fence the shared array:
// the warps' writes before warp 0 reads them, and warp 0's reads before a following call (of the
// same acc_t, which shares the array) overwrites it.
template <typename acc_t>
__device__ acc_t block_sum(acc_t value) {
  __shared__ acc_t warp_sums[32];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  if (warp == 0) {
    const int warps = (blockDim.x + 31) / 32;
    value = lane < warps ? warp_sums[lane] : acc_t(0);
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  __syncthreads();
  return value;
}

}  // namespace simmim_fast
