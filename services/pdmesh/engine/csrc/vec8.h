// 8-float vectors for the CPU kernels: GCC vector extensions, AVX2 with -march=native (SSE pairs
// otherwise). Loads and stores are unaligned.
#pragma once

#include <cstdint>

namespace pdmesh {

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));  // an unaligned load or store
typedef float v4 __attribute__((vector_size(16)));
typedef int32_t v8i __attribute__((vector_size(32)));

inline v8 load8(const float* p) { return *reinterpret_cast<const v8u*>(p); }
inline void store8(float* p, v8 v) { *reinterpret_cast<v8u*>(p) = v; }
inline v8 splat(float x) { return v8{x, x, x, x, x, x, x, x}; }

// a * b + c, rounded once where the CPU has FMA (AVX2 machines), and the same way at every call:
// the compiler's own contraction may fuse one instance of a * b + c and not another.
inline v8 fma8(v8 a, v8 b, v8 c) {
#if defined(__FMA__) && defined(__AVX__)
  return __builtin_ia32_vfmaddps256(a, b, c);
#else
  v8 product = a * b;
  return product + c;
#endif
}

inline float hsum(v8 v) {
  v4 a = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  a += __builtin_shufflevector(a, a, 2, 3, 0, 1);
  a += __builtin_shufflevector(a, a, 1, 0, 3, 2);
  return a[0];
}

}  // namespace pdmesh
