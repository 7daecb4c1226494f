// KernelNorm's own work on the CPU, fused into two loops: the unit statistics plus the
// standardization of the convolution's output (forward), and the statistics' backward.
// fedkn/nn/kn_cpu.py compiles this file with the system C++ compiler and calls it through ctypes;
// it knows nothing of torch. Tensors are contiguous NCHW arrays of T (float or double);
// sums over channels and windows accumulate in double, per-position sums over outputs in T. The maths is that of kn_conv2d_reference in kernelnorm.py:
//
//   mean, msq = window averages (zeros of the padding counted) of the channel means of x_d and x_d^2,
//   x_d = x with the dropped elements zeroed, rescaled by `scale` = 1 / (1 - p);
//   var = max(msq - mean^2, 0); rstd = 1 / sqrt(var + eps);
//   out[o] = (conv[o] - mean * wsum[o]) * rstd + b[o].
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

struct Geometry {
  int64_t n, c, h, w;     // input
  int64_t o, ho, wo;      // output
  int64_t kh, kw, sh, sw; // window and stride
  int64_t pt, pl;         // top and left zero padding (bottom/right follow from ho, wo)
};

// Channel sums of x_d and x_d^2 at every position of sample `sample` (before the rescale). Dropped
// elements are multiplied by 0 (not subtracted afterwards, which would leave rounding residue in
// empty units): `keep` is a C*H*W scratch of ones. `drops` holds increasing flat indices into the
// whole batch; `*next` is the first one not yet used.
template <typename T>
void channel_sums(const T* x, const Geometry& g, int64_t sample, const int64_t* drops, int64_t n_drops,
                  int64_t* next, T* keep, double* s1, double* s2) {
  const int64_t plane = g.h * g.w, size = g.c * plane, base = sample * size;
  const int64_t first = *next;
  for (; *next < n_drops && drops[*next] < base + size; ++*next) keep[drops[*next] - base] = T(0);
  for (int64_t p = 0; p < plane; ++p) s1[p] = s2[p] = 0.0;
  for (int64_t c = 0; c < g.c; ++c) {
    const T* xc = x + base + c * plane;
    const T* kc = keep + c * plane;
    for (int64_t p = 0; p < plane; ++p) {
      const double v = double(xc[p]) * double(kc[p]);
      s1[p] += v;
      s2[p] += v * v;
    }
  }
  for (int64_t d = first; d < *next; ++d) keep[drops[d] - base] = T(1);
}

// The in-range part [lo, hi) of a window of `k` taps starting at `start` over [0, size).
inline void clip(int64_t start, int64_t k, int64_t size, int64_t* lo, int64_t* hi) {
  *lo = start < 0 ? -start : 0;
  *hi = start + k > size ? size - start : k;
}

// Sums of `in` (H x W) over every window (zeros outside), out (Ho x Wo); `rows` is H x Wo scratch.
// Separable: along rows, then along columns.
void window_sums(const double* in, const Geometry& g, double* rows, double* out) {
  for (int64_t h = 0; h < g.h; ++h) {
    for (int64_t j = 0; j < g.wo; ++j) {
      const int64_t w0 = j * g.sw - g.pl;
      int64_t lo, hi;
      clip(w0, g.kw, g.w, &lo, &hi);
      double acc = 0.0;
      for (int64_t t = lo; t < hi; ++t) acc += in[h * g.w + w0 + t];
      rows[h * g.wo + j] = acc;
    }
  }
  for (int64_t i = 0; i < g.ho; ++i) {
    double* o = out + i * g.wo;
    for (int64_t j = 0; j < g.wo; ++j) o[j] = 0.0;
    const int64_t h0 = i * g.sh - g.pt;
    int64_t lo, hi;
    clip(h0, g.kh, g.h, &lo, &hi);
    for (int64_t t = lo; t < hi; ++t) {
      const double* r = rows + (h0 + t) * g.wo;
      for (int64_t j = 0; j < g.wo; ++j) o[j] += r[j];
    }
  }
}

// The transpose of window_sums: adds every window's value of `in` (Ho x Wo) to its in-range
// positions of `out` (H x W, overwritten); `rows` is H x Wo scratch.
void window_scatter(const double* in, const Geometry& g, double* rows, double* out) {
  for (int64_t q = 0; q < g.h * g.wo; ++q) rows[q] = 0.0;
  for (int64_t i = 0; i < g.ho; ++i) {
    const int64_t h0 = i * g.sh - g.pt;
    int64_t lo, hi;
    clip(h0, g.kh, g.h, &lo, &hi);
    for (int64_t t = lo; t < hi; ++t) {
      double* r = rows + (h0 + t) * g.wo;
      for (int64_t j = 0; j < g.wo; ++j) r[j] += in[i * g.wo + j];
    }
  }
  for (int64_t p = 0; p < g.h * g.w; ++p) out[p] = 0.0;
  for (int64_t h = 0; h < g.h; ++h) {
    for (int64_t j = 0; j < g.wo; ++j) {
      const int64_t w0 = j * g.sw - g.pl;
      int64_t lo, hi;
      clip(w0, g.kw, g.w, &lo, &hi);
      const double v = rows[h * g.wo + j];
      for (int64_t t = lo; t < hi; ++t) out[h * g.w + w0 + t] += v;
    }
  }
}

template <typename T>
void forward(const T* x, Geometry g, const int64_t* drops, int64_t n_drops, double scale, double eps,
             const T* wsum, const T* bias, T* out, T* mean, T* rstd, uint8_t* negative) {
  const int64_t plane = g.h * g.w, positions = g.ho * g.wo;
  const double inv = 1.0 / double(g.c * g.kh * g.kw);
  std::vector<double> s1(plane), s2(plane), rows(g.h * g.wo), m1(positions), m2(positions);
  std::vector<T> keep(g.c * plane, T(1));
  int64_t next = 0;
  for (int64_t n = 0; n < g.n; ++n) {
    channel_sums(x, g, n, drops, n_drops, &next, keep.data(), s1.data(), s2.data());
    window_sums(s1.data(), g, rows.data(), m1.data());
    window_sums(s2.data(), g, rows.data(), m2.data());
    T* m = mean + n * positions;
    T* r = rstd + n * positions;
    uint8_t* neg = negative + n * positions;
    for (int64_t q = 0; q < positions; ++q) {
      const double mu = m1[q] * inv * scale, var = m2[q] * inv * scale * scale - mu * mu;
      m[q] = T(mu);
      neg[q] = var < 0.0;
      r[q] = T(1.0 / std::sqrt((var < 0.0 ? 0.0 : var) + eps));
    }
    for (int64_t o = 0; o < g.o; ++o) {
      T* y = out + (n * g.o + o) * positions;
      const T ws = wsum[o], b = bias ? bias[o] : T(0);
      for (int64_t q = 0; q < positions; ++q) y[q] = (y[q] - m[q] * ws) * r[q] + b;
    }
  }
}

// grad_out g -> g_hat = g * rstd (the convolution's output gradient), the gradients of wsum and
// bias (summed over the batch) and, when grad_x is given, the statistics' share of x's gradient.
template <typename T>
void backward(const T* x, Geometry g, const int64_t* drops, int64_t n_drops, double scale, const T* wsum,
              const T* bias, const T* out, const T* mean, const T* rstd, const uint8_t* negative, const T* grad,
              T* g_hat, T* grad_wsum, T* grad_bias, T* grad_x) {
  const int64_t plane = g.h * g.w, positions = g.ho * g.wo;
  const double inv = 1.0 / double(g.c * g.kh * g.kw);
  std::vector<T> dot_out(positions), dot_w(positions);
  std::vector<double> a(positions), b(positions), rows(g.h * g.wo), u1(plane), u2(plane), gws(g.o, 0.0), gb(g.o, 0.0);
  int64_t next = 0;
  for (int64_t n = 0; n < g.n; ++n) {
    const T* m = mean + n * positions;
    const T* r = rstd + n * positions;
    for (int64_t q = 0; q < positions; ++q) dot_out[q] = dot_w[q] = T(0);
    for (int64_t o = 0; o < g.o; ++o) {
      const int64_t off = (n * g.o + o) * positions;
      const T b = bias ? bias[o] : T(0), ws = wsum[o];
      const T* go = grad + off;
      const T* y = out + off;
      T* gh = g_hat + off;
      T s_mean = 0, s_grad = 0;
      for (int64_t q = 0; q < positions; ++q) {
        const T gv = go[q], scaled = gv * r[q];
        gh[q] = scaled;
        dot_out[q] += gv * (y[q] - b);  // sum_o g * (out - b)
        dot_w[q] += gv * ws;            // sum_o g * wsum
        s_mean += scaled * m[q];
        s_grad += gv;
      }
      gws[o] -= s_mean;  // d out / d wsum[o] = -mean * rstd
      gb[o] += s_grad;
    }
    if (!grad_x) continue;
    // d out / d var = -(out - b) * rstd^2 / 2 where var >= 0 (the clamp passes nothing below 0);
    // d out / d mean = -wsum * rstd, plus var's -2 * mean. Then unpool both through the windows.
    for (int64_t q = 0; q < positions; ++q) {
      const double rq = r[q];
      const double g_var = negative[n * positions + q] ? 0.0 : -0.5 * double(dot_out[q]) * rq * rq;
      const double g_mean = -(double(dot_w[q]) * rq + 2.0 * double(m[q]) * g_var);
      a[q] = g_mean * scale * inv;            // d L / d s1 of every position of the window
      b[q] = 2.0 * g_var * scale * scale * inv;  // d L / d s2, times the 2 of d x^2 / d x
    }
    window_scatter(a.data(), g, rows.data(), u1.data());
    window_scatter(b.data(), g, rows.data(), u2.data());
    const int64_t base = n * g.c * plane;
    for (int64_t c = 0; c < g.c; ++c) {
      const T* xc = x + base + c * plane;
      T* gx = grad_x + base + c * plane;
      for (int64_t p = 0; p < plane; ++p) gx[p] = T(u1[p] + double(xc[p]) * u2[p]);
    }
    for (; next < n_drops && drops[next] < base + g.c * plane; ++next) grad_x[drops[next]] = T(0);  // feeds no statistic
  }
  for (int64_t o = 0; o < g.o; ++o) {
    grad_wsum[o] = T(gws[o]);
    if (grad_bias) grad_bias[o] = T(gb[o]);
  }
}

}  // namespace

#define FEDKN_KN_EXPORTS(T, SUFFIX)                                                                          \
  extern "C" void kn_forward_##SUFFIX(const T* x, const int64_t* geometry, const int64_t* drops,           \
                                       int64_t n_drops, double scale, double eps, const T* wsum,          \
                                       const T* bias, T* out, T* mean, T* rstd, uint8_t* negative) {      \
    const int64_t* q = geometry;                                                                           \
    forward<T>(x, Geometry{q[0], q[1], q[2], q[3], q[4], q[5], q[6], q[7], q[8], q[9], q[10], q[11], q[12]}, \
               drops, n_drops, scale, eps, wsum, bias, out, mean, rstd, negative);                         \
  }                                                                                                        \
  extern "C" void kn_backward_##SUFFIX(const T* x, const int64_t* geometry, const int64_t* drops,          \
                                        int64_t n_drops, double scale, const T* wsum, const T* bias,      \
                                        const T* out, const T* mean, const T* rstd,                       \
                                        const uint8_t* negative, const T* grad, T* g_hat, T* grad_wsum,   \
                                        T* grad_bias, T* grad_x) {                                        \
    const int64_t* q = geometry;                                                                           \
    backward<T>(x, Geometry{q[0], q[1], q[2], q[3], q[4], q[5], q[6], q[7], q[8], q[9], q[10], q[11], q[12]}, \
                drops, n_drops, scale, wsum, bias, out, mean, rstd, negative, grad, g_hat, grad_wsum,     \
                grad_bias, grad_x);                                                                        \
  }

FEDKN_KN_EXPORTS(float, f32)
FEDKN_KN_EXPORTS(double, f64)
