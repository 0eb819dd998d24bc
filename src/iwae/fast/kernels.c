/* The Bernoulli log-likelihood summed over a row, sum_j x_j l_j - softplus(l_j) with logits l = pre + bias,
 * and its gradient; tanh in place.
 *
 * pre is a row-major [rows, cols] float32 matrix (the decoder's output matmul without its bias), bias
 * is [cols], x is [x_rows, cols] and row i of pre goes with row i % x_rows of x (the k samples of an
 * example share its x). softplus(l) = max(l, 0) + log1p(exp(-|l|)), with exp and log1p as short polynomials that
 * the compiler vectorises (no calls into libm): exp has a relative error of about 1e-7 and log1p one
 * below 2e-7 on the range used, so each term is within a few float32 ulps of the exact value, and the
 * sum over a row is accumulated in double. Rows are shared among OpenMP threads when there are at least
 * parallel_min_elements entries; built with -fopenmp inside a PyTorch process, the library binds to the
 * libgomp that PyTorch has loaded, so it uses PyTorch's threads (and torch.set_num_threads). Built and
 * loaded by iwae/fast/native.py (through ctypes), and included by step.cpp (iwae/fast/step.py).
 */
#include <stdint.h>
#include <string.h>

/* Subnormal floats (below 1.2e-38) take slow microcode paths on many x86 CPUs; gradients that small come
 * from tiny importance weights. The kernels flush them to zero on x86 (MXCSR FTZ and DAZ, restored after). */
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#define FLUSH_SUBNORMALS_BEGIN unsigned int saved_csr = _mm_getcsr(); _mm_setcsr(saved_csr | 0x8040u);
#define FLUSH_SUBNORMALS_END _mm_setcsr(saved_csr);
#else
#define FLUSH_SUBNORMALS_BEGIN
#define FLUSH_SUBNORMALS_END
#endif

/* exp(x) for x <= 0: Cody-Waite reduction x = n ln2 + r and Cephes' degree-6 minimax polynomial for exp(r).
 * x below -87.3 is taken as -87.3, so 2^n stays a normal float; the result, about 1e-38 there (or 0 once
 * flushed), is 0 to any float32 sum. */
static inline float exp_nonpositive(float x) {
    const float log2e = 1.44269504088896341f, ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
    const float round_magic = 12582912.0f; /* 1.5 * 2^23: adding and subtracting it rounds to an integer */
    x = x < -87.3f ? -87.3f : x;
    float n = (x * log2e + round_magic) - round_magic;
    float r = x - n * ln2_hi - n * ln2_lo; /* |r| <= ln2 / 2 */
    float p = 1.98756915e-4f;
    p = p * r + 1.39819994e-3f;
    p = p * r + 8.33345205e-3f;
    p = p * r + 4.16657962e-2f;
    p = p * r + 1.66666657e-1f;
    p = p * r + 5.00000000e-1f;
    p = p * r * r + r + 1.0f;
    uint32_t bits = (uint32_t)((int32_t)n + 127) << 23; /* 2^n, n in [-126, 0] */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* log(1 + u) for 0 <= u <= 1, as u * P(u): P interpolates log1p(u) / u at the 10 Chebyshev points of [0, 1]
 * (numpy.polynomial.Chebyshev.interpolate, converted to powers of u); relative error below 2e-7. */
static inline float log1p_unit(float u) {
    float p = -0.0031760570127516985f;
    p = p * u + 0.019542528316378593f;
    p = p * u - 0.05637361481785774f;
    p = p * u + 0.10543623566627502f;
    p = p * u - 0.1526966691017151f;
    p = p * u + 0.1966327428817749f;
    p = p * u - 0.24951615929603577f;
    p = p * u + 0.33329710364341736f;
    p = p * u - 0.49999892711639404f;
    p = p * u + 1.0f;
    return p * u;
}

static inline float absolute(float x) { return x < 0.0f ? -x : x; }

/* out[i] = sum_j x[i % x_rows, j] * l_ij - softplus(l_ij), l_ij = pre[i, j] + bias[j] */
void iwae_bernoulli_log_prob_rows(const float *pre, const float *bias, const float *x, float *out, int64_t rows,
                                  int64_t cols, int64_t x_rows, int64_t parallel_min_elements) {
#pragma omp parallel if (rows * cols >= parallel_min_elements)
    {
        FLUSH_SUBNORMALS_BEGIN
#pragma omp for schedule(static)
        for (int64_t i = 0; i < rows; i++) {
            const float *row = pre + i * cols;
            const float *x_row = x + (i % x_rows) * cols;
            double total = 0.0;
#pragma omp simd reduction(+ : total)
            for (int64_t j = 0; j < cols; j++) {
                float logit = row[j] + bias[j];
                float positive_part = logit > 0.0f ? logit : 0.0f;
                total += x_row[j] * logit - (positive_part + log1p_unit(exp_nonpositive(-absolute(logit))));
            }
            out[i] = (float)total;
        }
        FLUSH_SUBNORMALS_END
    }
}

/* grad_pre[i, j] = grad_out[i] * (x[i % x_rows, j] - sigmoid(pre[i, j] + bias[j])) */
void iwae_bernoulli_log_prob_rows_backward(const float *pre, const float *bias, const float *x, const float *grad_out,
                                           float *grad_pre, int64_t rows, int64_t cols, int64_t x_rows,
                                           int64_t parallel_min_elements) {
#pragma omp parallel if (rows * cols >= parallel_min_elements)
    {
        FLUSH_SUBNORMALS_BEGIN
#pragma omp for schedule(static)
        for (int64_t i = 0; i < rows; i++) {
            const float *row = pre + i * cols;
            const float *x_row = x + (i % x_rows) * cols;
            float *grad_row = grad_pre + i * cols;
            const float g = grad_out[i];
#pragma omp simd
            for (int64_t j = 0; j < cols; j++) {
                float logit = row[j] + bias[j];
                float e = exp_nonpositive(-absolute(logit)); /* sigmoid(l) = (l >= 0 ? 1 : e) / (1 + e) */
                float sigmoid = (logit >= 0.0f ? 1.0f : e) / (1.0f + e);
                grad_row[j] = g * (x_row[j] - sigmoid);
            }
        }
        FLUSH_SUBNORMALS_END
    }
}

/* tanh(x) for float32 to about 1.2 ulp: x + x^3 P(x^2) for |x| < 0.625 (Cephes' tanhf polynomial), else
 * sign(x) (1 - e) / (1 + e) with e = exp(-2|x|) <= 0.29, so that neither branch cancels. */
static inline float tanh_float(float x) {
    float magnitude = absolute(x);
    float z = x * x;
    float p = -5.70498872745e-3f;
    p = p * z + 2.06390887954e-2f;
    p = p * z - 5.37397155531e-2f;
    p = p * z + 1.33314422036e-1f;
    p = p * z - 3.33332819422e-1f;
    float small = p * z * x + x;
    float e = exp_nonpositive(-2.0f * magnitude);
    float large = (1.0f - e) / (1.0f + e);
    large = x < 0.0f ? -large : large;
    return magnitude < 0.625f ? small : large;
}

/* data[i] = tanh(data[i]); PyTorch's tanh costs several times more on some CPUs (3.5 ns an element on this
 * project's AMD CPU). The if clause names the parallel construct alone: unnamed, it would also turn simd off. */
void iwae_tanh_(float *data, int64_t n, int64_t parallel_min_elements) {
#pragma omp parallel for simd schedule(static) if (parallel : n >= parallel_min_elements)
    for (int64_t i = 0; i < n; i++) {
        data[i] = tanh_float(data[i]);
    }
}
