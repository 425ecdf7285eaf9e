// Decode attention over the paged KV pool on CPU, reading each sequence's blocks where they lie.
//
// One query token per sequence. A task is a sequence with all its KV heads (each key and value
// row, [KVH, D] contiguous, is read whole and once, so a block streams from memory in order), or,
// when there are fewer sequences than threads, one KV head of a sequence. The query heads that
// share a KV head (grouped-query attention) are scored together. float32 only; exact softmax
// (max-subtracted), accumulated in float.
//
// Head sizes that are a multiple of 8 with up to 8 query heads per KV head take the vector path:
// 8-float vectors (GCC vector extensions: AVX2 with -march=native, SSE pairs otherwise), one
// accumulator per query head, and a vector exp. Other shapes take the plain loops.
#include "cpu_kernels.h"
#include "vec8.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace pdmesh {
namespace {

constexpr int64_t kSerialWork = 8192;

// e^x for x <= 0 (scores minus their maximum), within 2 ulp of expf: x = n ln2 + r, |r| <= ln2/2,
// e^r by Cephes' degree-6 polynomial, 2^n from the exponent bits. Below -87 it returns ~1e-38.
inline v8 exp8(v8 x) {
  const v8 lowest = splat(-87.0f);
  x = x < lowest ? lowest : x;
  const v8 shifter = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to the nearest integer
  const v8 n = (x * splat(1.44269504088896341f) + shifter) - shifter;
  const v8 r = x - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);
  v8 p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.0f);
  v8i bits = (__builtin_convertvector(n, v8i) + 127) << 23;
  return p * reinterpret_cast<v8&>(bits);
}

struct Shapes {
  const float* q;  // [B, H, D]
  const float* k;  // [S, KVH, D]
  const float* v;
  const int64_t* tables;  // [B, W]
  const int64_t* lens;
  float* out;  // [B, H * D]
  int64_t heads, kv_heads, dim, width, block_size;
  float scale;
};

struct Scratch {
  std::vector<float> scores, acc, inv;
};

// Calls f(t, row) for t = 0 .. length-1 of sequence b, row pointing at KV head g of token t's
// key or value row, block by block through the sequence's table.
template <typename F>
inline void for_each_row(const Shapes& s, const float* base, int64_t b, int64_t g, int64_t length, F&& f) {
  const int64_t* table = s.tables + b * s.width;
  const int64_t row_stride = s.kv_heads * s.dim;
  for (int64_t t0 = 0, blk = 0; t0 < length; t0 += s.block_size, ++blk) {
    const float* row = base + (table[blk] * s.block_size * s.kv_heads + g) * s.dim;
    const int64_t n = std::min(s.block_size, length - t0);
    for (int64_t i = 0; i < n; ++i, row += row_stride) f(t0 + i, row);
  }
}

// KV heads g0 .. g1-1 of sequence b: G query heads each, head size a multiple of 8. Scores are
// kept per query head, `padded` floats apart.
template <int G>
void attend_vector(const Shapes& s, int64_t b, int64_t g0, int64_t g1, Scratch& w) {
  const int64_t length = s.lens[b], dim = s.dim, chunks = dim / 8, span = g1 - g0, n = span * G;
  const int64_t padded = (length + 7) / 8 * 8;
  w.scores.resize(n * padded);
  w.acc.assign(n * dim, 0.0f);
  w.inv.resize(n);
  const float* qb = s.q + (b * s.heads + g0 * G) * dim;
  float* sc = w.scores.data();
  for_each_row(s, s.k, b, g0, length, [&](int64_t t, const float* row) {
    for (int64_t g = 0; g < span; ++g) {
      const float* key = row + g * dim;
      const float* qg = qb + g * G * dim;
      v8 dot[G];
      for (int h = 0; h < G; ++h) dot[h] = splat(0.0f);
      for (int64_t c = 0; c < chunks; ++c) {
        const v8 kc = load8(key + 8 * c);
        for (int h = 0; h < G; ++h) dot[h] += load8(qg + h * dim + 8 * c) * kc;
      }
      for (int h = 0; h < G; ++h) sc[(g * G + h) * padded + t] = hsum(dot[h]) * s.scale;
    }
  });
  for (int64_t h = 0; h < n; ++h) {
    float* row = sc + h * padded;
    const float top = *std::max_element(row, row + length);
    v8 sum = splat(0.0f);
    for (int64_t t = 0; t < padded; t += 8) {
      v8 e = exp8(load8(row + t) - splat(top));
      for (int64_t i = std::max<int64_t>(0, length - t); i < 8; ++i) e[i] = 0.0f;  // past the end
      store8(row + t, e);
      sum += e;
    }
    w.inv[h] = 1.0f / hsum(sum);
  }
  float* acc = w.acc.data();
  for_each_row(s, s.v, b, g0, length, [&](int64_t t, const float* row) {
    for (int64_t g = 0; g < span; ++g) {
      const float* value = row + g * dim;
      for (int64_t c = 0; c < chunks; ++c) {
        const v8 vc = load8(value + 8 * c);
        for (int h = 0; h < G; ++h) {
          float* o = acc + (g * G + h) * dim + 8 * c;
          store8(o, load8(o) + splat(sc[(g * G + h) * padded + t]) * vc);
        }
      }
    }
  });
  float* out = s.out + (b * s.heads + g0 * G) * dim;
  for (int64_t h = 0; h < n; ++h) {
    for (int64_t c = 0; c < chunks; ++c) store8(out + h * dim + 8 * c, load8(acc + h * dim + 8 * c) * splat(w.inv[h]));
  }
}

// The same for any group and head size.
void attend_plain(const Shapes& s, int64_t b, int64_t g0, int64_t g1, Scratch& w) {
  const int64_t length = s.lens[b], dim = s.dim, group = s.heads / s.kv_heads, span = g1 - g0;
  const int64_t n = span * group;
  w.scores.assign(n * length, 0.0f);
  w.acc.assign(n * dim, 0.0f);
  w.inv.resize(n);
  const float* qb = s.q + (b * s.heads + g0 * group) * dim;
  for_each_row(s, s.k, b, g0, length, [&](int64_t t, const float* row) {
    for (int64_t h = 0; h < n; ++h) {
      const float* key = row + h / group * dim;
      float dot = 0.0f;
      for (int64_t d = 0; d < dim; ++d) dot += qb[h * dim + d] * key[d];
      w.scores[h * length + t] = dot * s.scale;
    }
  });
  for (int64_t h = 0; h < n; ++h) {
    float* row = w.scores.data() + h * length;
    const float top = *std::max_element(row, row + length);
    float sum = 0.0f;
    for (int64_t t = 0; t < length; ++t) sum += row[t] = std::exp(row[t] - top);
    w.inv[h] = 1.0f / sum;
  }
  for_each_row(s, s.v, b, g0, length, [&](int64_t t, const float* row) {
    for (int64_t h = 0; h < n; ++h) {
      const float* value = row + h / group * dim;
      const float p = w.scores[h * length + t];
      for (int64_t d = 0; d < dim; ++d) w.acc[h * dim + d] += p * value[d];
    }
  });
  float* out = s.out + (b * s.heads + g0 * group) * dim;
  for (int64_t h = 0; h < n; ++h) {
    for (int64_t d = 0; d < dim; ++d) out[h * dim + d] = w.acc[h * dim + d] * w.inv[h];
  }
}

using Attend = void (*)(const Shapes&, int64_t, int64_t, int64_t, Scratch&);

Attend pick(int64_t group, int64_t dim) {
  if (dim % 8 != 0) return attend_plain;
  switch (group) {
    case 1: return attend_vector<1>;
    case 2: return attend_vector<2>;
    case 3: return attend_vector<3>;
    case 4: return attend_vector<4>;
    case 5: return attend_vector<5>;
    case 6: return attend_vector<6>;
    case 7: return attend_vector<7>;
    case 8: return attend_vector<8>;
    default: return attend_plain;
  }
}

// q: [B, H, D]; kv: [2, S, KVH, D] (one layer: keys, values); tables: [B, W] block ids (int64);
// lens: [B] context lengths (int64). Returns [B, H * D].
}  // namespace

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
  auto out = torch::empty({batch, heads * dim}, qc.options());
  const Shapes s{qc.data_ptr<float>(), kv.data_ptr<float>(), kv.data_ptr<float>() + slots * kv_heads * dim,
                 tc.data_ptr<int64_t>(), lc.data_ptr<int64_t>(), out.data_ptr<float>(),
                 heads, kv_heads, dim, tc.size(1), block_size, static_cast<float>(scale)};
  int64_t work = 0;  // (query head, context token) pairs
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(s.lens[b] >= 1 && s.lens[b] <= s.width * block_size, "context length ", s.lens[b], " of row ",
                b, " is outside its block table (", s.width, " blocks of ", block_size, ")");
    work += s.lens[b] * heads;
  }
  const Attend attend = pick(heads / kv_heads, dim);
  // Waking the pool's sleeping threads costs tens of microseconds; below this much work one thread
  // finishes sooner (a batch-1 step's attention is a few microseconds per layer).
  const bool serial = work < kSerialWork;
  const int64_t span = serial || batch >= at::get_num_threads() ? kv_heads : 1;  // KV heads per task
  const int64_t per_sequence = kv_heads / span, tasks = batch * per_sequence;
  at::parallel_for(0, tasks, serial ? tasks : 1, [&](int64_t begin, int64_t end) {
    Scratch scratch;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g0 = task % per_sequence * span;
      attend(s, task / per_sequence, g0, g0 + span, scratch);
    }
  });
  return out;
}

}  // namespace pdmesh
