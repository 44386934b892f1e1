// nh64, the body checksum of a record batch (python/torchvitals/store/integrity.py defines
// the format, and tests/store/test_checksum.py checks this against its NumPy reference).
#pragma once

#include <cstdint>

namespace torchvitals {

// 64-bit multilinear hash of n bytes: little-endian 8-byte words times keys[j % block]
// summed mod 2^64 per block of `block` words, blocks chained by total = total * step + sum,
// the length folded in first and a tail of fewer than 8 bytes last (times keys[0]).
uint64_t nh64(const uint8_t* data, int64_t n, const uint64_t* keys, int64_t block, uint64_t step);

}  // namespace torchvitals
