// Rotary position embedding written where it is needed: out (B, H, T, D) = x * cos + rotate_half(x) * sin, x the
// projection's (B, T, H, D) view, cos / sin (B, T, D); fp32. The same operations as transformers'
// apply_rotary_pos_emb, each rounded on its own (no fused multiply-add), so results equal its bit for bit; one call
// instead of its eight ops, and the keys go straight into the cache. kernels/rotary.py has the reference.
#include <torch/extension.h>

__attribute__((optimize("fp-contract=off")))
void rotary_(torch::Tensor out, torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(x.dim() == 4 && out.dim() == 4 && cos.dim() == 3 && sin.sizes() == cos.sizes(), "x (B, T, H, D), cos / sin (B, T, D)");
  TORCH_CHECK(x.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat && cos.scalar_type() == at::kFloat &&
                  sin.scalar_type() == at::kFloat, "rotary_ takes fp32");
  const int64_t b = x.size(0), t = x.size(1), h = x.size(2), d = x.size(3), half = d / 2;
  TORCH_CHECK(out.size(0) == b && out.size(1) == h && out.size(2) == t && out.size(3) == d, "out must be (B, H, T, D)");
  TORCH_CHECK(x.stride(3) == 1 && out.stride(3) == 1 && d % 2 == 0, "unit stride along an even D");
  cos = cos.contiguous();
  sin = sin.contiguous();
  const float* xp = x.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const auto xs = x.strides(), os = out.strides();
  for (int64_t bi = 0; bi < b; ++bi)
    for (int64_t ti = 0; ti < t; ++ti) {
      const float* c = cp + (bi * t + ti) * d;
      const float* s = sp + (bi * t + ti) * d;
      for (int64_t hi = 0; hi < h; ++hi) {
        const float* src = xp + bi * xs[0] + ti * xs[1] + hi * xs[2];
        float* dst = op + bi * os[0] + hi * os[1] + ti * os[2];
        for (int64_t e = 0; e < half; ++e) {
          const float a = src[e] * c[e];
          const float r = -src[e + half] * s[e];
          dst[e] = a + r;
        }
        for (int64_t e = half; e < d; ++e) {
          const float a = src[e] * c[e];
          const float r = src[e - half] * s[e];
          dst[e] = a + r;
        }
      }
    }
}
