// A Llama-family decoder's layers for one step, driven from C++: the same operations as the lean forward's Python
// loop (verification/lean_forward.py), in the same order, on the same ATen ops and extension kernels, so the bits
// are the same; what goes is the Python around ~20 small ops a layer (a 135M model's plain CPU step spent ~3 ms of
// ~9 there). Per layer, with x (1, T, H):
//   h = x + o(attention(rotary(q(n1(x))), rotary(k(n1(x))) -> cache, v(n1(x)) -> cache))
//   out = h + down(silu(gate(n2(h))) * up(n2(h)))
// n1 / n2 are RMSNorms, transformers' formula op for op (w * (x * rsqrt(mean(x^2) + eps))), or the module itself;
// the linear groups (q / k / v, o, gate / up, down) call the int4 / int8 kernel and the LoRA kernel directly where
// LinearGroup would, else the Python LinearGroup.
#include <torch/extension.h>

#include <chrono>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;

std::vector<torch::Tensor> int4_matmul(torch::Tensor x, std::vector<torch::Tensor> packed,
                                       std::vector<torch::Tensor> scales, std::vector<torch::Tensor> mins);
std::vector<torch::Tensor> int8_matmul(torch::Tensor x, std::vector<torch::Tensor> packed,
                                       std::vector<torch::Tensor> scales);
void lora_add_(std::vector<torch::Tensor> ys, torch::Tensor x, std::vector<torch::Tensor> as,
               std::vector<torch::Tensor> panels, std::vector<int64_t> owners);
void rotary_(torch::Tensor out, torch::Tensor x, torch::Tensor cos, torch::Tensor sin);
torch::Tensor tree_attention_cpu(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor bits,
                                 int64_t prefix, double scale);

namespace {

// Seconds per part of the steps while timing is on (scripts/bench_step.py): one thread calls step.
bool timing = false;
std::map<std::string, double> seconds;

// Adds the time from its construction to its destruction to seconds[name] while timing is on.
class Timed {
 public:
  explicit Timed(const char* name) : name_(name) {
    if (timing) start_ = std::chrono::steady_clock::now();
  }
  ~Timed() {
    if (timing) seconds[name_] += std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  }

 private:
  const char* name_;
  std::chrono::steady_clock::time_point start_;
};

// An RMSNorm: transformers' (weight, eps), or a module to call.
struct Norm {
  torch::Tensor weight;
  double eps = 0.0;
  py::object module = py::none();

  torch::Tensor operator()(const torch::Tensor& x) const {
    Timed timed("norms");
    if (!module.is_none()) return module(x).cast<torch::Tensor>();
    auto variance = x.pow(2).mean(-1, /*keepdim=*/true);
    return weight * (x * at::rsqrt(variance + eps));
  }
};

// Layers that read the same x: the int4 (or int8: no mins) kernel's and the LoRA kernel's arguments
// (LinearGroup's), or LinearGroup.
struct Linears {
  std::vector<torch::Tensor> codes, scales, mins;
  std::vector<std::optional<torch::Tensor>> biases;
  std::vector<torch::Tensor> as, panels;
  std::vector<int64_t> owners;
  py::object group = py::none();

  std::vector<torch::Tensor> operator()(const torch::Tensor& x) const {
    if (!group.is_none()) {
      Timed timed("linears (Python)");
      return group(x).cast<std::vector<torch::Tensor>>();
    }
    const auto rows = x.reshape({-1, x.size(-1)}).contiguous();
    std::vector<torch::Tensor> ys;
    if (mins.empty()) {
      Timed timed("int8_matmul");
      ys = int8_matmul(rows, codes, scales);
    } else {
      Timed timed("int4_matmul");
      ys = int4_matmul(rows, codes, scales, mins);
    }
    Timed timed("lora_add_");  // and the biases
    for (size_t i = 0; i < ys.size(); ++i)
      if (biases[i]) ys[i] = ys[i] + *biases[i];
    if (!as.empty()) lora_add_(ys, rows, as, panels, owners);
    for (auto& y : ys) y = y.view({x.size(0), x.size(1), -1});
    return ys;
  }
};

struct Layer {
  Norm input_norm, post_norm;
  Linears qkv, o, gate_up, down;
  torch::Tensor keys, values;  // (1, Hkv, capacity, D): the lean forward's cache, shared
  double scaling;
  py::object act;  // None: SiLU
};

Norm make_norm(py::tuple spec) {
  Norm norm;
  if (spec.size() == 1) norm.module = spec[0];
  else {
    norm.weight = spec[0].cast<torch::Tensor>();
    norm.eps = spec[1].cast<double>();
  }
  return norm;
}

// spec: (group,) or (codes, scales, mins (empty: int8), biases (None each where absent), as, panels, owners)
Linears make_linears(py::tuple spec) {
  Linears linears;
  if (spec.size() == 1) {
    linears.group = spec[0];
    return linears;
  }
  TORCH_CHECK(spec.size() == 7, "a linear group is (group,) or its 7 kernel arguments");
  linears.codes = spec[0].cast<std::vector<torch::Tensor>>();
  linears.scales = spec[1].cast<std::vector<torch::Tensor>>();
  linears.mins = spec[2].cast<std::vector<torch::Tensor>>();
  for (auto bias : spec[3].cast<py::list>())
    linears.biases.push_back(bias.is_none() ? std::nullopt : std::optional(bias.cast<torch::Tensor>()));
  TORCH_CHECK(linears.biases.size() == linears.codes.size(), "one bias (or None) per weight");
  linears.as = spec[4].cast<std::vector<torch::Tensor>>();
  linears.panels = spec[5].cast<std::vector<torch::Tensor>>();
  linears.owners = spec[6].cast<std::vector<int64_t>>();
  return linears;
}

class DecoderLayers {
 public:
  DecoderLayers(int64_t heads, int64_t kv_heads, int64_t head_dim)
      : heads_(heads), kv_heads_(kv_heads), head_dim_(head_dim) {}

  void add_layer(py::tuple input_norm, py::tuple post_norm, py::tuple qkv, py::tuple o, py::tuple gate_up,
                 py::tuple down, py::object act, torch::Tensor keys, torch::Tensor values, double scaling) {
    TORCH_CHECK(keys.dim() == 4 && keys.size(1) == kv_heads_ && keys.size(3) == head_dim_ &&
                    values.sizes() == keys.sizes(), "keys / values must be (1, kv_heads, capacity, head_dim)");
    layers_.push_back(Layer{make_norm(input_norm), make_norm(post_norm), make_linears(qkv), make_linears(o),
                            make_linears(gate_up), make_linears(down), std::move(keys), std::move(values), scaling,
                            std::move(act)});
  }

  // hidden (1, T, H) after the embeddings, cos / sin (1, T, D), bits the tree's packed mask, prefix cached rows:
  // the last layer's output (1, T, H); the step's keys and values written at rows [prefix, prefix + T).
  torch::Tensor step(torch::Tensor hidden, torch::Tensor cos, torch::Tensor sin, torch::Tensor bits,
                     int64_t prefix) const {
    TORCH_CHECK(hidden.dim() == 3 && hidden.size(0) == 1, "hidden must be (1, T, H)");
    Timed timed("decoder layers");
    const int64_t size = hidden.size(1), end = prefix + size;
    auto queries = torch::empty({1, heads_, size, head_dim_}, hidden.options());
    for (const auto& layer : layers_) {
      TORCH_CHECK(end <= layer.keys.size(2), prefix, " cached + ", size, " new rows do not fit the cache");
      auto residual = hidden;
      auto qkv = layer.qkv(layer.input_norm(hidden));
      auto q = qkv[0].view({1, size, heads_, head_dim_});
      auto k = qkv[1].view({1, size, kv_heads_, head_dim_});
      auto v = qkv[2].view({1, size, kv_heads_, head_dim_});
      {
        Timed timed("rotary_");  // and the values into the cache
        rotary_(queries, q, cos, sin);
        rotary_(layer.keys.slice(2, prefix, end), k, cos, sin);
        layer.values.slice(2, prefix, end).copy_(v.transpose(1, 2));
      }
      torch::Tensor out;
      {
        Timed timed("tree_attention");
        out = tree_attention_cpu(queries, layer.keys.slice(2, 0, end), layer.values.slice(2, 0, end), bits, prefix,
                                 layer.scaling);  // (1, T, Hq, D)
      }
      hidden = residual + layer.o(out.reshape({1, size, -1}))[0];
      residual = hidden;
      auto gate_up = layer.gate_up(layer.post_norm(hidden));
      auto gate = layer.act.is_none() ? at::silu(gate_up[0]) : layer.act(gate_up[0]).cast<torch::Tensor>();
      hidden = residual + layer.down(gate * gate_up[1])[0];
    }
    return hidden;
  }

 private:
  int64_t heads_, kv_heads_, head_dim_;
  std::vector<Layer> layers_;
};

}  // namespace

void bind_decoder_layers(py::module& module) {
  py::class_<DecoderLayers>(module, "DecoderLayers", "a decoder's layers for one step (csrc/decoder_layers.cpp)")
      .def(py::init<int64_t, int64_t, int64_t>(), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"))
      .def("add_layer", &DecoderLayers::add_layer)
      .def("step", &DecoderLayers::step);
  module.def("set_step_timing", [](bool on) { timing = on; }, "time DecoderLayers.step's parts (or stop)");
  module.def(
      "step_times", [] { return std::exchange(seconds, {}); },
      "seconds per part of DecoderLayers.step since the last call (\"decoder layers\": the whole), while timed");
}
