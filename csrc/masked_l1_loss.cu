// SimMIM's masked L1 loss, forward and backward, with PixelShuffle folded into the indexing.
//
// loss = sum(|target - recon| * mask_px) / (sum(mask_px) + 1e-5) / in_chans, exactly as
// simmim_fast.reference.masked_l1_loss. The mask is token-granular (B, H/p, W/p); the
// reconstruction is image-shaped (shuffle_stride == 1) or the decoder output before
// PixelShuffle(s), (B, C*s*s, H/s, W/s), read in place (no shuffled copy).
//
// Work unit: VEC consecutive target pixels of one row. Units whose pixels are all unmasked read
// nothing but the token mask. Index math: every division is by a size fixed per launch, so when all
// offsets fit in 31 bits (any realistic batch: 2^31 pixels is 19k images at 192 px) it runs in 32-bit
// integers through precomputed multiply-shift divisions (fast_divmod.cuh), else through int64 `/`.
// Determinism: each block writes a partial |diff| sum and an integer count of masked pixels; one
// block then adds the (at most a few hundred) partials in index order, the count in int64 as the
// reference's, so a given device gives bitwise-equal results. No float atomics.
#include "common.cuh"
#include "fast_divmod.cuh"

namespace simmim_fast {
namespace {

// Sizes of the target image and the loss's geometry; Div divides by them (FastDivmod or PlainDivmod).
template <typename Div>
struct LossGeometry {
  using index_t = typename Div::index_t;
  Div width, height, channels;
  Div patch;   // pixels per token side
  Div stride;  // PixelShuffle factor of the reconstruction (1: image-shaped)
  index_t tokens_y, tokens_x;          // of the mask
  index_t rec_height, rec_width;       // of the reconstruction, H/s and W/s
  index_t units;                       // target.numel() / VEC
};

template <typename Div>
LossGeometry<Div> make_geometry(int64_t channels, int64_t height, int64_t width, int64_t patch, int64_t stride,
                                int64_t units) {
  using index_t = typename Div::index_t;
  return {Div(width), Div(height), Div(channels), Div(patch), Div(stride),
          static_cast<index_t>(height / patch), static_cast<index_t>(width / patch),
          static_cast<index_t>(height / stride), static_cast<index_t>(width / stride),
          static_cast<index_t>(units)};
}

// Calls launch(Div{}) with 32-bit fast division when every offset of the tensors stays below 2^31.
template <typename Launch>
void with_index_math(int64_t largest_numel, Launch&& launch) {
  if (largest_numel <= FastDivmod::kMaxDividend) {
    launch(FastDivmod{});
  } else {
    launch(PlainDivmod{});
  }
}

// Where a unit's first pixel is: plane = b * channels + c, row y, column x; b and c of the plane.
template <typename index_t>
struct Pixel {
  index_t plane, y, x, batch, channel;
};

template <typename Div>
__device__ __forceinline__ Pixel<typename Div::index_t> locate(typename Div::index_t index,
                                                               const LossGeometry<Div>& g) {
  Pixel<typename Div::index_t> p;
  typename Div::index_t row;
  g.width.divmod(index, row, p.x);
  g.height.divmod(row, p.plane, p.y);
  g.channels.divmod(p.plane, p.batch, p.channel);
  return p;
}

// The unit's token weights; false when all are zero (nothing to read or accumulate).
template <int VEC, typename Div>
__device__ __forceinline__ bool unit_weights(const float* token_weight, const Pixel<typename Div::index_t>& p,
                                             const LossGeometry<Div>& g, float (&w)[VEC]) {
  const typename Div::index_t token_row = (p.batch * g.tokens_y + g.patch.div(p.y)) * g.tokens_x;
  bool any = false;
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    w[i] = token_weight[token_row + g.patch.div(p.x + i)];
    any |= w[i] != 0.f;
  }
  return any;
}

// Where target pixel (plane, y, x) lives in the pre-shuffle reconstruction (PixelShuffle's inverse):
// channel plane*s*s + (y%s)*s + x%s, at (y/s, x/s).
template <typename Div>
__device__ __forceinline__ typename Div::index_t reconstruction_offset(const Pixel<typename Div::index_t>& p,
                                                                       typename Div::index_t x,
                                                                       const LossGeometry<Div>& g) {
  using index_t = typename Div::index_t;
  const index_t s = g.stride.divisor;
  index_t y_block, y_within, x_block, x_within;
  g.stride.divmod(p.y, y_block, y_within);
  g.stride.divmod(x, x_block, x_within);
  const index_t channel = p.plane * s * s + y_within * s + x_within;
  return (channel * g.rec_height + y_block) * g.rec_width + x_block;
}

// Image-shaped reconstructions share the target's layout (one vector load); pre-shuffle ones are
// gathered element by element: consecutive target x lie in different channel planes there.
template <typename scalar_t, int VEC, typename Div>
__device__ __forceinline__ void load_reconstruction(const scalar_t* recon, typename Div::index_t index,
                                                    const Pixel<typename Div::index_t>& p,
                                                    const LossGeometry<Div>& g, float (&r)[VEC]) {
  if (g.stride.divisor == 1) {
    load_floats<scalar_t, VEC>(recon + index, r);
    return;
  }
#pragma unroll
  for (int i = 0; i < VEC; ++i) r[i] = static_cast<float>(recon[reconstruction_offset(p, p.x + i, g)]);
}

template <typename scalar_t, int VEC, typename Div>
__device__ __forceinline__ void store_reconstruction_grad(scalar_t* grad, typename Div::index_t index,
                                                          const Pixel<typename Div::index_t>& p,
                                                          const LossGeometry<Div>& g, const float (&values)[VEC]) {
  if (g.stride.divisor == 1) {
    store_floats<scalar_t, VEC>(grad + index, values);
    return;
  }
#pragma unroll
  for (int i = 0; i < VEC; ++i) grad[reconstruction_offset(p, p.x + i, g)] = static_cast<scalar_t>(values[i]);
}

// Per block: the |diff| sum over its units' masked pixels, and the masked pixels of channel 0 counted in
// integers (the reference counts mask_px once per pixel, not per channel).
template <typename scalar_t, int VEC, typename Div>
__global__ void __launch_bounds__(kThreads) masked_l1_partials_kernel(
    const scalar_t* __restrict__ recon, const scalar_t* __restrict__ target,
    const float* __restrict__ token_weight, LossGeometry<Div> g, float* __restrict__ abs_partials,
    long long* __restrict__ count_partials) {
  using index_t = typename Div::index_t;
  float sum = 0.f;
  long long count = 0;
  for (index_t unit = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; unit < g.units;
       unit += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t index = unit * VEC;
    const Pixel<index_t> p = locate(index, g);
    float w[VEC];
    if (!unit_weights<VEC>(token_weight, p, g, w)) continue;
    float t[VEC], r[VEC];
    load_floats<scalar_t, VEC>(target + index, t);
    load_reconstruction<scalar_t, VEC>(recon, index, p, g, r);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      sum += fabsf(t[i] - r[i]) * w[i];
      count += p.channel == 0 && w[i] != 0.f;
    }
  }
  sum = block_sum(sum);
  count = block_sum(count);
  if (threadIdx.x == 0) {
    abs_partials[blockIdx.x] = sum;
    count_partials[blockIdx.x] = count;
  }
}

// One block over the per-block partials, in index order, then the reference's two divisions; the count
// is rounded to fp32 once, as the reference's int64 count is before + 1e-5.
__global__ void __launch_bounds__(kThreads) masked_l1_finalize_kernel(
    const float* __restrict__ abs_partials, const long long* __restrict__ count_partials, int num_partials,
    int64_t in_chans, float* __restrict__ loss, float* __restrict__ denominator) {
  float numerator = 0.f;
  long long count = 0;
  for (int i = threadIdx.x; i < num_partials; i += blockDim.x) {
    numerator += abs_partials[i];
    count += count_partials[i];
  }
  numerator = block_sum(numerator);
  count = block_sum(count);
  if (threadIdx.x == 0) {
    const float denom = static_cast<float>(count) + 1e-5f;
    *denominator = denom;
    *loss = numerator / denom / static_cast<float>(in_chans);
  }
}

// d loss / d recon = (grad / in_chans / denominator) * mask * sign(recon - target); zero where unmasked.
template <typename scalar_t, int VEC, typename Div>
__global__ void __launch_bounds__(kThreads) masked_l1_backward_kernel(
    const float* __restrict__ grad_loss, const float* __restrict__ denominator,
    const scalar_t* __restrict__ recon, const scalar_t* __restrict__ target,
    const float* __restrict__ token_weight, LossGeometry<Div> g, int64_t in_chans,
    scalar_t* __restrict__ grad_recon) {
  using index_t = typename Div::index_t;
  const float scale = *grad_loss / static_cast<float>(in_chans) / *denominator;
  for (index_t unit = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; unit < g.units;
       unit += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t index = unit * VEC;
    const Pixel<index_t> p = locate(index, g);
    float w[VEC], grad[VEC];
    if (unit_weights<VEC>(token_weight, p, g, w)) {
      float t[VEC], r[VEC];
      load_floats<scalar_t, VEC>(target + index, t);
      load_reconstruction<scalar_t, VEC>(recon, index, p, g, r);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float difference = r[i] - t[i];
        const float sign = static_cast<float>((difference > 0.f) - (difference < 0.f));
        grad[i] = scale * w[i] * sign;
      }
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) grad[i] = 0.f;
    }
    store_reconstruction_grad<scalar_t, VEC>(grad_recon, index, p, g, grad);
  }
}

struct LossSizes {
  int64_t channels, height, width, patch, stride;
};

LossSizes check_loss_inputs(const at::Tensor& recon, const at::Tensor& target, const at::Tensor& mask,
                               int64_t patch_size, int64_t shuffle_stride) {
  check_cuda(recon, "reconstruction");
  check_cuda(target, "target");
  check_cuda(mask, "mask");
  check_kernel_dtype(target, "target");
  TORCH_CHECK(recon.scalar_type() == target.scalar_type(), "reconstruction and target must share a dtype, got ",
              recon.scalar_type(), " and ", target.scalar_type());
  TORCH_CHECK(target.dim() == 4, "target must be (B, C, H, W), got ", target.sizes());
  const int64_t batch = target.size(0), channels = target.size(1), height = target.size(2), width = target.size(3);
  const int64_t s = shuffle_stride, p = patch_size;
  TORCH_CHECK(s >= 1 && height % s == 0 && width % s == 0, "target size must be a multiple of shuffle_stride ", s);
  TORCH_CHECK(p >= 1 && height % p == 0 && width % p == 0, "target size must be a multiple of patch_size ", p);
  const std::vector<int64_t> pre_shuffle{batch, channels * s * s, height / s, width / s};
  TORCH_CHECK(recon.sizes() == at::IntArrayRef(pre_shuffle), "reconstruction must be (B, C*s*s, H/s, W/s) = ",
              at::IntArrayRef(pre_shuffle), ", got ", recon.sizes());
  TORCH_CHECK(mask.dim() >= 2 && mask.size(0) == batch && mask.numel() == batch * (height / p) * (width / p),
              "mask must be (B, H/p, W/p) = (", batch, ", ", height / p, ", ", width / p, "), got ", mask.sizes());
  return {channels, height, width, p, s};
}

std::tuple<at::Tensor, at::Tensor> masked_l1_loss_cuda(const at::Tensor& reconstruction, const at::Tensor& target,
                                                       const at::Tensor& mask, int64_t patch_size, int64_t in_chans,
                                                       int64_t shuffle_stride) {
  const LossSizes sizes = check_loss_inputs(reconstruction, target, mask, patch_size, shuffle_stride);
  const c10::cuda::CUDAGuard guard(target.device());
  const at::Tensor recon = reconstruction.contiguous();
  const at::Tensor image = target.contiguous();
  const at::Tensor weights = token_weights(mask);
  const auto float_options = image.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({}, float_options);
  at::Tensor denominator = at::empty({}, float_options);
  const cudaStream_t stream = current_stream();

  SIMMIM_DISPATCH_FLOATS(image.scalar_type(), "masked_l1_loss_cuda", [&] {
    const int wide = kVectorBytes / sizeof(scalar_t);
    const bool vectors =
        vectorisable(sizes.width, wide, {image.data_ptr(), sizes.stride == 1 ? recon.data_ptr() : nullptr});
    with_vector_width<scalar_t>(vectors, [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      with_index_math(image.numel(), [&](auto divider) {
        using Div = decltype(divider);
        const auto g = make_geometry<Div>(sizes.channels, sizes.height, sizes.width, sizes.patch, sizes.stride,
                                          image.numel() / VEC);
        const int64_t blocks = grid_size(image.numel() / VEC);
        at::Tensor abs_partials = at::empty({blocks}, float_options);
        at::Tensor count_partials = at::empty({blocks}, image.options().dtype(at::kLong));
        masked_l1_partials_kernel<scalar_t, VEC, Div><<<blocks, kThreads, 0, stream>>>(
            recon.const_data_ptr<scalar_t>(), image.const_data_ptr<scalar_t>(), weights.const_data_ptr<float>(), g,
            abs_partials.mutable_data_ptr<float>(),
            reinterpret_cast<long long*>(count_partials.mutable_data_ptr<int64_t>()));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        masked_l1_finalize_kernel<<<1, kThreads, 0, stream>>>(
            abs_partials.const_data_ptr<float>(),
            reinterpret_cast<const long long*>(count_partials.const_data_ptr<int64_t>()), static_cast<int>(blocks),
            in_chans, loss.mutable_data_ptr<float>(), denominator.mutable_data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return {loss, denominator};
}

at::Tensor masked_l1_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& denominator,
                                        const at::Tensor& reconstruction, const at::Tensor& target,
                                        const at::Tensor& mask, int64_t patch_size, int64_t in_chans,
                                        int64_t shuffle_stride) {
  const LossSizes sizes = check_loss_inputs(reconstruction, target, mask, patch_size, shuffle_stride);
  TORCH_CHECK(grad_loss.numel() == 1 && denominator.numel() == 1, "grad_loss and denominator must be scalars");
  const c10::cuda::CUDAGuard guard(target.device());
  const at::Tensor recon = reconstruction.contiguous();
  const at::Tensor image = target.contiguous();
  const at::Tensor weights = token_weights(mask);
  const at::Tensor grad_scalar = grad_loss.to(at::kFloat).contiguous();
  const at::Tensor denom = denominator.to(at::kFloat).contiguous();
  at::Tensor grad_recon = at::empty_like(recon);
  const cudaStream_t stream = current_stream();

  SIMMIM_DISPATCH_FLOATS(image.scalar_type(), "masked_l1_loss_backward_cuda", [&] {
    const int wide = kVectorBytes / sizeof(scalar_t);
    const bool vectors = vectorisable(
        sizes.width, wide, {image.data_ptr(), sizes.stride == 1 ? recon.data_ptr() : nullptr,
                            sizes.stride == 1 ? grad_recon.data_ptr() : nullptr});
    with_vector_width<scalar_t>(vectors, [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      with_index_math(image.numel(), [&](auto divider) {
        using Div = decltype(divider);
        const auto g = make_geometry<Div>(sizes.channels, sizes.height, sizes.width, sizes.patch, sizes.stride,
                                          image.numel() / VEC);
        masked_l1_backward_kernel<scalar_t, VEC, Div><<<grid_size(image.numel() / VEC), kThreads, 0, stream>>>(
            grad_scalar.const_data_ptr<float>(), denom.const_data_ptr<float>(), recon.const_data_ptr<scalar_t>(),
            image.const_data_ptr<scalar_t>(), weights.const_data_ptr<float>(), g, in_chans,
            grad_recon.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return grad_recon;
}

}  // namespace
}  // namespace simmim_fast

TORCH_LIBRARY_IMPL(simmim_fast, CUDA, m) {
  m.impl("masked_l1_loss", &simmim_fast::masked_l1_loss_cuda);
  m.impl("masked_l1_loss_backward", &simmim_fast::masked_l1_loss_backward_cuda);
}
