// Small fp32 matmuls whose rows do not depend on M: every output one fixed sequence of operations. For what runs
// beside low-bit weights: an unmerged LoRA's update. BLAS picks its kernel and blocking by shape, so a tree's
// row and the same token alone can differ in the last bit, which 8-bit activations downstream can turn into a
// different code. kernels/lora_add.py has the reference.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "vec.h"

namespace {

constexpr int64_t kChunkWork = 1 << 12;  // multiply-adds a thread's share has at least: a fork costs ~1-2 us

using medusa_lora::dot;
using medusa_lora::dot4;
using medusa_lora::kLanes;
using medusa_lora::load;
using medusa_lora::Vec;

void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 2, name, " must be contiguous 2-D fp32");
}

}  // namespace

// For each update u: ys[owners[u]] (M, N) += (x (M, K) A_u^T) B_u^T, A_u (r_u, K), B_u (N, r_u) (a LoRA's update,
// its scaling folded into B) given as panels P_u (ceil(N / 16), r_u, 16): P_u[b, j, e] = B_u[16 b + e, j], zero past
// N. In place, the updates of one output in their order. One call for the layers that read the same x (q / k / v;
// gate / up): x is read once and the calls' overhead paid once.
//   low[i, j] = x_i . A_u[j]                          (a fixed-order dot product over K, 4 ranks at a time)
//   y[i, 16 b : 16 b + 16] += sum_j low[i, j] P_u[b, j]  (16 outputs a vector, even and odd j each in order,
//                                                       then their sum: no horizontal sums)
// Each update is added to y on its own, so one call for many updates has the bits of one call each. Work is split
// by (output, panel), a panel read in one pass for up to 4 rows, so no output's arithmetic depends on M, the thread
// count or the other outputs.
void lora_add_(std::vector<torch::Tensor> ys, torch::Tensor x, std::vector<torch::Tensor> as,
               std::vector<torch::Tensor> panels, std::vector<int64_t> owners) {
  check(x, "x");
  const int64_t m = x.size(0), k = x.size(1), updates = static_cast<int64_t>(as.size());
  TORCH_CHECK(static_cast<int64_t>(panels.size()) == updates && static_cast<int64_t>(owners.size()) == updates,
              "one B and one owner per A");
  for (const auto& y : ys) {
    check(y, "y");
    TORCH_CHECK(y.size(0) == m, "y and x must have the same rows");
  }
  std::vector<int64_t> offsets(updates + 1, 0);  // update u's rank slice of `low`
  for (int64_t u = 0; u < updates; ++u) {
    check(as[u], "a");
    const auto& p = panels[u];
    TORCH_CHECK(p.scalar_type() == at::kFloat && p.is_contiguous() && p.dim() == 3 && p.size(2) == kLanes,
                "b must be contiguous fp32 panels (ceil(N / 16), r, 16)");
    TORCH_CHECK(owners[u] >= 0 && owners[u] < static_cast<int64_t>(ys.size()), "owner out of range");
    TORCH_CHECK(u == 0 || owners[u] >= owners[u - 1], "updates must be grouped by output, in order");
    TORCH_CHECK(as[u].size(1) == k && p.size(1) == as[u].size(0) &&
                    p.size(0) == (ys[owners[u]].size(1) + kLanes - 1) / kLanes,
                "shapes do not match");
    offsets[u + 1] = offsets[u] + as[u].size(0);
  }
  const int64_t ranks = offsets[updates];
  std::vector<float> low(m * ranks);  // low[i, offsets[u] + j] = x_i . A_u[j]
  std::vector<std::pair<int64_t, int64_t>> tiles;  // (u, j0): ranks j0 .. j0 + 3 of update u, a work item
  for (int64_t u = 0; u < updates; ++u)
    for (int64_t j = 0; j < as[u].size(0); j += 4) tiles.emplace_back(u, j);
  const float* xp = x.data_ptr<float>();
  const int64_t count = static_cast<int64_t>(tiles.size());
  const int64_t grain = std::max<int64_t>(1, kChunkWork / std::max<int64_t>(1, 4 * m * k));  // tiles a share has
  at::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) {
    float four[4];
    for (int64_t t = begin; t < end; ++t) {
      const auto [u, j0] = tiles[t];
      const float* ap = as[u].data_ptr<float>() + j0 * k;
      const int64_t width = std::min<int64_t>(4, as[u].size(0) - j0);
      for (int64_t i = 0; i < m; ++i) {
        float* li = low.data() + i * ranks + offsets[u] + j0;
        if (width == 4) {
          dot4(xp + i * k, ap, k, k, four);
          std::memcpy(li, four, sizeof(four));
        } else {
          for (int64_t j = 0; j < width; ++j) li[j] = dot(xp + i * k, ap + j * k, k);
        }
      }
    }
  });
  std::vector<int64_t> first(ys.size() + 1, 0);  // output l's blocks of 16 columns: [first[l], first[l + 1])
  for (size_t l = 0; l < ys.size(); ++l) first[l + 1] = first[l] + (ys[l].size(1) + kLanes - 1) / kLanes;
  std::vector<int64_t> first_update(ys.size() + 1, updates);  // output l's updates: [first_update[l], ...)
  for (int64_t u = updates - 1; u >= 0; --u) first_update[owners[u]] = u;
  for (int64_t l = static_cast<int64_t>(ys.size()) - 1; l >= 0; --l)
    first_update[l] = std::min(first_update[l], first_update[l + 1]);
  int64_t second = 0;  // the second product's multiply-adds
  for (int64_t u = 0; u < updates; ++u) second += m * as[u].size(0) * ys[owners[u]].size(1);
  const int64_t per_block = std::max<int64_t>(1, second / std::max<int64_t>(1, first.back()));
  at::parallel_for(0, first.back(), std::max<int64_t>(1, kChunkWork / per_block), [&](int64_t begin, int64_t end) {
    int64_t l = std::upper_bound(first.begin(), first.end(), begin) - first.begin() - 1;
    for (int64_t block = begin; block < end; ++block) {
      while (block >= first[l + 1]) ++l;
      const int64_t n = ys[l].size(1), c = (block - first[l]) * kLanes, width = std::min<int64_t>(kLanes, n - c);
      if (first_update[l] == first_update[l + 1]) continue;  // no update: y as it is
      float* yp = ys[l].data_ptr<float>() + c;
      for (int64_t u = first_update[l]; u < first_update[l + 1]; ++u) {
        const int64_t r = as[u].size(0);
        const float* panel = panels[u].data_ptr<float>() + (block - first[l]) * r * kLanes;
        for (int64_t i0 = 0; i0 < m; i0 += 4) {  // up to 4 rows at once: independent chains, one load of the panel
          const int64_t rows = std::min<int64_t>(4, m - i0);
          Vec even[4] = {}, odd[4] = {};  // ranks j even / odd: two chains a row, summed at the end
          for (int64_t j = 0; j < r; ++j) {
            const Vec b = load(panel + j * kLanes);
            Vec* acc = j % 2 ? odd : even;
            for (int64_t t = 0; t < rows; ++t) acc[t] += (Vec{} + low[(i0 + t) * ranks + offsets[u] + j]) * b;
          }
          for (int64_t t = 0; t < rows; ++t) {
            const Vec sum = even[t] + odd[t];
            float* yi = yp + (i0 + t) * n;
            if (width == kLanes) {
              const Vec out = load(yi) + sum;
              std::memcpy(yi, &out, sizeof(Vec));
            } else {
              for (int64_t e = 0; e < width; ++e) yi[e] += sum[e];
            }
          }
        }
      }
    }
  });
}
