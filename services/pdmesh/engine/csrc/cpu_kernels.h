// The CPU kernels of the pdmesh_cpu_kernels extension (bindings.cpp exposes them to Python).
#pragma once

#include <torch/extension.h>

#include <optional>

namespace pdmesh {

// Decode attention over paged KV blocks; paged_decode.cpp.
torch::Tensor paged_decode(const torch::Tensor& q, const torch::Tensor& kv, const torch::Tensor& tables,
                           const torch::Tensor& lens, int64_t block_size, double scale);

// y = x @ weight.T (+ bias) for a few rows of x; skinny_linear.cpp.
torch::Tensor skinny_linear(const torch::Tensor& x, const torch::Tensor& weight,
                            const std::optional<torch::Tensor>& bias);

}  // namespace pdmesh
