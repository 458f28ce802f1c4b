// Mask-token substitution: out = tokens * (1 - w) + mask_token * w, w the 0/1 token mask, exactly as
// simmim_fast.reference.mask_token_blend; and its backward:
//   d tokens     = grad * (1 - w)
//   d mask_token = sum over (b, l) of grad * w, reduced deterministically: blocks of rows write
//                  per-chunk partial sums (fixed-order reduction over the block's row lanes), then one
//                  kernel adds the chunks in index order per column. No float atomics.
#include "common.cuh"

namespace simmim_fast {
namespace {

// Backward block: kLanes threads across columns (VEC each) x kRowLanes threads down the rows.
constexpr int kLanes = 32;
constexpr int kRowLanes = kThreads / kLanes;
// Rows per chunk of the d mask_token reduction: enough work per block, few enough partials.
constexpr int64_t kTargetRowsPerChunk = 64;
constexpr int64_t kMaxChunks = 1024;

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads) blend_forward_kernel(
    const scalar_t* __restrict__ tokens, const float* __restrict__ token_weight,
    const scalar_t* __restrict__ mask_token, int64_t dim, int64_t units, scalar_t* __restrict__ out) {
  for (int64_t unit = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; unit < units;
       unit += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t index = unit * VEC;
    const float w = token_weight[index / dim];
    float x[VEC], m[VEC], y[VEC];
    load_floats<scalar_t, VEC>(tokens + index, x);
    load_floats<scalar_t, VEC>(mask_token + index % dim, m);
#pragma unroll
    for (int i = 0; i < VEC; ++i) y[i] = x[i] * (1.f - w) + m[i] * w;
    store_floats<scalar_t, VEC>(out + index, y);
  }
}

// grid (column blocks, chunks); block (kLanes, kRowLanes). Writes d tokens for its rows and
// partials[chunk, column] = sum over the chunk's rows of grad * w.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads) blend_backward_kernel(
    const scalar_t* __restrict__ grad_out, const float* __restrict__ token_weight, int64_t rows, int64_t dim,
    int64_t rows_per_chunk, scalar_t* __restrict__ grad_tokens, float* __restrict__ partials) {
  __shared__ float lane_sums[kRowLanes][kLanes * VEC];
  const int64_t column = (blockIdx.x * static_cast<int64_t>(kLanes) + threadIdx.x) * VEC;
  const int64_t first_row = blockIdx.y * rows_per_chunk;
  const int64_t end_row = std::min(rows, first_row + rows_per_chunk);
  float sum[VEC] = {};
  if (column < dim) {
    for (int64_t row = first_row + threadIdx.y; row < end_row; row += kRowLanes) {
      const int64_t index = row * dim + column;
      const float w = token_weight[row];
      float g[VEC], d_tokens[VEC];
      load_floats<scalar_t, VEC>(grad_out + index, g);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        d_tokens[i] = g[i] * (1.f - w);
        sum[i] += g[i] * w;
      }
      store_floats<scalar_t, VEC>(grad_tokens + index, d_tokens);
    }
  }
#pragma unroll
  for (int i = 0; i < VEC; ++i) lane_sums[threadIdx.y][threadIdx.x * VEC + i] = sum[i];
  __syncthreads();
  if (threadIdx.y == 0 && column < dim) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      float total = 0.f;
      for (int lane = 0; lane < kRowLanes; ++lane) total += lane_sums[lane][threadIdx.x * VEC + i];
      partials[blockIdx.y * dim + column + i] = total;
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) blend_mask_token_grad_kernel(
    const float* __restrict__ partials, int64_t chunks, int64_t dim, scalar_t* __restrict__ grad_mask_token) {
  const int64_t column = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (column >= dim) return;
  float total = 0.f;
  for (int64_t chunk = 0; chunk < chunks; ++chunk) total += partials[chunk * dim + column];
  grad_mask_token[column] = static_cast<scalar_t>(total);
}

void check_blend_inputs(const at::Tensor& tokens, const at::Tensor& mask, const at::Tensor& mask_token) {
  check_cuda(tokens, "tokens");
  check_cuda(mask, "mask");
  check_cuda(mask_token, "mask_token");
  check_kernel_dtype(tokens, "tokens");
  TORCH_CHECK(tokens.scalar_type() == mask_token.scalar_type(), "tokens and mask_token must share a dtype, got ",
              tokens.scalar_type(), " and ", mask_token.scalar_type());
  TORCH_CHECK(tokens.dim() == 3, "tokens must be (B, L, D), got ", tokens.sizes());
  TORCH_CHECK(mask_token.numel() == tokens.size(2), "mask_token must be (1, 1, D) with D = ", tokens.size(2),
              ", got ", mask_token.sizes());
  TORCH_CHECK(mask.dim() >= 2 && mask.size(0) == tokens.size(0) && mask.numel() == tokens.size(0) * tokens.size(1),
              "mask must be (B, h, w) or (B, L) covering ", tokens.size(0), " x ", tokens.size(1),
              " tokens, got ", mask.sizes());
}

at::Tensor mask_token_blend_cuda(const at::Tensor& tokens, const at::Tensor& mask, const at::Tensor& mask_token) {
  check_blend_inputs(tokens, mask, mask_token);
  const c10::cuda::CUDAGuard guard(tokens.device());
  const at::Tensor x = tokens.contiguous();
  const at::Tensor token = mask_token.contiguous();
  const at::Tensor weights = token_weights(mask);
  at::Tensor out = at::empty_like(x);
  const int64_t dim = x.size(2);
  if (x.numel() == 0) return out;
  const cudaStream_t stream = current_stream();

  SIMMIM_DISPATCH_FLOATS(x.scalar_type(), "mask_token_blend_cuda", [&] {
    const int wide = kVectorBytes / sizeof(scalar_t);
    const bool vectors = vectorisable(dim, wide, {x.data_ptr(), token.data_ptr(), out.data_ptr()});
    with_vector_width<scalar_t>(vectors, [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      const int64_t units = x.numel() / VEC;
      blend_forward_kernel<scalar_t, VEC><<<grid_size(units), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), weights.const_data_ptr<float>(), token.const_data_ptr<scalar_t>(), dim, units,
          out.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> mask_token_blend_backward_cuda(const at::Tensor& grad_out, const at::Tensor& mask,
                                                                  const at::Tensor& mask_token) {
  check_blend_inputs(grad_out, mask, mask_token);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const at::Tensor grad = grad_out.contiguous();
  const at::Tensor weights = token_weights(mask);
  at::Tensor grad_tokens = at::empty_like(grad);
  const int64_t dim = grad.size(2);
  const int64_t rows = grad.size(0) * grad.size(1);
  if (grad.numel() == 0) return {grad_tokens, at::zeros_like(mask_token, at::MemoryFormat::Contiguous)};
  at::Tensor grad_mask_token = at::empty_like(mask_token, at::MemoryFormat::Contiguous);
  const int64_t chunks = std::min(kMaxChunks, ceil_div(rows, kTargetRowsPerChunk));
  const int64_t rows_per_chunk = ceil_div(rows, chunks);
  at::Tensor partials = at::empty({chunks, dim}, grad.options().dtype(at::kFloat));
  const cudaStream_t stream = current_stream();

  SIMMIM_DISPATCH_FLOATS(grad.scalar_type(), "mask_token_blend_backward_cuda", [&] {
    const int wide = kVectorBytes / sizeof(scalar_t);
    const bool vectors = vectorisable(dim, wide, {grad.data_ptr(), grad_tokens.data_ptr()});
    with_vector_width<scalar_t>(vectors, [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      const dim3 grid(static_cast<unsigned>(ceil_div(dim / VEC, kLanes)), static_cast<unsigned>(chunks));
      blend_backward_kernel<scalar_t, VEC><<<grid, dim3(kLanes, kRowLanes), 0, stream>>>(
          grad.const_data_ptr<scalar_t>(), weights.const_data_ptr<float>(), rows, dim, rows_per_chunk,
          grad_tokens.mutable_data_ptr<scalar_t>(), partials.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    blend_mask_token_grad_kernel<scalar_t><<<ceil_div(dim, kThreads), kThreads, 0, stream>>>(
        partials.const_data_ptr<float>(), chunks, dim, grad_mask_token.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_tokens, grad_mask_token};
}

}  // namespace
}  // namespace simmim_fast

TORCH_LIBRARY_IMPL(simmim_fast, CUDA, m) {
  m.impl("mask_token_blend", &simmim_fast::mask_token_blend_cuda);
  m.impl("mask_token_blend_backward", &simmim_fast::mask_token_blend_backward_cuda);
}
