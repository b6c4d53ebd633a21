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
  // u <= 127 (int4 codes, or |q| of int8 ones): maddubs's int16 pair sums (<= 2 * 127 * 127) cannot saturate
  const __m256i pairs = _mm256_maddubs_epi16(u, s);
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

// AVX2: the 16 channels of a block as two halves of 8 (bytes 0-31 and 32-63 of each 64-byte tile). int8 takes
// llama.cpp's sign trick, q . x = |q| . (x sign(q)), so both maddubs operands stay within 127 in magnitude; the
// integer dot products, hence the results, are the AVX-512 kernel's.
template <int R, bool kInt4>
inline void block_rows(const uint8_t* w, const at::Half* dsc, const at::Half* msc, int64_t groups,
                       const QuantizedRows& xq, int64_t row0, int64_t k, float* out, int64_t ldo) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m256i bias = _mm256_set1_epi8(static_cast<char>(0x80));
  constexpr int kTileBytes = kInt4 ? 256 : 512;
  const int32_t* codes[R];
  for (int r = 0; r < R; ++r) codes[r] = reinterpret_cast<const int32_t*>(xq.codes.data() + (row0 + r) * k);
  for (int half = 0; half < 2; ++half) {
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* wg = w + g * kTileBytes + 32 * half;
      __m256i dot[R];
      for (int r = 0; r < R; ++r) dot[r] = _mm256_setzero_si256();
      if constexpr (kInt4) {
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
      } else {
        for (int j = 0; j < 8; ++j) {
          // stored q + 128: xor 0x80 gives q as int8; |q| is shared by the rows
          const __m256i q = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + 64 * j)), bias);
          const __m256i q_abs = _mm256_sign_epi8(q, q);
          for (int r = 0; r < R; ++r)
            dot[r] = dot_u8s8(dot[r], q_abs, _mm256_sign_epi8(_mm256_set1_epi32(codes[r][g * 8 + j]), q));
        }
      }
      const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dsc + g * kBlock + 8 * half)));
      __m256 mn = _mm256_setzero_ps();
      if constexpr (kInt4) mn = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(msc + g * kBlock + 8 * half)));
      for (int r = 0; r < R; ++r) {
        const int64_t rg = (row0 + r) * groups + g;
        const __m256 ds = _mm256_mul_ps(d, _mm256_set1_ps(xq.scales[rg]));
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r]), ds, acc[r]);
        if constexpr (kInt4) acc[r] = _mm256_fmadd_ps(mn, _mm256_set1_ps(xq.sums[rg]), acc[r]);
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

// Several weights over the same x (a layer's q, k, v): x quantized once, one parallel loop over all their blocks.
template <bool kInt4>
std::vector<torch::Tensor> lowbit_matmul(const torch::Tensor& x, const std::vector<torch::Tensor>& packed,
                                         const std::vector<torch::Tensor>& scales,
                                         const std::vector<torch::Tensor>& mins) {
#ifndef LOWBIT_HAS_KERNEL
  TORCH_CHECK(false, "this build of the low-bit kernels has no kernel for this CPU (", LOWBIT_ISA, ")");
  return {};
#else
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous (M, K) tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be fp32 or bf16");
  TORCH_CHECK(!packed.empty() && packed.size() == scales.size() && (!kInt4 || mins.size() == packed.size()),
              "one scales (and mins) tensor per weight");
  const int64_t m = x.size(0), k = x.size(1);
  std::vector<torch::Tensor> outs;
  std::vector<int64_t> first_block{0};  // weight w owns blocks [first_block[w], first_block[w + 1])
  for (size_t w = 0; w < packed.size(); ++w) {
    const auto& p = packed[w];
    TORCH_CHECK(p.scalar_type() == at::kByte && p.is_contiguous() && p.dim() == 4,
                "packed must be a contiguous uint8 (N/16, K/32, tiles, 64) tensor");
    TORCH_CHECK(p.size(1) * kGroup == k, "x has ", k, " columns, the weight ", p.size(1) * kGroup);
    TORCH_CHECK(p.size(2) == (kInt4 ? 4 : 8) && p.size(3) == 64, "packed has the wrong tile shape");
    TORCH_CHECK(scales[w].scalar_type() == at::kHalf && scales[w].is_contiguous() &&
                    scales[w].numel() == p.size(0) * p.size(1) * kBlock, "scales must be contiguous fp16 matching the weight");
    if (kInt4)
      TORCH_CHECK(mins[w].scalar_type() == at::kHalf && mins[w].is_contiguous() && mins[w].numel() == scales[w].numel(),
                  "mins must match scales");
    outs.push_back(torch::empty({m, p.size(0) * kBlock}, x.options().dtype(at::kFloat)));
    first_block.push_back(first_block.back() + p.size(0));
  }
  const int64_t groups = k / kGroup;
  QuantizedRows xq;
  if (x.scalar_type() == at::kFloat) quantize_rows(x.data_ptr<float>(), m, k, xq);
  else quantize_rows(x.data_ptr<at::BFloat16>(), m, k, xq);
  const int64_t tile_bytes = groups * (kInt4 ? 256 : 512);
  at::parallel_for(0, first_block.back(), 4, [&](int64_t begin, int64_t end) {
    size_t w = 0;
    for (int64_t block = begin; block < end; ++block) {
      while (block >= first_block[w + 1]) ++w;
      const int64_t b = block - first_block[w], n = outs[w].size(1);
      const uint8_t* wp = packed[w].data_ptr<uint8_t>() + b * tile_bytes;
      const at::Half* dsc = scales[w].data_ptr<at::Half>() + b * groups * kBlock;
      const at::Half* msc = kInt4 ? mins[w].data_ptr<at::Half>() + b * groups * kBlock : nullptr;
      float* out = outs[w].data_ptr<float>();
      for (int64_t r0 = 0; r0 < m; r0 += kMaxRows)
        rows_dispatch<kInt4>(std::min<int64_t>(kMaxRows, m - r0), wp, dsc, msc, groups, xq, r0, k,
                             out + r0 * n + b * kBlock, n);
    }
  });
  if (x.scalar_type() != at::kFloat)
    for (auto& out : outs) out = out.to(x.scalar_type());
  return outs;
#endif
}

}  // namespace

std::vector<torch::Tensor> int4_matmul(torch::Tensor x, std::vector<torch::Tensor> packed,
                                       std::vector<torch::Tensor> scales, std::vector<torch::Tensor> mins) {
  return lowbit_matmul<true>(x, packed, scales, mins);
}

std::vector<torch::Tensor> int8_matmul(torch::Tensor x, std::vector<torch::Tensor> packed,
                                       std::vector<torch::Tensor> scales) {
  return lowbit_matmul<false>(x, packed, scales, {});
}

std::string lowbit_isa() { return LOWBIT_ISA; }
