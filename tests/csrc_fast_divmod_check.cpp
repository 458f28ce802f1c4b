// Host check of csrc/fast_divmod.cuh (built and run by tests/test_csrc.py): FastDivmod's quotient and
// remainder equal `/` and `%` for dividends up to 2^31 - 1 at the edges (0, d - 1, d, d + 1, multiples,
// 2^31 - 1), at powers of two and their neighbours, and at random pairs. Prints the first mismatches;
// exits 1 on any.
#include <cstdio>
#include <random>

#include "fast_divmod.cuh"

int main() {
  long checks = 0, wrong = 0;
  auto check = [&](uint32_t divisor, uint32_t dividend) {
    const simmim_fast::FastDivmod fast(divisor);
    uint32_t quotient, remainder;
    fast.divmod(dividend, quotient, remainder);
    ++checks;
    if (quotient != dividend / divisor || remainder != dividend % divisor) {
      if (wrong++ < 5) std::printf("%u / %u: got %u rem %u\n", dividend, divisor, quotient, remainder);
    }
  };
  const uint32_t top = 0x7fffffffu;
  for (uint32_t d = 1; d < 5000; ++d) {
    for (uint32_t n : {0u, 1u, d - 1, d, d + 1, 2 * d - 1, top - d, top - 1, top}) check(d, n);
  }
  for (int bit = 0; bit < 31; ++bit) {
    for (int64_t delta : {-1, 0, 1}) {
      const int64_t d = (int64_t{1} << bit) + delta;
      if (d < 1 || d > top) continue;
      for (int64_t n : {d * (top / d) - 1, d * (top / d), int64_t{top}}) check(uint32_t(d), uint32_t(n));
    }
  }
  std::mt19937_64 random(0);
  for (int i = 0; i < 2000000; ++i) {
    const uint32_t d = 1 + random() % top, n = random() % (uint64_t{top} + 1);
    check(d, n);
    check(d, top - n % d);
  }
  std::printf("%ld checks, %ld wrong\n", checks, wrong);
  return wrong != 0;
}
