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

// For each update u: ys[owners[u]] (M, N) += (x (M, K) A_u^T) B_u^T, A_u (r_u, K), B_u (N, r_u) (a LoRA's update,
// its scaling folded into B), in place, the updates of one output in their order. One call for the layers that
// read the same x (q / k / v; gate / up): x is read once and the calls' overhead paid once.
void lora_add_(std::vector<torch::Tensor> ys, torch::Tensor x, std::vector<torch::Tensor> as,
               std::vector<torch::Tensor> bs, std::vector<int64_t> owners) {
  check(x, "x");
  const int64_t m = x.size(0), k = x.size(1), updates = static_cast<int64_t>(as.size());
  TORCH_CHECK(static_cast<int64_t>(bs.size()) == updates && static_cast<int64_t>(owners.size()) == updates,
              "one B and one owner per A");
  for (const auto& y : ys) {
    check(y, "y");
    TORCH_CHECK(y.size(0) == m, "y and x must have the same rows");
  }
  std::vector<int64_t> offsets(updates + 1, 0);  // update u's rank slice of `low`
  for (int64_t u = 0; u < updates; ++u) {
    check(as[u], "a");
    check(bs[u], "b");
    TORCH_CHECK(owners[u] >= 0 && owners[u] < static_cast<int64_t>(ys.size()), "owner out of range");
    TORCH_CHECK(u == 0 || owners[u] >= owners[u - 1], "updates must be grouped by output, in order");
    TORCH_CHECK(as[u].size(1) == k && bs[u].size(1) == as[u].size(0) && bs[u].size(0) == ys[owners[u]].size(1),
                "shapes do not match");
    offsets[u + 1] = offsets[u] + as[u].size(0);
  }
  const int64_t ranks = offsets[updates];
  std::vector<float> low(m * ranks);  // low[i, offsets[u] + j] = x_i . A_u[j]
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, updates, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const float* ap = as[u].data_ptr<float>();
      for (int64_t j = 0; j < as[u].size(0); ++j)
        for (int64_t i = 0; i < m; ++i) low[i * ranks + offsets[u] + j] = dot(xp + i * k, ap + j * k, k);
    }
  });
  std::vector<int64_t> starts(ys.size() + 1, 0);  // output l's columns in one range over all outputs
  for (size_t l = 0; l < ys.size(); ++l) starts[l + 1] = starts[l] + ys[l].size(1);
  at::parallel_for(0, starts.back(), 256, [&](int64_t begin, int64_t end) {
    for (int64_t u = 0; u < updates; ++u) {
      const int64_t l = owners[u], n = ys[l].size(1), r = as[u].size(0);
      const int64_t lo = std::max(begin, starts[l]) - starts[l], hi = std::min(end, starts[l + 1]) - starts[l];
      if (lo >= hi) continue;
      const float* bp = bs[u].data_ptr<float>();
      float* yp = ys[l].data_ptr<float>();
      for (int64_t i = 0; i < m; ++i)
        for (int64_t c = lo; c < hi; ++c) yp[i * n + c] += dot(low.data() + i * ranks + offsets[u], bp + c * r, r);
    }
  });
}
