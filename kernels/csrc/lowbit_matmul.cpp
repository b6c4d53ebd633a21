// Low-bit weight x int8 activation matmuls for a CPU decode step: y (M, N) = x (M, K) W^T, M small (1 token, or a
// tree of a few), W in 4 or 8 bits per weight in groups of 32 along K with fp16 scales (llama.cpp's Q4_1 and
// Q8_0). Each row of x is quantized to int8 per group of 32 (s = max|x| / 127, llama.cpp's Q8 activations), and
// the group's integer dot products run on VNNI (AVX-512) or maddubs (AVX2):
//
//   int4: y[r, n] = sum_g d[n, g] s[r, g] (q[n, g] . xq[r, g]) + m[n, g] sum(x[r, g])     (W = d q + m, q 0..15)
//   int8: y[r, n] = sum_g d[n, g] s[r, g] (q[n, g] . xq[r, g])                            (W = d q, q -127..127)
//
// Weights are read once per 16 output channels and reused for every row, so a tree of 8 costs little more than
// one token. Each row's arithmetic is the same whatever M is: a row's output does not depend on the other rows.
// Layouts (made by kernels/lowbit_matmul.py's pack functions), for channel block b of 16 and group g:
//   int4: packed[b, g, j, 4 c + t] = q[16 b + c, 32 g + 8 j + t] | q[16 b + c, 32 g + 8 j + 4 + t] << 4, j < 4, t < 4
//   int8: packed[b, g, j, 4 c + t] = q[16 b + c, 32 g + 4 j + t] + 128 (as uint8), j < 8
//   scales, mins: [b, g, c] fp16
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int kGroup = 32;
constexpr int kBlock = 16;  // output channels per block
constexpr int kMaxRows = 6; // rows per register block

struct QuantizedRows {
  // per row: int8 codes (K), and per group: scale, sum of x, sum of codes
  std::vector<int8_t> codes;
  std::vector<float> scales, sums;
  std::vector<int32_t> code_sums;
};

template <typename T>
float to_float(T v) { return static_cast<float>(v); }

template <typename T>
void quantize_rows(const T* x, int64_t m, int64_t k, QuantizedRows& out) {
  const int64_t groups = k / kGroup;
  out.codes.resize(m * k);
  out.scales.resize(m * groups);
  out.sums.resize(m * groups);
  out.code_sums.resize(m * groups);
  float buf[kGroup];
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t g = 0; g < groups; ++g) {
      const T* src = x + r * k + g * kGroup;
      float amax = 0.f, sum = 0.f;
      for (int i = 0; i < kGroup; ++i) {
        buf[i] = to_float(src[i]);
        amax = std::max(amax, std::fabs(buf[i]));
      }
      for (int i = 0; i < kGroup; ++i) sum += buf[i];
      const float scale = amax / 127.f;
      const float inv = scale > 0.f ? 127.f / amax : 0.f;
      int32_t code_sum = 0;
      int8_t* dst = out.codes.data() + r * k + g * kGroup;
      for (int i = 0; i < kGroup; ++i) {
        const int32_t q = static_cast<int32_t>(std::nearbyint(buf[i] * inv));
        dst[i] = static_cast<int8_t>(q);
        code_sum += q;
      }
      out.scales[r * groups + g] = scale;
      out.sums[r * groups + g] = sum;
      out.code_sums[r * groups + g] = code_sum;
    }
  }
}

float half_to_float(at::Half h) { return static_cast<float>(h); }

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define LOWBIT_ISA "avx512_vnni"
#define LOWBIT_HAS_KERNEL 1

// One block of 16 channels for R rows: out[r] (16 floats) for rows rows[0..R).
template <int R, bool kInt4>
inline void block_rows(const uint8_t* w, const at::Half* dsc, const at::Half* msc, int64_t groups,
                       const QuantizedRows& xq, int64_t row0, int64_t k, float* out, int64_t ldo) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0F);
  const int32_t* codes[R];
  for (int r = 0; r < R; ++r) codes[r] = reinterpret_cast<const int32_t*>(xq.codes.data() + (row0 + r) * k);
  constexpr int kTileBytes = kInt4 ? 256 : 512;
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* wg = w + g * kTileBytes;
    __m512i dot[R];
    for (int r = 0; r < R; ++r) dot[r] = _mm512_setzero_si512();
    if constexpr (kInt4) {
      for (int j = 0; j < 4; ++j) {
        const __m512i v = _mm512_loadu_si512(wg + 64 * j);
        const __m512i lo = _mm512_and_si512(v, low);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        for (int r = 0; r < R; ++r) {
          const int32_t* c = codes[r] + g * 8 + 2 * j;
          dot[r] = _mm512_dpbusd_epi32(dot[r], lo, _mm512_set1_epi32(c[0]));
          dot[r] = _mm512_dpbusd_epi32(dot[r], hi, _mm512_set1_epi32(c[1]));
        }
      }
    } else {
      for (int j = 0; j < 8; ++j) {
        const __m512i v = _mm512_loadu_si512(wg + 64 * j);
        for (int r = 0; r < R; ++r)
          dot[r] = _mm512_dpbusd_epi32(dot[r], v, _mm512_set1_epi32(codes[r][g * 8 + j]));
      }
    }
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dsc + g * kBlock)));
    if constexpr (kInt4) {
      const __m512 mn = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(msc + g * kBlock)));
      for (int r = 0; r < R; ++r) {
        const int64_t rg = (row0 + r) * groups + g;
        const __m512 ds = _mm512_mul_ps(d, _mm512_set1_ps(xq.scales[rg]));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r]), ds, acc[r]);
        acc[r] = _mm512_fmadd_ps(mn, _mm512_set1_ps(xq.sums[rg]), acc[r]);
      }
    } else {
      for (int r = 0; r < R; ++r) {
        const int64_t rg = (row0 + r) * groups + g;
        const __m512i exact = _mm512_sub_epi32(dot[r], _mm512_set1_epi32(128 * xq.code_sums[rg]));
        const __m512 ds = _mm512_mul_ps(d, _mm512_set1_ps(xq.scales[rg]));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), ds, acc[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + r * ldo, acc[r]);
}

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LOWBIT_ISA "avx2"
#define LOWBIT_HAS_KERNEL 1

inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
  // u <= 15 (int4 codes): maddubs's int16 pair sums cannot saturate
  const __m256i pairs = _mm256_maddubs_epi16(u, s);
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

// AVX2: the 16 channels of a block as two halves of 8 (bytes 0-31 and 32-63 of each 64-byte tile); int4 only.
template <int R, bool kInt4>
inline void block_rows(const uint8_t* w, const at::Half* dsc, const at::Half* msc, int64_t groups,
                       const QuantizedRows& xq, int64_t row0, int64_t k, float* out, int64_t ldo) {
  static_assert(kInt4, "the AVX2 kernel has int4 weights only");
  const __m256i low = _mm256_set1_epi8(0x0F);
  const int32_t* codes[R];
  for (int r = 0; r < R; ++r) codes[r] = reinterpret_cast<const int32_t*>(xq.codes.data() + (row0 + r) * k);
  for (int half = 0; half < 2; ++half) {
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* wg = w + g * 256 + 32 * half;
      __m256i dot[R];
      for (int r = 0; r < R; ++r) dot[r] = _mm256_setzero_si256();
      for (int j = 0; j < 4; ++j) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + 64 * j));
        const __m256i lo = _mm256_and_si256(v, low);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        for (int r = 0; r < R; ++r) {
          const int32_t* c = codes[r] + g * 8 + 2 * j;
          dot[r] = dot_u8s8(dot[r], lo, _mm256_set1_epi32(c[0]));
          dot[r] = dot_u8s8(dot[r], hi, _mm256_set1_epi32(c[1]));
        }
      }
      const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dsc + g * kBlock + 8 * half)));
      const __m256 mn = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(msc + g * kBlock + 8 * half)));
      for (int r = 0; r < R; ++r) {
        const int64_t rg = (row0 + r) * groups + g;
        const __m256 ds = _mm256_mul_ps(d, _mm256_set1_ps(xq.scales[rg]));
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r]), ds, acc[r]);
        acc[r] = _mm256_fmadd_ps(mn, _mm256_set1_ps(xq.sums[rg]), acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(out + r * ldo + 8 * half, acc[r]);
  }
}

#else
#define LOWBIT_ISA "none"
#endif

#ifdef LOWBIT_HAS_KERNEL
template <bool kInt4>
void rows_dispatch(int64_t rows, const uint8_t* w, const at::Half* dsc, const at::Half* msc, int64_t groups,
                   const QuantizedRows& xq, int64_t row0, int64_t k, float* out, int64_t ldo) {
  switch (rows) {
    case 1: block_rows<1, kInt4>(w, dsc, msc, groups, xq, row0, k, out, ldo); break;
    case 2: block_rows<2, kInt4>(w, dsc, msc, groups, xq, row0, k, out, ldo); break;
    case 3: block_rows<3, kInt4>(w, dsc, msc, groups, xq, row0, k, out, ldo); break;
    case 4: block_rows<4, kInt4>(w, dsc, msc, groups, xq, row0, k, out, ldo); break;
    case 5: block_rows<5, kInt4>(w, dsc, msc, groups, xq, row0, k, out, ldo); break;
    default: block_rows<6, kInt4>(w, dsc, msc, groups, xq, row0, k, out, ldo); break;
  }
}
#endif

template <bool kInt4>
torch::Tensor lowbit_matmul(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
                            const torch::Tensor& mins) {
#ifndef LOWBIT_HAS_KERNEL
  TORCH_CHECK(false, "this build of the low-bit kernels has no kernel for this CPU (", LOWBIT_ISA, ")");
  return torch::Tensor();
#else
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous (M, K) tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be fp32 or bf16");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.dim() == 4,
              "packed must be a contiguous uint8 (N/16, K/32, tiles, 64) tensor");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous(), "scales must be contiguous fp16");
  const int64_t m = x.size(0), k = x.size(1);
  const int64_t blocks = packed.size(0), groups = packed.size(1);
  TORCH_CHECK(groups * kGroup == k, "x has ", k, " columns, the weight ", groups * kGroup);
  TORCH_CHECK(packed.size(2) == (kInt4 ? 4 : 8) && packed.size(3) == 64, "packed has the wrong tile shape");
  TORCH_CHECK(scales.numel() == blocks * groups * kBlock, "scales do not match the weight");
  if (kInt4) TORCH_CHECK(mins.scalar_type() == at::kHalf && mins.numel() == scales.numel(), "mins must match scales");
  const int64_t n = blocks * kBlock;
  QuantizedRows xq;
  if (x.scalar_type() == at::kFloat) quantize_rows(x.data_ptr<float>(), m, k, xq);
  else quantize_rows(x.data_ptr<at::BFloat16>(), m, k, xq);
  auto y = torch::empty({m, n}, x.options().dtype(at::kFloat));
  float* out = y.data_ptr<float>();
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const at::Half* dsc = scales.data_ptr<at::Half>();
  const at::Half* msc = kInt4 ? mins.data_ptr<at::Half>() : nullptr;
  const int64_t tile_bytes = groups * (kInt4 ? 256 : 512);
  at::parallel_for(0, blocks, 4, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t r0 = 0; r0 < m; r0 += kMaxRows) {
        rows_dispatch<kInt4>(std::min<int64_t>(kMaxRows, m - r0), w + b * tile_bytes, dsc + b * groups * kBlock,
                             kInt4 ? msc + b * groups * kBlock : nullptr, groups, xq, r0, k,
                             out + r0 * n + b * kBlock, n);
      }
    }
  });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
#endif
}

}  // namespace

torch::Tensor int4_matmul(torch::Tensor x, torch::Tensor packed, torch::Tensor scales, torch::Tensor mins) {
  return lowbit_matmul<true>(x, packed, scales, mins);
}

torch::Tensor int8_matmul(torch::Tensor x, torch::Tensor packed, torch::Tensor scales) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
  return lowbit_matmul<false>(x, packed, scales, scales);
#else
  TORCH_CHECK(false, "int8 weights need AVX-512 VNNI in this build (", LOWBIT_ISA, ")");
  return torch::Tensor();
#endif
}

bool lowbit_has_int8() {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
  return true;
#else
  return false;
#endif
}

std::string lowbit_isa() { return LOWBIT_ISA; }
