// SimMIM's masked L1 loss, forward and backward, with PixelShuffle folded into the indexing.
//
// loss = sum(|target - recon| * mask_px) / (sum(mask_px) + 1e-5) / in_chans, exactly as
// simmim_fast.reference.masked_l1_loss. The mask is token-granular (B, H/p, W/p); the
// reconstruction is image-shaped (shuffle_stride == 1) or the decoder output before
// PixelShuffle(s), (B, C*s*s, H/s, W/s), read in place (no shuffled copy).
//
// Work unit: VEC consecutive target pixels of one row. Units whose pixels are all unmasked read
// nothing but the token mask. Determinism: each block writes one partial sum; one block then adds
// the partials in index order (no float atomics), so a given device gives bitwise-equal results.
#include "common.cuh"

namespace simmim_fast {
namespace {

struct LossGeometry {
  int64_t channels, height, width;  // of the target image
  int64_t patch;                    // pixels per token side
  int64_t stride;                   // PixelShuffle factor of the reconstruction (1: image-shaped)
  int64_t units;                    // target.numel() / VEC
};

struct Pixel {
  int64_t plane;  // b * channels + c
  int64_t y, x;
};

__device__ __forceinline__ Pixel locate(int64_t index, const LossGeometry& g) {
  const int64_t plane_size = g.height * g.width;
  const int64_t within = index % plane_size;
  return {index / plane_size, within / g.width, within % g.width};
}

__device__ __forceinline__ float token_weight_at(const float* token_weight, const Pixel& p, int64_t x,
                                                 const LossGeometry& g) {
  const int64_t batch = p.plane / g.channels;
  const int64_t tokens_y = g.height / g.patch, tokens_x = g.width / g.patch;
  return token_weight[(batch * tokens_y + p.y / g.patch) * tokens_x + x / g.patch];
}

// Where target pixel (plane, y, x) lives in the pre-shuffle reconstruction (PixelShuffle's inverse):
// channel c*s*s + (y%s)*s + x%s of image b, at (y/s, x/s). b*C*s*s + c*s*s == plane*s*s.
__device__ __forceinline__ int64_t reconstruction_offset(const Pixel& p, int64_t x, const LossGeometry& g) {
  const int64_t s = g.stride;
  const int64_t channel = p.plane * s * s + (p.y % s) * s + x % s;
  return (channel * (g.height / s) + p.y / s) * (g.width / s) + x / s;
}

// The unit's token weights; false when all are zero (nothing to read or accumulate).
template <int VEC>
__device__ __forceinline__ bool unit_weights(const float* token_weight, const Pixel& p, const LossGeometry& g,
                                             float (&w)[VEC]) {
  bool any = false;
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    w[i] = token_weight_at(token_weight, p, p.x + i, g);
    any |= w[i] != 0.f;
  }
  return any;
}

// Image-shaped reconstructions share the target's layout (one vector load); pre-shuffle ones are
// gathered element by element: consecutive target x lie in different channel planes there.
template <typename scalar_t, int VEC>
__device__ __forceinline__ void load_reconstruction(const scalar_t* recon, int64_t index, const Pixel& p,
                                                    const LossGeometry& g, float (&r)[VEC]) {
  if (g.stride == 1) {
    load_floats<scalar_t, VEC>(recon + index, r);
    return;
  }
#pragma unroll
  for (int i = 0; i < VEC; ++i) r[i] = static_cast<float>(recon[reconstruction_offset(p, p.x + i, g)]);
}

template <typename scalar_t, int VEC>
__device__ __forceinline__ void store_reconstruction_grad(scalar_t* grad, int64_t index, const Pixel& p,
                                                          const LossGeometry& g, const float (&values)[VEC]) {
  if (g.stride == 1) {
    store_floats<scalar_t, VEC>(grad + index, values);
    return;
  }
#pragma unroll
  for (int i = 0; i < VEC; ++i) grad[reconstruction_offset(p, p.x + i, g)] = static_cast<scalar_t>(values[i]);
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads) masked_l1_partials_kernel(
    const scalar_t* __restrict__ recon, const scalar_t* __restrict__ target,
    const float* __restrict__ token_weight, LossGeometry g, float* __restrict__ partials) {
  float sum = 0.f;
  for (int64_t unit = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; unit < g.units;
       unit += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t index = unit * VEC;
    const Pixel p = locate(index, g);
    float w[VEC];
    if (!unit_weights<VEC>(token_weight, p, g, w)) continue;
    float t[VEC], r[VEC];
    load_floats<scalar_t, VEC>(target + index, t);
    load_reconstruction<scalar_t, VEC>(recon, index, p, g, r);
#pragma unroll
    for (int i = 0; i < VEC; ++i) sum += fabsf(t[i] - r[i]) * w[i];
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) partials[blockIdx.x] = sum;
}

// One block: the partials and the token weights in a fixed order, then the reference's two divisions.
__global__ void __launch_bounds__(kThreads) masked_l1_finalize_kernel(
    const float* __restrict__ partials, int64_t num_partials, const float* __restrict__ token_weight,
    int64_t num_tokens, int64_t pixels_per_token, int64_t in_chans, float* __restrict__ loss,
    float* __restrict__ denominator) {
  float numerator = 0.f;
  for (int64_t i = threadIdx.x; i < num_partials; i += blockDim.x) numerator += partials[i];
  // Double: the masked pixel count is an integer the reference keeps exactly (int64) until + 1e-5.
  double masked_tokens = 0.0;
  for (int64_t i = threadIdx.x; i < num_tokens; i += blockDim.x) masked_tokens += token_weight[i];
  numerator = block_sum(numerator);
  masked_tokens = block_sum(masked_tokens);
  if (threadIdx.x == 0) {
    const float masked_pixels = static_cast<float>(masked_tokens * static_cast<double>(pixels_per_token));
    const float denom = masked_pixels + 1e-5f;
    *denominator = denom;
    *loss = numerator / denom / static_cast<float>(in_chans);
  }
}

// d loss / d recon = (grad / in_chans / denominator) * mask * sign(recon - target); zero where unmasked.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads) masked_l1_backward_kernel(
    const float* __restrict__ grad_loss, const float* __restrict__ denominator,
    const scalar_t* __restrict__ recon, const scalar_t* __restrict__ target,
    const float* __restrict__ token_weight, LossGeometry g, int64_t in_chans, scalar_t* __restrict__ grad_recon) {
  const float scale = *grad_loss / static_cast<float>(in_chans) / *denominator;
  for (int64_t unit = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; unit < g.units;
       unit += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t index = unit * VEC;
    const Pixel p = locate(index, g);
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

LossGeometry check_loss_inputs(const at::Tensor& recon, const at::Tensor& target, const at::Tensor& mask,
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
  return {channels, height, width, p, s, 0};
}

std::tuple<at::Tensor, at::Tensor> masked_l1_loss_cuda(const at::Tensor& reconstruction, const at::Tensor& target,
                                                       const at::Tensor& mask, int64_t patch_size, int64_t in_chans,
                                                       int64_t shuffle_stride) {
  LossGeometry g = check_loss_inputs(reconstruction, target, mask, patch_size, shuffle_stride);
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
    const bool vectors = vectorisable(g.width, wide, {image.data_ptr(), g.stride == 1 ? recon.data_ptr() : nullptr});
    with_vector_width<scalar_t>(vectors, [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      g.units = image.numel() / VEC;
      const int64_t blocks = grid_size(g.units);
      at::Tensor partials = at::empty({blocks}, float_options);
      masked_l1_partials_kernel<scalar_t, VEC><<<blocks, kThreads, 0, stream>>>(
          recon.const_data_ptr<scalar_t>(), image.const_data_ptr<scalar_t>(), weights.const_data_ptr<float>(), g,
          partials.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      masked_l1_finalize_kernel<<<1, kThreads, 0, stream>>>(
          partials.const_data_ptr<float>(), blocks, weights.const_data_ptr<float>(), weights.numel(),
          patch_size * patch_size, in_chans, loss.mutable_data_ptr<float>(), denominator.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {loss, denominator};
}

at::Tensor masked_l1_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& denominator,
                                        const at::Tensor& reconstruction, const at::Tensor& target,
                                        const at::Tensor& mask, int64_t patch_size, int64_t in_chans,
                                        int64_t shuffle_stride) {
  LossGeometry g = check_loss_inputs(reconstruction, target, mask, patch_size, shuffle_stride);
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
        g.width, wide, {image.data_ptr(), g.stride == 1 ? recon.data_ptr() : nullptr,
                  g.stride == 1 ? grad_recon.data_ptr() : nullptr});
    with_vector_width<scalar_t>(vectors, [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      g.units = image.numel() / VEC;
      masked_l1_backward_kernel<scalar_t, VEC><<<grid_size(g.units), kThreads, 0, stream>>>(
          grad_scalar.const_data_ptr<float>(), denom.const_data_ptr<float>(), recon.const_data_ptr<scalar_t>(),
          image.const_data_ptr<scalar_t>(), weights.const_data_ptr<float>(), g, in_chans,
          grad_recon.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
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
