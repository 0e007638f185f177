/* kvlib's few-row matrix kernel (kvlib/models/matvec.py builds and loads it).
 *
 * y[k, o] = sum_i w[o, i] x[k, i] (+ b[o]) for a few input rows k (a decode step's batch), w (out, in)
 * row-major: a decode step's matrix work, which is a read of every weight once. Each thread walks one contiguous
 * block of weight rows, so that the weights stream through the CPU in address order; the inner dot product is vectorised by the compiler for this CPU
 * (-O3 -march=native, an OpenMP simd reduction: the order of the additions is the vector lanes', as in any
 * vectorised kernel). bfloat16 weights and input are widened to float32 (a 16-bit shift), accumulated in float32,
 * and the result rounded to bfloat16 (to nearest, ties to even: PyTorch's rounding).
 */
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static inline float bf16_to_f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN stays a quiet NaN */
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

/* rows [lo, hi) of thread t of nt: equal contiguous blocks */
static inline void block(int64_t out, int64_t *lo, int64_t *hi) {
  int64_t nt = 1, t = 0;
#ifdef _OPENMP
  nt = omp_get_num_threads();
  t = omp_get_thread_num();
#endif
  int64_t per = (out + nt - 1) / nt;
  *lo = t * per < out ? t * per : out;
  *hi = *lo + per < out ? *lo + per : out;
}

/* y (rows, out) = x (rows, in) @ w (out, in)^T (+ b): each weight row is read from memory once and multiplied
   by every input row while it sits in the L1 cache (a few rows: a decode step's batch) */
void kvlib_linear_f32(const float *w, const float *x, const float *b, float *y, int64_t out, int64_t in, int64_t rows,
                      int threads) {
#pragma omp parallel num_threads(threads)
  {
    int64_t lo, hi;
    block(out, &lo, &hi);
    for (int64_t o = lo; o < hi; o++) {
      const float *r = w + o * in;
      for (int64_t k = 0; k < rows; k++) {
        const float *xk = x + k * in;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t i = 0; i < in; i++) acc += r[i] * xk[i];
        y[k * out + o] = b ? acc + b[o] : acc;
      }
    }
  }
}

/* xf: float32 scratch of rows x in values for the widened input */
void kvlib_linear_bf16(const uint16_t *w, const uint16_t *x, const uint16_t *b, uint16_t *y, int64_t out, int64_t in,
                       int64_t rows, int threads, float *xf) {
  for (int64_t i = 0; i < rows * in; i++) xf[i] = bf16_to_f32(x[i]);
#pragma omp parallel num_threads(threads)
  {
    int64_t lo, hi;
    block(out, &lo, &hi);
    for (int64_t o = lo; o < hi; o++) {
      const uint16_t *r = w + o * in;
      for (int64_t k = 0; k < rows; k++) {
        const float *xk = xf + k * in;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t i = 0; i < in; i++) acc += bf16_to_f32(r[i]) * xk[i];
        if (b) acc += bf16_to_f32(b[o]);
        y[k * out + o] = f32_to_bf16(acc);
      }
    }
  }
}
