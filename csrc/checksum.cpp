#include "checksum.h"

#include <algorithm>
#include <cstring>

namespace torchvitals {

// Scalar on purpose: x86 vectors have no 64-bit multiply before AVX-512, and GCC's
// emulation of one is slower than one imul per word.
__attribute__((optimize("no-tree-vectorize"))) uint64_t nh64(const uint8_t* data, int64_t n,
                                                              const uint64_t* keys, int64_t block,
                                                              uint64_t step) {
  uint64_t total = static_cast<uint64_t>(n);
  const int64_t words = n / 8;
  for (int64_t begin = 0; begin < words; begin += block) {
    const int64_t m = std::min(block, words - begin);
    const uint8_t* p = data + 8 * begin;
    // Four independent sums: the multiplies of neighbouring words overlap.
    uint64_t sum[4] = {0, 0, 0, 0};
    int64_t j = 0;
    for (; j + 4 <= m; j += 4) {
      uint64_t w[4];
      std::memcpy(w, p + 8 * j, sizeof(w));
      for (int k = 0; k < 4; ++k) sum[k] += w[k] * keys[j + k];
    }
    for (; j < m; ++j) {
      uint64_t w;
      std::memcpy(&w, p + 8 * j, sizeof(w));
      sum[0] += w * keys[j];
    }
    total = total * step + ((sum[0] + sum[1]) + (sum[2] + sum[3]));
  }
  if (8 * words < n) {
    uint64_t tail = 0;  // little-endian, as the words
    std::memcpy(&tail, data + 8 * words, static_cast<size_t>(n - 8 * words));
    total = total * step + tail * keys[0];
  }
  return total;
}

}  // namespace torchvitals
