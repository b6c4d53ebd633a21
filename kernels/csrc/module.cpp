// The CPU extension's Python bindings: the ops of the files beside it.
#include <torch/extension.h>

#include <string>
#include <vector>

std::vector<torch::Tensor> int4_matmul(torch::Tensor x, std::vector<torch::Tensor> packed,
                                       std::vector<torch::Tensor> scales, std::vector<torch::Tensor> mins);
std::vector<torch::Tensor> int8_matmul(torch::Tensor x, std::vector<torch::Tensor> packed,
                                       std::vector<torch::Tensor> scales);
std::string lowbit_isa();
void lora_add_(std::vector<torch::Tensor> ys, torch::Tensor x, std::vector<torch::Tensor> as,
               std::vector<torch::Tensor> panels, std::vector<int64_t> owners);
void rotary_(torch::Tensor out, torch::Tensor x, torch::Tensor cos, torch::Tensor sin);
torch::Tensor tree_attention_cpu(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor bits,
                                 int64_t prefix, double scale);
void bind_decoder_layers(pybind11::module& module);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("int4_matmul", &int4_matmul, "x (M, K) @ each int4 weight^T -> [(M, N)]");
  module.def("int8_matmul", &int8_matmul, "x (M, K) @ each int8 weight^T -> [(M, N)]");
  module.def("isa", &lowbit_isa, "the instruction set the low-bit kernels were built for");
  module.def("lora_add_", &lora_add_, "ys[owner] += (x A^T) B^T in place per (A, B panels, owner), fp32, rows independent of M (kernels/lora_add.py)");
  module.def("rotary_", &rotary_, "out (B, H, T, D) = rotary(x (B, T, H, D)), fp32 (kernels/rotary.py)");
  module.def("tree_attention", &tree_attention_cpu, "tree attention, row by row (kernels/tree_attention.py)");
  bind_decoder_layers(module);
}
