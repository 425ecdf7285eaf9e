// Decode attention over the paged KV pool on CPU, reading each sequence's blocks where they lie.
//
// One query token per sequence. Work is split by (sequence, KV head): the query heads that share a
// KV head (grouped-query attention) read each key and value row once, together. float32 only; the
// scores are exact softmax (max-subtracted), accumulated in float.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kSerialWork = 8192;

// q: [B, H, D]; kv: [2, S, KVH, D] (one layer: keys, values); tables: [B, W] block ids (int64);
// lens: [B] context lengths (int64). Returns [B, H * D].
torch::Tensor paged_decode(const torch::Tensor& q, const torch::Tensor& kv, const torch::Tensor& tables,
                           const torch::Tensor& lens, int64_t block_size, double scale) {
  TORCH_CHECK(q.device().is_cpu() && kv.device().is_cpu(), "paged_decode runs on CPU tensors");
  TORCH_CHECK(q.scalar_type() == torch::kFloat && kv.scalar_type() == torch::kFloat,
              "paged_decode takes float32 q and KV");
  TORCH_CHECK(q.dim() == 3 && kv.dim() == 4 && kv.size(0) == 2, "q must be [B, H, D], kv [2, S, KVH, D]");
  TORCH_CHECK(tables.scalar_type() == torch::kLong && lens.scalar_type() == torch::kLong,
              "block tables and lengths must be int64");
  auto qc = q.contiguous();
  TORCH_CHECK(kv.is_contiguous(), "the KV layer must be contiguous");
  auto tc = tables.contiguous();
  auto lc = lens.contiguous();
  const int64_t batch = qc.size(0), heads = qc.size(1), dim = qc.size(2);
  const int64_t slots = kv.size(1), kv_heads = kv.size(2);
  TORCH_CHECK(kv.size(3) == dim && heads % kv_heads == 0, "head sizes of q and KV do not match");
  TORCH_CHECK(tc.size(0) == batch && lc.size(0) == batch, "one block table and one length per query");
  const int64_t group = heads / kv_heads, width = tc.size(1);
  auto out = torch::empty({batch, heads * dim}, qc.options());
  const float* qp = qc.data_ptr<float>();
  const float* kp = kv.data_ptr<float>();
  const float* vp = kp + slots * kv_heads * dim;
  const int64_t* tp = tc.data_ptr<int64_t>();
  const int64_t* lp = lc.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  int64_t work = 0;  // (query head, context token) pairs
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= width * block_size, "context length ", lp[b], " of row ", b,
                " is outside its block table (", width, " blocks of ", block_size, ")");
    work += lp[b] * heads;
  }
  // Waking the pool's sleeping threads costs tens of microseconds; below this much work one thread
  // finishes sooner (a batch-1 step's attention is a few microseconds per layer).
  const int64_t tasks = batch * kv_heads;
  const int64_t grain = work < kSerialWork ? tasks : 1;

  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<float> sums(group);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kv_heads, g = task % kv_heads, length = lp[b];
      scores.assign(group * length, 0.0f);
      const float* qb = qp + (b * heads + g * group) * dim;
      for (int64_t t = 0; t < length; ++t) {
        const int64_t slot = tp[b * width + t / block_size] * block_size + t % block_size;
        const float* k = kp + (slot * kv_heads + g) * dim;
        for (int64_t h = 0; h < group; ++h) {
          const float* qh = qb + h * dim;
          float s = 0.0f;
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < dim; ++d) s += qh[d] * k[d];
          scores[h * length + t] = s * fscale;
        }
      }
      for (int64_t h = 0; h < group; ++h) {
        float* row = scores.data() + h * length;
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < length; ++t) top = std::max(top, row[t]);
        float sum = 0.0f;
        for (int64_t t = 0; t < length; ++t) {
          row[t] = std::exp(row[t] - top);
          sum += row[t];
        }
        sums[h] = sum;
        float* o = op + b * heads * dim + (g * group + h) * dim;
        for (int64_t d = 0; d < dim; ++d) o[d] = 0.0f;
      }
      for (int64_t t = 0; t < length; ++t) {
        const int64_t slot = tp[b * width + t / block_size] * block_size + t % block_size;
        const float* v = vp + (slot * kv_heads + g) * dim;
        for (int64_t h = 0; h < group; ++h) {
          const float p = scores[h * length + t];
          float* o = op + b * heads * dim + (g * group + h) * dim;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) o[d] += p * v[d];
        }
      }
      for (int64_t h = 0; h < group; ++h) {
        float* o = op + b * heads * dim + (g * group + h) * dim;
        const float inv = 1.0f / sums[h];
        for (int64_t d = 0; d < dim; ++d) o[d] *= inv;
      }
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "decode attention over paged KV blocks (CPU, float32)");
}
