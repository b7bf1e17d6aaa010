// The `tokcomp` operator library: op schemas, and the Python module `tokcomp._C`.
//
// Kernels are registered per device in cpu/*.cpp and cuda/*.cu (TORCH_LIBRARY_IMPL). The fake
// (meta) kernels that let torch.compile trace these ops live in Python, in tokcomp/ops/_fake.py,
// which set_python_module names so that torch can import it on demand.
#include <pybind11/pybind11.h>
#include <torch/library.h>

TORCH_LIBRARY(tokcomp, m) {
  m.set_python_module("tokcomp.ops._fake");
  m.def("best_match(Tensor a, Tensor b, int a_protected, int b_protected) -> (Tensor, Tensor)");
  m.def(
      "weighted_merge(Tensor x, Tensor weight, Tensor size, Tensor keep_idx, Tensor src_idx, "
      "Tensor dst_pos) -> (Tensor, Tensor)");
  m.def("energy_score(Tensor metric, float margin, float alpha) -> Tensor");
  m.def("attention_pagerank(Tensor attn, int iterations) -> Tensor");
  m.def("greedy_maxmin(Tensor dist, Tensor weight, Tensor first, int k) -> Tensor");
  m.def("greedy_dpp(Tensor similarity, Tensor relevance, int k) -> Tensor");
}

// Loading the module registers the ops above (static initialisers of this shared library).
// It only exposes WITH_CUDA: whether CUDA kernels were compiled in.
PYBIND11_MODULE(_C, m) {
  m.doc() = "tokcomp's compiled kernels, registered as torch.ops.tokcomp.*";
#ifdef WITH_CUDA
  m.attr("WITH_CUDA") = pybind11::bool_(true);
#else
  m.attr("WITH_CUDA") = pybind11::bool_(false);
#endif
}
