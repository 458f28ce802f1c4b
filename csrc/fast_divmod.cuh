// Integer division by a divisor fixed per launch, without the hardware's division routine.
//
// sm_80/sm_90 have no integer divide instruction: `/` and `%` compile to a software routine (~20
// instructions for 32 bits, several times that for 64). FastDivmod precomputes, on the host, a
// multiplier and a shift such that n / d == mulhi(n, multiplier) >> shift for every 0 <= n < 2^31
// (Granlund & Montgomery, "Division by invariant integers using multiplication", 1994): two
// instructions. PlainDivmod is the same interface over int64 `/` and `%`, for sizes past 2^31.
// No dependency but <cstdint>, so the host build of tests/test_csrc.py checks the arithmetic.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SIMMIM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SIMMIM_HOST_DEVICE inline
#endif

namespace simmim_fast {

SIMMIM_HOST_DEVICE uint32_t mulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Dividends in [0, 2^31), divisors in [1, 2^31).
struct FastDivmod {
  using index_t = uint32_t;
  static constexpr int64_t kMaxDividend = (int64_t{1} << 31) - 1;

  uint32_t divisor = 1;
  uint32_t multiplier = 0;
  uint32_t shift = 0;

  FastDivmod() = default;
  explicit FastDivmod(int64_t d) : divisor(static_cast<uint32_t>(d)) {
    if (divisor == 1) return;
    uint32_t log2_ceil = 0;
    while ((uint64_t{1} << log2_ceil) < divisor) ++log2_ceil;
    // m = ceil(2^(31 + l) / d) < 2^32 with l = ceil(log2 d); then n * m / 2^(31 + l) undershoots the next
    // integer above n / d for every n < 2^31, so its floor is the quotient.
    multiplier = static_cast<uint32_t>(((uint64_t{1} << (31 + log2_ceil)) + divisor - 1) / divisor);
    shift = log2_ceil - 1;  // mulhi already divides by 2^32
  }

  SIMMIM_HOST_DEVICE uint32_t div(uint32_t n) const { return divisor == 1 ? n : mulhi(n, multiplier) >> shift; }

  SIMMIM_HOST_DEVICE void divmod(uint32_t n, uint32_t& quotient, uint32_t& remainder) const {
    quotient = div(n);
    remainder = n - quotient * divisor;
  }
};

struct PlainDivmod {
  using index_t = int64_t;
  static constexpr int64_t kMaxDividend = INT64_MAX;

  int64_t divisor = 1;

  PlainDivmod() = default;
  explicit PlainDivmod(int64_t d) : divisor(d) {}

  SIMMIM_HOST_DEVICE int64_t div(int64_t n) const { return n / divisor; }

  SIMMIM_HOST_DEVICE void divmod(int64_t n, int64_t& quotient, int64_t& remainder) const {
    quotient = n / divisor;
    remainder = n - quotient * divisor;
  }
};

}  // namespace simmim_fast
