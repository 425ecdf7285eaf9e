// y = x @ weight.T (+ bias) for a few rows of x: the linears of a small decode batch on CPU.
//
// With a few rows of x a linear is bound by reading the weight once. Each task streams a run of
// whole weight rows in order; several weight rows at a time share every load of x, and every
// weight vector serves several rows of x, with one 8-float accumulator per (weight row, x row).
// Each output is the same float sum in the same order (8 lanes along K, added up, then the tail)
// whatever the blocking and the batch, so a sequence gets bit-identical linears alone or batched.
// The order differs from oneDNN's GEMM, as oneDNN's differs from a plain matmul. float32 only.
// No contraction here: a fused multiply-add is fma8's, explicitly, so every block rounds alike.
#pragma GCC optimize("fp-contract=off")

#include "cpu_kernels.h"
#include "vec8.h"

#include <ATen/Parallel.h>

#include <algorithm>

namespace pdmesh {
namespace {

constexpr int64_t kMaxRows = 256;
// Weight rows a run of x rows meets before the next run: 16 rows of 576 floats are 36 KB (L1/L2).
constexpr int64_t kNBlock = 16;
// Below this many weight bytes a task would cost more to wake a pooled thread for than it saves.
constexpr int64_t kTaskBytes = 64 * 1024;

struct Operands {
  const float* x;
  const float* w;
  const float* bias;  // nullptr: none
  float* y;
  int64_t k, n;
};

// Weight rows [n, n + R) against rows [b0, b0 + B) of x. Every output is the same sum in the same
// order whatever R, B and the batch are: 8 lanes accumulated along K, then added up, then the tail.
template <int R, int B>
inline void block(const Operands& o, int64_t n, int64_t b0) {
  v8 acc[R][B];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b) acc[r][b] = splat(0.0f);
  const float* w = o.w + n * o.k;
  const float* x = o.x + b0 * o.k;
  const int64_t k8 = o.k / 8 * 8;
  for (int64_t c = 0; c < k8; c += 8) {
    v8 xv[B];
    for (int b = 0; b < B; ++b) xv[b] = load8(x + b * o.k + c);
    for (int r = 0; r < R; ++r) {
      const v8 wv = load8(w + r * o.k + c);
      for (int b = 0; b < B; ++b) acc[r][b] = fma8(wv, xv[b], acc[r][b]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int b = 0; b < B; ++b) {
      float sum = hsum(acc[r][b]);
      for (int64_t c = k8; c < o.k; ++c) sum += w[r * o.k + c] * x[b * o.k + c];
      o.y[(b0 + b) * o.n + n + r] = o.bias ? sum + o.bias[n + r] : sum;
    }
  }
}

// Rows [b0, b0 + B) of x against weight rows [begin, end): R weight rows at a time, then one.
template <int R, int B>
void weight_rows(const Operands& o, int64_t b0, int64_t begin, int64_t end) {
  int64_t n = begin;
  for (; n + R <= end; n += R) block<R, B>(o, n, b0);
  for (; n < end; ++n) block<1, B>(o, n, b0);
}

// All rows of x against weight rows [begin, end). One or two rows of x: four weight rows at a time.
// More: runs of kChunk rows of x against two weight rows, which stay in cache across the runs.
constexpr int kChunk = 6;
void row_range(const Operands& o, int64_t batch, int64_t begin, int64_t end) {
  if (batch == 1) return weight_rows<4, 1>(o, 0, begin, end);
  if (batch == 2) return weight_rows<4, 2>(o, 0, begin, end);
  for (int64_t n = begin; n < end; n += kNBlock) {
    const int64_t n1 = std::min(end, n + kNBlock);
    int64_t b0 = 0;
    for (; b0 + kChunk <= batch; b0 += kChunk) weight_rows<2, kChunk>(o, b0, n, n1);
    switch (batch - b0) {
      case 5: weight_rows<2, 5>(o, b0, n, n1); break;
      case 4: weight_rows<2, 4>(o, b0, n, n1); break;
      case 3: weight_rows<2, 3>(o, b0, n, n1); break;
      case 2: weight_rows<2, 2>(o, b0, n, n1); break;
      case 1: weight_rows<2, 1>(o, b0, n, n1); break;
      default: break;
    }
  }
}

}  // namespace

torch::Tensor skinny_linear(const torch::Tensor& x, const torch::Tensor& weight,
                            const std::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "skinny_linear runs on CPU tensors");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && weight.scalar_type() == torch::kFloat,
              "skinny_linear takes float32 x and weight");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "x must be [B, K] and weight [N, K], got ", x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(x.size(0) <= kMaxRows, "skinny_linear takes at most ", kMaxRows, " rows of x, got ", x.size(0));
  TORCH_CHECK(weight.is_contiguous(), "the weight must be contiguous");
  auto xc = x.contiguous();
  std::optional<torch::Tensor> bc;
  if (bias.has_value()) {
    bc = bias->contiguous();
    TORCH_CHECK(bc->scalar_type() == torch::kFloat && bc->numel() == weight.size(0), "bias must be float32 [N]");
  }
  const int64_t batch = xc.size(0), k = xc.size(1), n = weight.size(0);
  auto y = torch::empty({batch, n}, xc.options());
  if (batch == 0) return y;  // a step that scores no row (a prompt chunk that is not its last)
  const Operands o{xc.data_ptr<float>(), weight.data_ptr<float>(), bc ? bc->data_ptr<float>() : nullptr,
                   y.data_ptr<float>(), k, n};
  const int64_t grain = std::max<int64_t>(1, kTaskBytes / (4 * std::max<int64_t>(k, 1)));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    row_range(o, batch, begin, end);
  });
  return y;
}

}  // namespace pdmesh
