// 16-float vectors (one AVX-512 register, two AVX2 ones) and the fixed-order reductions the CPU kernels share: a
// row's result must not depend on anything but its own inputs, so every sum runs in one fixed order.
#pragma once

#include <cstdint>
#include <cstring>

namespace medusa_lora {

constexpr int kLanes = 16;
typedef float Vec __attribute__((vector_size(64)));
typedef int32_t VecInt __attribute__((vector_size(64)));

inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(Vec));
  return v;
}

// Element-wise accumulators in one native register (16 floats on AVX-512, else 8): on AVX2, GCC moved arrays of
// 16-float vectors through the stack 8 bytes at a time (attention's value sums ran 3-4x slower). Lanes are
// independent, so the width changes no result.
#ifdef __AVX512F__
constexpr int kAccLanes = 16;
#else
constexpr int kAccLanes = 8;
#endif
typedef float AccVec __attribute__((vector_size(4 * kAccLanes)));

inline AccVec load_acc(const float* p) {
  AccVec v;
  std::memcpy(&v, p, sizeof(AccVec));
  return v;
}

// The 16 lanes' sum, by a fixed tree of halvings.
inline float reduce_lanes(Vec acc) {
  Vec half = __builtin_shufflevector(acc, acc, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  acc += half;
  half = __builtin_shufflevector(acc, acc, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  acc += half;
  half = __builtin_shufflevector(acc, acc, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  acc += half;
  return acc[0] + acc[1];
}

// a . b over d: 16 lanes over the full chunks, the tail in order, then the lanes' fixed sum.
inline float dot(const float* a, const float* b, int64_t d) {
  Vec acc = {};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes) acc += load(a + i) * load(b + i);
  float tail = 0.f;
  for (; i < d; ++i) tail += a[i] * b[i];
  return reduce_lanes(acc) + tail;
}

// dot(a, b + t * stride, d) for t < 4, into out[t], bit for bit: four independent chains (one read of a) where
// one chain would wait on each multiply-add.
inline void dot4(const float* a, const float* b, int64_t stride, int64_t d, float* out) {
  constexpr int kParts = kLanes / kAccLanes;  // a 16-lane chunk as native registers (arrays of Vec spill on AVX2)
  AccVec acc[4][kParts] = {};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes) {
    for (int p = 0; p < kParts; ++p) {
      const AccVec x = load_acc(a + i + p * kAccLanes);
      for (int t = 0; t < 4; ++t) acc[t][p] += x * load_acc(b + t * stride + i + p * kAccLanes);
    }
  }
  for (int t = 0; t < 4; ++t) {
    float tail = 0.f;
    for (int64_t e = i; e < d; ++e) tail += a[e] * b[t * stride + e];
    Vec lanes;
    std::memcpy(&lanes, acc[t], sizeof(Vec));
    out[t] = reduce_lanes(lanes) + tail;
  }
}

}  // namespace medusa_lora
