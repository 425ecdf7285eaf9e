// y = x @ weight.T (+ bias) for a few rows of x: the linears of a small decode batch on CPU.
//
// With one to four rows of x a linear is a matrix-vector product bound by reading the weight
// once. Each task streams a run of whole weight rows in order; R of them at a time share every
// load of x, and each weight vector is used for every row of x, with one 8-float accumulator per
// (weight row, x row). Accumulation is in float; the order differs from oneDNN's GEMM, as oneDNN's
// differs from a plain matmul. float32 only.
#include "cpu_kernels.h"
#include "vec8.h"

#include <ATen/Parallel.h>

#include <algorithm>

namespace pdmesh {
namespace {

constexpr int64_t kMaxRows = 4;
// Below this many weight bytes a task would cost more to wake a pooled thread for than it saves.
constexpr int64_t kTaskBytes = 64 * 1024;

struct Operands {
  const float* x;
  const float* w;
  const float* bias;  // nullptr: none
  float* y;
  int64_t k, n;
};

// Weight rows [n, n + R) against all B rows of x.
template <int R, int B>
inline void rows(const Operands& o, int64_t n) {
  v8 acc[R][B];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b) acc[r][b] = splat(0.0f);
  const float* w = o.w + n * o.k;
  const int64_t k8 = o.k / 8 * 8;
  for (int64_t c = 0; c < k8; c += 8) {
    v8 xv[B];
    for (int b = 0; b < B; ++b) xv[b] = load8(o.x + b * o.k + c);
    for (int r = 0; r < R; ++r) {
      const v8 wv = load8(w + r * o.k + c);
      for (int b = 0; b < B; ++b) acc[r][b] += wv * xv[b];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int b = 0; b < B; ++b) {
      float sum = hsum(acc[r][b]);
      for (int64_t c = k8; c < o.k; ++c) sum += w[r * o.k + c] * o.x[b * o.k + c];
      o.y[b * o.n + n + r] = o.bias ? sum + o.bias[n + r] : sum;
    }
  }
}

// Four weight rows at a time while the accumulators fit the 16 vector registers, two beyond.
template <int B>
void row_range(const Operands& o, int64_t begin, int64_t end) {
  constexpr int R = B <= 2 ? 4 : 2;
  int64_t n = begin;
  for (; n + R <= end; n += R) rows<R, B>(o, n);
  for (; n < end; ++n) rows<1, B>(o, n);
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
    switch (batch) {
      case 1: row_range<1>(o, begin, end); break;
      case 2: row_range<2>(o, begin, end); break;
      case 3: row_range<3>(o, begin, end); break;
      default: row_range<4>(o, begin, end); break;
    }
  });
  return y;
}

}  // namespace pdmesh
