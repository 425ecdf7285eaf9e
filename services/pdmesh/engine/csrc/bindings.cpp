// The Python module of the CPU kernels (built by pdmesh/engine/cpu_kernels.py).
#include "cpu_kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &pdmesh::paged_decode, "decode attention over paged KV blocks (CPU, float32)");
  m.def("skinny_linear", &pdmesh::skinny_linear, "x @ weight.T (+ bias) for a few rows of x (CPU, float32)");
}
