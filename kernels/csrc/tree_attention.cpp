// Tree attention on the CPU, row by row: query row t (head h) attends to the cached prefix [0, P) and to the step's
// keys P + j its tree bits allow (bit j % 32 of word j // 32 of row t), in key order; kernels/tree_attention.py has
// the contract and the reference.
//
// Why a kernel of our own: each row gathers its visible keys into one compact list and runs the same arithmetic on
// it whatever the step's size, so a token verified inside a tree gets the same output, bit for bit, as the same
// token decoded alone after its accepted ancestors (same keys, same order, same length). With activations rounded
// to 8 bits (lowbit_matmul) a last-bit difference upstream can move a code and, at a near tie, a greedy token;
// with this kernel the tree steps stay the one-token steps' arithmetic. It also skips SDPA's set-up per call.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vec.h"

namespace {

using medusa_lora::AccVec;
using medusa_lora::dot;
using medusa_lora::kAccLanes;
using medusa_lora::kLanes;
using medusa_lora::load_acc;
using medusa_lora::load;
using medusa_lora::reduce_lanes;
using medusa_lora::Vec;
using medusa_lora::VecInt;

// exp(x) of 16 values x <= 0 (scores minus their maximum), the same formula for every lane: Cody-Waite
// reduction x = n ln2 + r, a degree-6 polynomial for exp(r) (Cephes' expf), times 2^n.
inline Vec exp_nonpositive(Vec x) {
  const Vec lowest = Vec{} - 87.0f;
  x = x < lowest ? lowest : x;
  const Vec magic = Vec{} + 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const Vec n = (x * 1.44269504088896341f + magic) - magic;
  Vec r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  Vec p = Vec{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const VecInt scaled = reinterpret_cast<VecInt&>(p) + (__builtin_convertvector(n, VecInt) << 23);
  return reinterpret_cast<const Vec&>(scaled);
}

template <typename T>
inline void load_row(const T* src, int64_t d, float* dst) {
  for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<float>(src[i]);
}

// scores[0, n) -> exp(score - top) in place (the buffer padded to whole vectors, the lanes past n computed and
// never read); returns their sum, taken in order.
inline float softmax_numerators(std::vector<float>& scores, int64_t n, float top) {
  const int64_t padded = (n + kLanes - 1) / kLanes * kLanes;
  scores.resize(padded);
  for (int64_t i = n; i < padded; ++i) scores[i] = top;
  for (int64_t i = 0; i < padded; i += kLanes) {
    const Vec e = exp_nonpositive(load(scores.data() + i) - top);
    std::memcpy(scores.data() + i, &e, sizeof(Vec));
  }
  float total = 0.f;
  for (int64_t i = 0; i < n; ++i) total += scores[i];
  return total;
}

// One query row over its n visible keys (key_row(i): the cache row of the i-th), D = 16 NV: q and the output
// held in registers. The arithmetic depends only on the visible keys, in order.
template <int NV, typename T, typename KeyRow>
inline void attend_row(const float* qrow, const T* kbase, int64_t kstride, const T* vbase, int64_t vstride,
                       int64_t n, KeyRow key_row, float scale, std::vector<float>& scores, float* buf, T* dst) {
  constexpr int64_t d = NV * kLanes;
  Vec qv[NV];
  for (int v = 0; v < NV; ++v) qv[v] = load(qrow + v * kLanes);
  scores.resize(n);
  float top = -INFINITY;
  for (int64_t i = 0; i < n; ++i) {
    const T* key = kbase + key_row(i) * kstride;
    const float* kr;
    if constexpr (std::is_same<T, float>::value) kr = key;
    else { load_row(key, d, buf); kr = buf; }
    Vec acc = qv[0] * load(kr);
    for (int v = 1; v < NV; ++v) acc += qv[v] * load(kr + v * kLanes);
    const float score = reduce_lanes(acc) * scale;
    scores[i] = score;
    top = std::max(top, score);
  }
  const float total = softmax_numerators(scores, n, top);
  constexpr int kAcc = d / kAccLanes;
  AccVec out[kAcc] = {};
  for (int64_t i = 0; i < n; ++i) {
    const T* value = vbase + key_row(i) * vstride;
    const float* vr;
    if constexpr (std::is_same<T, float>::value) vr = value;
    else { load_row(value, d, buf); vr = buf; }
    const AccVec p = AccVec{} + scores[i];
    for (int a = 0; a < kAcc; ++a) out[a] += p * load_acc(vr + a * kAccLanes);
  }
  const float inv = 1.f / total;
  for (int a = 0; a < kAcc; ++a)
    for (int l = 0; l < kAccLanes; ++l) dst[a * kAccLanes + l] = static_cast<T>(out[a][l] * inv);
}

template <typename T>
void tree_attention_rows(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                         const torch::Tensor& bits, int64_t prefix, float scale, torch::Tensor& out) {
  const int64_t batch = q.size(0), heads = q.size(1), steps = q.size(2), d = q.size(3);
  const int64_t kv_heads = k.size(1), group = heads / kv_heads;
  const int64_t words = bits.size(1);
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int32_t* bp = bits.data_ptr<int32_t>();
  const auto qs = q.strides(), ks = k.strides(), vs = v.strides();
  at::parallel_for(0, batch * heads * steps, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, qrow(d), acc(d), krow(d);
    std::vector<int64_t> tree_keys;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / (heads * steps), h = (row / steps) % heads, t = row % steps, g = h / group;
      tree_keys.clear();  // the visible keys: [0, prefix), then these
      for (int64_t j = 0; j < steps; ++j)
        if ((bp[t * words + j / 32] >> (j % 32)) & 1) tree_keys.push_back(prefix + j);
      const int64_t n = prefix + static_cast<int64_t>(tree_keys.size());
      auto key_row = [&](int64_t i) { return i < prefix ? i : tree_keys[i - prefix]; };
      load_row(qp + b * qs[0] + h * qs[1] + t * qs[2], d, qrow.data());
      const T* kbase = kp + b * ks[0] + g * ks[1];
      const T* vbase = vp + b * vs[0] + g * vs[1];
      T* dst = op + ((b * steps + t) * heads + h) * d;
      switch (d) {  // head dims of 16 NV: the row in registers
        case 32: attend_row<2>(qrow.data(), kbase, ks[2], vbase, vs[2], n, key_row, scale, scores, krow.data(), dst); continue;
        case 64: attend_row<4>(qrow.data(), kbase, ks[2], vbase, vs[2], n, key_row, scale, scores, krow.data(), dst); continue;
        case 96: attend_row<6>(qrow.data(), kbase, ks[2], vbase, vs[2], n, key_row, scale, scores, krow.data(), dst); continue;
        case 128: attend_row<8>(qrow.data(), kbase, ks[2], vbase, vs[2], n, key_row, scale, scores, krow.data(), dst); continue;
        default: break;
      }
      scores.resize(n);
      float top = -INFINITY;
      for (int64_t i = 0; i < n; ++i) {
        const T* key = kbase + key_row(i) * ks[2];
        const float* kr;
        if constexpr (std::is_same<T, float>::value) kr = key;
        else { load_row(key, d, krow.data()); kr = krow.data(); }
        scores[i] = dot(qrow.data(), kr, d) * scale;
        top = std::max(top, scores[i]);
      }
      const float total = softmax_numerators(scores, n, top);
      std::fill(acc.begin(), acc.end(), 0.f);
      float* a = acc.data();
      for (int64_t i = 0; i < n; ++i) {
        const T* value = vbase + key_row(i) * vs[2];
        const float p = scores[i];
        for (int64_t e = 0; e < d; ++e) a[e] += p * static_cast<float>(value[e]);
      }
      const float inv = 1.f / total;
      for (int64_t e = 0; e < d; ++e) dst[e] = static_cast<T>(a[e] * inv);
    }
  });
}

}  // namespace

// q (B, Hq, T, D), k / v (B, Hkv, >= P + T, D) with unit stride along D; bits int32 (T, ceil(T / 32)).
// Returns (B, T, Hq, D) contiguous: what a transformers attention function returns.
torch::Tensor tree_attention_cpu(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor bits,
                                 int64_t prefix, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be 4-D");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "q, k, v need unit stride along D");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(), "q, k, v dtypes differ");
  TORCH_CHECK(k.size(2) >= prefix + q.size(2), "k has ", k.size(2), " rows, the step needs ", prefix + q.size(2));
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "query heads must be a multiple of kv heads");
  bits = bits.contiguous();
  TORCH_CHECK(bits.scalar_type() == at::kInt && bits.size(0) == q.size(2), "bits must be int32 (T, words)");
  auto out = torch::empty({q.size(0), q.size(2), q.size(1), q.size(3)}, q.options());
  const float s = static_cast<float>(scale);
  if (q.scalar_type() == at::kFloat) tree_attention_rows<float>(q, k, v, bits, prefix, s, out);
  else if (q.scalar_type() == at::kBFloat16) tree_attention_rows<at::BFloat16>(q, k, v, bits, prefix, s, out);
  else TORCH_CHECK(false, "tree_attention_cpu takes fp32 or bf16");
  return out;
}
