// Small fp32 matmuls whose rows do not depend on M: every output one fixed-order dot product. For what runs
// beside low-bit weights: an unmerged LoRA's update. BLAS picks its kernel and blocking by shape, so a tree's
// row and the same token alone can differ in the last bit, which 8-bit activations downstream can turn into a
// different code. kernels/lora_add.py has the reference.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <vector>

#include "vec.h"

namespace {

using medusa_lora::dot;

void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 2, name, " must be contiguous 2-D fp32");
}

}  // namespace

// y (M, N) += (x (M, K) A^T) B^T, A (r, K), B (N, r) (a LoRA's update, its scaling folded into B), in place.
void lora_add_(torch::Tensor y, torch::Tensor x, torch::Tensor a, torch::Tensor b) {
  check(y, "y");
  check(x, "x");
  check(a, "a");
  check(b, "b");
  const int64_t m = x.size(0), k = x.size(1), r = a.size(0), n = b.size(0);
  TORCH_CHECK(a.size(1) == k && b.size(1) == r && y.size(0) == m && y.size(1) == n, "shapes do not match");
  const float* xp = x.data_ptr<float>();
  const float* ap = a.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  std::vector<float> low(m * r);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < r; ++j) low[i * r + j] = dot(xp + i * k, ap + j * k, k);
  at::parallel_for(0, n, 512, [&](int64_t begin, int64_t end) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t c = begin; c < end; ++c) yp[i * n + c] += dot(low.data() + i * r, bp + c * r, r);
  });
}
