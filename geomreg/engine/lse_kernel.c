/* Block-sparse log-sum-exp reductions and screening for the multiscale backend
 * (p = 2, float32, CPU; the reductions in float64 too, compiled a second time with
 * -DGEOMREG_DOUBLE).
 *
 * Compiled once per machine by geomreg/engine/native.py and called through ctypes: every
 * caller thread runs the same function, taking tiles from a shared counter. Points are 3-D
 * (smaller dimensions are padded with zeros).
 *
 * A tile is the range of rows r0[t]..r1[t]-1 of the sorted points p, against the columns of
 * the sorted points q in its runs: lo[k]..hi[k]-1 for k in ptr[t]..ptr[t+1]-1 (every column
 * when lo is NULL). Kept columns come in runs because the points are sorted along a Morton
 * curve: storing runs takes a fraction of the memory of the indices, and a run is read
 * straight from memory. With the cost |p - q|^2 / 2 and log-weights h,
 *   rows_lse writes, for each row i, log sum_j exp(h_j - |p_i - q_j|^2 / (2 eps)) over its
 *     tile's columns;
 *   cols_lse reduces the other way: the log-weights hp belong to the tile's rows, and for
 *     each kept column j it merges log sum_i exp(hp_i - |p_i - q_j|^2 / (2 eps)) into the
 *     worker's running reference and sum (amax[j], asum[j]: the log-sum-exp so far is
 *     amax[j] + log asum[j]); the caller merges the workers.
 *     Worker w of W takes the tiles t with (t + t_offset) % W == w, in increasing order, so
 *     that the sums do not depend on timing, nor on how the tiles were cut into calls.
 *
 * Both expand |p - q|^2 around the tile's centroid o, so that the rounding scales with the
 * tile's neighbourhood, not with the cloud: with u = p - o and v = q - o,
 *     z_ij = (h_j - |v_j|^2 / (2 eps)) + <u_i, v_j> / eps - |u_i|^2 / (2 eps).
 * exp is a polynomial (Cephes' range reduction and coefficients, relative error below 2e-7)
 * that the compiler vectorizes; sums of up to CHUNK terms run in float, chunks add up in
 * double.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* The working type: float, or double when compiled with -DGEOMREG_DOUBLE (the log-sum-exp
 * reductions only; the screening and the grid's banded reduction are float32 code). */
#ifdef GEOMREG_DOUBLE
typedef double real;
#define SQRT sqrt
#else
typedef float real;
#define SQRT sqrtf
#endif

#define CHUNK 512
/* largest gap between a row's shift and its maximum for the one-pass sum (see ROW_LSE) */
#define MAX_SLACK ((real)60.0)

#ifdef GEOMREG_DOUBLE
static inline double exp_neg(double x) {
    /* exp(x) for x <= 0 in double: x = n ln 2 + r (|r| <= ln 2 / 2, ln 2 split in two parts
     * so that r is exact), then the Taylor polynomial of degree 13 (truncation below 1e-17
     * relative) by Horner's rule, which the compiler vectorizes; below -708 it returns about
     * 3e-308, never a denormal. Above 0 it returns 1, as the float version does. */
    x = x < -708.0 ? -708.0 : x;
    x = x > 0.0 ? 0.0 : x;
    double n = __builtin_floor(x * 1.4426950408889634 + 0.5);
    double r = (x - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10;
    double p = 1.0 / 6227020800.0;
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    int64_t bits = ((int64_t)n + 1023) << 52;
    double scale;
    __builtin_memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}
#else
static inline float exp_neg(float x) {
    /* exp(x) for x <= 0; below -87 it returns about 1.6e-38 instead of a denormal. Above 0
     * (the second pass recomputing a term a rounding above the first pass's maximum) it
     * returns 1: nothing ever overflows. */
    x = x < -87.0f ? -87.0f : x;
    x = x > 0.0f ? 0.0f : x;
    float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    __builtin_memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}
#endif

/* log sum_j exp(a_j + <u_k, (v0_j, v1_j, v2_j)>) over m columns, for R rows u_k at once
 * (sharing the loads of the columns). With bound == NULL, two passes: the maximum, then the
 * sum of exponentials shifted by it. Otherwise bound[k] is an upper bound of row k's
 * maximum that exceeds it by at most MAX_SLACK: one pass, the sum shifted by the bound (its
 * largest term is then at least e^-MAX_SLACK, far from float32's underflow). With M = 1
 * the same pass also writes each row's mean of the columns v under those weights,
 * mom[3k..3k+2] = sum_j e_kj v_j / sum_j e_kj (M is a constant: the M = 0 functions carry
 * no trace of it). */
#define ROW_LSE(R, M, NAME)                                                                     \
    static void NAME(const real *a, const real *v0, const real *v1, const real *v2,          \
                     int64_t m, const real *u, const real *bound, double *out, double *mom) { \
        real top[R], s[R], s0[R], s1[R], s2[R];                                                \
        double total[R], t0[R], t1[R], t2[R];                                                   \
        for (int k = 0; k < R; k++)                                                             \
            top[k] = bound ? bound[k] : -INFINITY, total[k] = t0[k] = t1[k] = t2[k] = 0.0;     \
        if (!bound)                                                                             \
            for (int64_t j = 0; j < m; j++)                                                     \
                for (int k = 0; k < R; k++) {                                                   \
                    real z = a[j] + u[3 * k] * v0[j] + u[3 * k + 1] * v1[j] + u[3 * k + 2] * v2[j]; \
                    top[k] = z > top[k] ? z : top[k];                                           \
                }                                                                               \
        for (int64_t c = 0; c < m; c += CHUNK) {                                                \
            int64_t end = c + CHUNK < m ? c + CHUNK : m;                                        \
            for (int k = 0; k < R; k++) s[k] = s0[k] = s1[k] = s2[k] = ((real)0.0);                    \
            for (int64_t j = c; j < end; j++)                                                   \
                for (int k = 0; k < R; k++) {                                                   \
                    real e = exp_neg(a[j] + u[3 * k] * v0[j] + u[3 * k + 1] * v1[j] +          \
                                      u[3 * k + 2] * v2[j] - top[k]);                           \
                    s[k] += e;                                                                  \
                    if (M) s0[k] += e * v0[j], s1[k] += e * v1[j], s2[k] += e * v2[j];          \
                }                                                                               \
            for (int k = 0; k < R; k++) {                                                       \
                total[k] += s[k];                                                               \
                if (M) t0[k] += s0[k], t1[k] += s1[k], t2[k] += s2[k];                          \
            }                                                                                   \
        }                                                                                       \
        for (int k = 0; k < R; k++) {                                                           \
            out[k] = (double)top[k] + log(total[k]);                                            \
            if (M) mom[3 * k] = t0[k] / total[k], mom[3 * k + 1] = t1[k] / total[k],            \
                   mom[3 * k + 2] = t2[k] / total[k];                                           \
        }                                                                                       \
    }
ROW_LSE(1, 0, row_lse1)
ROW_LSE(4, 0, row_lse4)
ROW_LSE(1, 1, row_mean1)

/* Centroid of rows r0..r1-1 of p (N x 3). */
static void centroid(const real *p, int64_t r0, int64_t r1, real o[3]) {
    double s[3] = {0.0, 0.0, 0.0};
    for (int64_t i = r0; i < r1; i++)
        for (int d = 0; d < 3; d++) s[d] += p[3 * i + d];
    for (int d = 0; d < 3; d++) o[d] = (real)(s[d] / (double)(r1 - r0 > 0 ? r1 - r0 : 1));
}

/* Number of columns of tile t. */
static int64_t n_columns(const int64_t *ptr, const int32_t *lo, const int32_t *hi, int64_t t, int64_t m_all) {
    if (!lo) return m_all;
    int64_t m = 0;
    for (int64_t k = ptr[t]; k < ptr[t + 1]; k++) m += hi[k] - lo[k];
    return m;
}

/* Points of one tile's runs (or of first..first+m-1 when lo is NULL), centred on o, in
 * structure-of-arrays form: v0, v1, v2 = (q - o) / eps and a = h - |q - o|^2 / (2 eps);
 * stats = (max a, max |v|), for the bounds of points_lse. */
static void gather(const real *q, const real *h, const int64_t *ptr, const int32_t *lo, const int32_t *hi,
                   int64_t t, int64_t first, int64_t m, const real o[3], real inv_eps, real *a, real *v0,
                   real *v1, real *v2, real stats[2]) {
    int64_t k = 0, n_runs = lo ? ptr[t + 1] - ptr[t] : 1;
    real top = -INFINITY, far = ((real)0.0);
    for (int64_t r = 0; r < n_runs; r++) {
        int64_t j0 = lo ? lo[ptr[t] + r] : first, j1 = lo ? hi[ptr[t] + r] : first + m;
        for (int64_t j = j0; j < j1; j++, k++) {
            real w0 = q[3 * j] - o[0], w1 = q[3 * j + 1] - o[1], w2 = q[3 * j + 2] - o[2];
            real ww = w0 * w0 + w1 * w1 + w2 * w2;
            v0[k] = w0 * inv_eps;
            v1[k] = w1 * inv_eps;
            v2[k] = w2 * inv_eps;
            a[k] = h[j] - ((real)0.5) * ww * inv_eps;
            top = a[k] > top ? a[k] : top;
            far = ww > far ? ww : far;
        }
    }
    stats[0] = top, stats[1] = SQRT(far) * inv_eps;
}

/* A worker's buffer of at least 4 * m values (real); NULL when out of memory. */
static real *reserve(real **buf, int64_t *cap, int64_t m) {
    if (m < 1) m = 1;
    if (m > *cap) {
        free(*buf);
        *cap = m;
        *buf = (real *)malloc(4 * (size_t)m * sizeof(real));
    }
    return *buf;
}

/* For R (1 or 4) consecutive points pts (R x 3), log sum_j exp(a_j + <pts - o, v_j>) -
 * |pts - o|^2 / (2 eps) over the m columns (a, v0, v1, v2, stats) of gather. Row k's
 * maximum lies within |u_k| max|v| of max a (Cauchy-Schwarz, u_k = pts_k - o): when that
 * gap is small, max a + |u_k| max|v| serves as the shift and one pass suffices. With mean
 * != NULL, mean (R x 3) also gets each row's barycentre of the columns' points,
 * o + eps * (its mean of v), under the same weights. */
static void points_lse(const real *a, const real *v0, const real *v1, const real *v2, int64_t m,
                       const real stats[2], const real *pts, int R, const real o[3], real inv_eps,
                       real *out, real *mean) {
    real u[12], bound[4];
    double lse[4] = {0.0, 0.0, 0.0, 0.0}, mom[12];
    int one_pass = stats[0] > -INFINITY;
    for (int k = 0; k < R; k++) {
        for (int d = 0; d < 3; d++) u[3 * k + d] = pts[3 * k + d] - o[d];
        const real *w = u + 3 * k;
        real reach = SQRT(w[0] * w[0] + w[1] * w[1] + w[2] * w[2]) * stats[1];
        bound[k] = stats[0] + reach;
        one_pass = one_pass && ((real)2.0) * reach <= MAX_SLACK && bound[k] < INFINITY;
    }
    const real *shift = one_pass ? bound : NULL;
    if (mean)
        row_mean1(a, v0, v1, v2, m, u, shift, lse, mom);  /* R = 1 (rows_lse) */
    else
        (R == 4 ? row_lse4 : row_lse1)(a, v0, v1, v2, m, u, shift, lse, NULL);
    for (int k = 0; k < R; k++) {
        const real *w = u + 3 * k;
        out[k] = (real)(lse[k] - 0.5 * (double)(w[0] * w[0] + w[1] * w[1] + w[2] * w[2]) * inv_eps);
        if (mean)
            for (int d = 0; d < 3; d++) mean[3 * k + d] = (real)(o[d] + mom[3 * k + d] / inv_eps);
    }
}

/* Per tile: log-sum-exp over its columns for each of its rows (out: one value per row of p);
 * with mean != NULL (N x 3), each row's barycentre of the columns' points q as well, under
 * the weights exp(h_j - |p_i - q_j|^2 / (2 eps)) (NaN for a row without columns). */
int rows_lse(const real *p, const real *q, const real *h, const int64_t *r0, const int64_t *r1,
             int64_t n_tiles, const int64_t *ptr, const int32_t *lo, const int32_t *hi, int64_t m_all,
             real eps, real *out, real *mean, int64_t *counter) {
    real inv_eps = ((real)1.0) / eps;
    int64_t cap = 0;
    real *buf = NULL;
    for (;;) {
        int64_t t = __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED);
        if (t >= n_tiles) break;
        int64_t m = n_columns(ptr, lo, hi, t, m_all);
        if (!reserve(&buf, &cap, m)) return -1;
        real o[3];
        centroid(p, r0[t], r1[t], o);
        real *a = buf, *v0 = buf + cap, *v1 = buf + 2 * cap, *v2 = buf + 3 * cap, stats[2];
        gather(q, h, ptr, lo, hi, t, 0, m, o, inv_eps, a, v0, v1, v2, stats);
        if (m == 0) {
            for (int64_t i = r0[t]; i < r1[t]; i++) {
                out[i] = -INFINITY;
                if (mean) mean[3 * i] = mean[3 * i + 1] = mean[3 * i + 2] = NAN;
            }
            continue;
        }
        for (int64_t i = r0[t], R; i < r1[t]; i += R) {  /* with means, one row at a time: fewer
                                                                 accumulators (bunny: 15 ms, 18 with 4) */
            R = r1[t] - i >= 4 && !mean ? 4 : 1;
            real lse[4];
            points_lse(a, v0, v1, v2, m, stats, p + 3 * i, R, o, inv_eps, lse, mean ? mean + 3 * i : NULL);
            for (int k = 0; k < R; k++) out[i + k] = lse[k];
        }
    }
    free(buf);
    return 0;
}

/* A worker's column buffers for cols_lse: w0, w1, w2, shift, sum (real) and the
 * columns' indices, for at least m columns; -1 when out of memory. */
typedef struct {
    real *f;
    int64_t *idx, cap;
} ColumnBuffer;

static int reserve_columns(ColumnBuffer *b, int64_t m) {
    if (m < 1) m = 1;
    if (m <= b->cap) return 0;
    free(b->f);
    free(b->idx);
    b->cap = m;
    b->f = (real *)malloc(5 * (size_t)m * sizeof(real));
    b->idx = (int64_t *)malloc((size_t)m * sizeof(int64_t));
    return b->f && b->idx ? 0 : -1;
}

/* Merge one part of column j's log-sum-exp, given as a shift and the sum of exponentials
 * under it, into the worker's running reference amax[j] (the largest shift so far) and
 * sum asum[j]: one exponential in double (float32's would make the sums depend on the
 * order of the merges, hence on the number of threads, at 1e-7), no logarithm. */
static inline void merge_part(real top, double sum, real *amax, double *asum) {
    if (!(sum > 0.0) || !(top > -INFINITY)) return;
    if (top > *amax) {
        *asum = *asum * exp((double)*amax - (double)top) + sum;
        *amax = top;
    } else {
        *asum += sum * exp((double)top - (double)*amax);
    }
}

/* Tile t's kept columns (its runs, or every column when lo is NULL) against its rows (a,
 * v: from gather, with their stats), merged into the worker's amax and asum. The loops run
 * over the columns, which are many, and not over a tile's few rows: the columns are
 * gathered (w = q - o, structure of arrays), each gets a shift (the Cauchy-Schwarz bound
 * max a + |w| max|v| when it is within MAX_SLACK of the maximum for every column, else
 * the maximum itself from a first pass), and each row adds its terms to every column's
 * sum. */
static int tile_columns(const real *a, const real *v0, const real *v1, const real *v2, int64_t rows,
                        const real stats[2], const real *q, const real o[3], real inv_eps,
                        const int64_t *ptr, const int32_t *lo, const int32_t *hi, int64_t t, int64_t m_all,
                        ColumnBuffer *b, real *amax, double *asum) {
    int64_t m = n_columns(ptr, lo, hi, t, m_all);
    if (reserve_columns(b, m)) return -1;
    real *w0 = b->f, *w1 = w0 + b->cap, *w2 = w1 + b->cap, *shift = w2 + b->cap, *sum = shift + b->cap;
    int64_t k = 0, n_runs = lo ? ptr[t + 1] - ptr[t] : 1;
    for (int64_t r = 0; r < n_runs; r++) {
        int64_t j0 = lo ? lo[ptr[t] + r] : 0, j1 = lo ? hi[ptr[t] + r] : m_all;
        for (int64_t j = j0; j < j1; j++, k++) {
            w0[k] = q[3 * j] - o[0], w1[k] = q[3 * j + 1] - o[1], w2[k] = q[3 * j + 2] - o[2];
            b->idx[k] = j;
        }
    }
    int64_t loose = 0;  /* columns whose bound may exceed their maximum by more than MAX_SLACK */
    for (k = 0; k < m; k++) {
        real reach = SQRT(w0[k] * w0[k] + w1[k] * w1[k] + w2[k] * w2[k]) * stats[1];
        shift[k] = stats[0] + reach;
        sum[k] = ((real)0.0);
        if (!(stats[0] > -INFINITY && ((real)2.0) * reach <= MAX_SLACK && shift[k] < INFINITY)) {
            shift[k] = NAN;
            loose++;
        }
    }
    if (4 * loose > m) {  /* those take their maximum instead: many, a pass over all */
        for (k = 0; k < m; k++) shift[k] = -INFINITY;
        for (int64_t i = 0; i < rows; i++)
            for (k = 0; k < m; k++) {
                real z = a[i] + v0[i] * w0[k] + v1[i] * w1[k] + v2[i] * w2[k];
                shift[k] = z > shift[k] ? z : shift[k];
            }
    }
    for (k = 0; loose && 4 * loose <= m && k < m; k++) {  /* few: each on its own */
        if (shift[k] == shift[k]) continue;
        real top = -INFINITY;
        for (int64_t i = 0; i < rows; i++) {
            real z = a[i] + v0[i] * w0[k] + v1[i] * w1[k] + v2[i] * w2[k];
            top = z > top ? z : top;
        }
        shift[k] = top;
    }
    int64_t i = 0;  /* four rows per sweep of the columns; at most TILE_ROWS terms per real sum */
    for (; i + 4 <= rows; i += 4) {
        const real *A = a + i, *X = v0 + i, *Y = v1 + i, *Z = v2 + i;
        for (k = 0; k < m; k++) {
            real c0 = w0[k], c1 = w1[k], c2 = w2[k], sh = shift[k];
            sum[k] += exp_neg(A[0] + X[0] * c0 + Y[0] * c1 + Z[0] * c2 - sh) +
                      exp_neg(A[1] + X[1] * c0 + Y[1] * c1 + Z[1] * c2 - sh) +
                      exp_neg(A[2] + X[2] * c0 + Y[2] * c1 + Z[2] * c2 - sh) +
                      exp_neg(A[3] + X[3] * c0 + Y[3] * c1 + Z[3] * c2 - sh);
        }
    }
    for (; i < rows; i++)
        for (k = 0; k < m; k++) sum[k] += exp_neg(a[i] + v0[i] * w0[k] + v1[i] * w1[k] + v2[i] * w2[k] - shift[k]);
    for (k = 0; k < m; k++) {
        real top = (real)(shift[k] - 0.5 * (double)(w0[k] * w0[k] + w1[k] * w1[k] + w2[k] * w2[k]) * inv_eps);
        merge_part(top, (double)sum[k], amax + b->idx[k], asum + b->idx[k]);
    }
    return 0;
}

/* Per tile: for each kept column j, log sum_i exp(hp_i - |p_i - q_j|^2 / (2 eps)) over the
 * tile's rows i, merged into (amax[j], asum[j]): log sum = amax + log(asum). */
int cols_lse(const real *p, const real *q, const real *hp, const int64_t *r0, const int64_t *r1,
             int64_t n_tiles, const int64_t *ptr, const int32_t *lo, const int32_t *hi, int64_t m_all,
             real eps, real *amax, double *asum, int64_t worker, int64_t n_workers, int64_t t_offset) {
    real inv_eps = ((real)1.0) / eps;
    int64_t cap = 0;
    real *buf = NULL;
    ColumnBuffer cols = {NULL, NULL, 0};
    int status = 0;
    int64_t first = ((worker - t_offset) % n_workers + n_workers) % n_workers;
    for (int64_t t = first; t < n_tiles && status == 0; t += n_workers) {
        int64_t rows = r1[t] - r0[t];
        if (!reserve(&buf, &cap, rows)) {
            status = -1;
            break;
        }
        real o[3];
        centroid(p, r0[t], r1[t], o);
        real *a = buf, *u0 = buf + cap, *u1 = buf + 2 * cap, *u2 = buf + 3 * cap, stats[2];
        gather(p, hp, NULL, NULL, NULL, t, r0[t], rows, o, inv_eps, a, u0, u1, u2, stats);
        status = tile_columns(a, u0, u1, u2, rows, stats, q, o, inv_eps, ptr, lo, hi, t, m_all, &cols, amax, asum);
    }
    free(buf);
    free(cols.f);
    free(cols.idx);
    return status;
}

#ifndef GEOMREG_DOUBLE
/* Screening of a truncated Sinkhorn pair, p = 2 (the quadratic bound of truncate_pair).
 *
 * Row tile t (sorted rows r0[t]..r1[t]-1 of x, potentials f) has the bound statistics
 * centre[t], beta[t], top[t] and radius[t]; its candidate columns are the sorted points of
 * the column cells cells[cell_ptr[t]..cell_ptr[t+1]-1], cell k being col_starts[k]..
 * col_starts[k+1]-1 of the M points y (potentials g), given as ys = (y_0 | y_1 | y_2), one
 * coordinate after the other (so that the bounds vectorize). The bound of column j, with w = y_j - centre, is
 *     top + psi_R(|w + beta|) + g_j - |w|^2 / 2,   psi_R(z) = z^2/2 (z <= R), R z - R^2/2.
 * The tile's floor is `floor`, raised when relative >= 0 to (the least over its rows of the
 * best exact score against the `sample` candidates of highest bound) - relative.
 * A column is kept when its bound reaches the floor; the column of highest bound always is.
 *
 * mode 0 writes, for every tile, tile_floor[t], count[t] (kept columns), runs[t] (runs of
 * consecutive kept columns) and best[t] (the column of highest bound); mode 1 writes tile
 * t's runs, in increasing order, to lo/hi[ptr[t - t_begin]...], reading tile_floor and
 * best. Tiles are taken from *counter up to t_end. Returns -1 when out of memory. */
/* The bounds of the columns j0..j1-1 (y in structure-of-arrays form, M columns) for the
 * tile of statistics c, b, top and radius, written to out[0..j1-j0-1]: vectorized. */
static void bounds_of(const float *ys, const float *g, int64_t M, int64_t j0, int64_t j1, const float *c,
                      const float *b, float top, float radius, float *out) {
    const float *y0 = ys + j0, *y1 = ys + M + j0, *y2 = ys + 2 * M + j0, *gj = g + j0;
    float rr = radius * radius, half_rr = 0.5f * rr;
    for (int64_t k = 0; k < j1 - j0; k++) {
        float w0 = y0[k] - c[0], w1 = y1[k] - c[1], w2 = y2[k] - c[2];
        float z0 = w0 + b[0], z1 = w1 + b[1], z2 = w2 + b[2];
        float zz = z0 * z0 + z1 * z1 + z2 * z2;
        float psi = zz <= rr ? 0.5f * zz : radius * sqrtf(zz) - half_rr;
        out[k] = top + psi + gj[k] - 0.5f * (w0 * w0 + w1 * w1 + w2 * w2);
    }
}

/* Keeps the `size` largest scores seen in a min-heap (s, j) of capacity `size`. */
static void heap_push(float *hs, int64_t *hj, int64_t *n, int64_t size, float s, int64_t j) {
    int64_t i;
    if (*n < size) { /* sift up */
        i = (*n)++;
        while (i > 0 && hs[(i - 1) / 2] > s) {
            hs[i] = hs[(i - 1) / 2], hj[i] = hj[(i - 1) / 2];
            i = (i - 1) / 2;
        }
    } else if (s > hs[0]) { /* replace the least, sift down */
        i = 0;
        for (;;) {
            int64_t l = 2 * i + 1, r = l + 1, m = i;
            float sm = s;
            if (l < *n && hs[l] < sm) m = l, sm = hs[l];
            if (r < *n && hs[r] < sm) m = r;
            if (m == i) break;
            hs[i] = hs[m], hj[i] = hj[m];
            i = m;
        }
    } else {
        return;
    }
    hs[i] = s, hj[i] = j;
}

int screen_tiles(const float *x, const float *f, const float *ys, const float *g, int64_t M,
                 const int64_t *r0, const int64_t *r1, const float *centre, const float *beta,
                 const float *top, const float *radius, const int64_t *cell_ptr, const int32_t *cells,
                 const int64_t *col_starts, float floor, float relative, int64_t sample, int mode,
                 float *tile_floor, int64_t *count, int64_t *runs, int32_t *best, const int64_t *ptr,
                 int32_t *lo, int32_t *hi, int64_t t_begin, int64_t t_end, int64_t *counter) {
    int64_t size = sample > 0 ? sample : 1, cap = 0;
    int64_t *heap_j = (int64_t *)malloc((size_t)size * sizeof(int64_t));
    float *heap_s = (float *)malloc((size_t)size * sizeof(float)), *bnd = NULL;
    int status = heap_j && heap_s ? 0 : -1;
    for (; status == 0;) {
        int64_t t = __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED);
        if (t >= t_end) break;
        const float *c = centre + 3 * t, *b = beta + 3 * t;
        int64_t n_cand = 0;
        for (int64_t e = cell_ptr[t]; e < cell_ptr[t + 1]; e++)
            n_cand += col_starts[cells[e] + 1] - col_starts[cells[e]];
        if (n_cand > cap) {
            free(bnd);
            cap = n_cand;
            bnd = (float *)malloc((size_t)cap * sizeof(float));
            if (!bnd) {
                status = -1;
                break;
            }
        }
        for (int64_t e = cell_ptr[t], k = 0; e < cell_ptr[t + 1]; e++) {
            int64_t j0 = col_starts[cells[e]], j1 = col_starts[cells[e] + 1];
            bounds_of(ys, g, M, j0, j1, c, b, top[t], radius[t], bnd + k);
            k += j1 - j0;
        }
        float fl = floor;
        int64_t arg = -1;
        if (mode == 0) { /* the best column, the floor */
            int64_t n_heap = 0;
            float high = -INFINITY;
            for (int64_t e = cell_ptr[t], k = 0; e < cell_ptr[t + 1]; e++)
                for (int64_t j = col_starts[cells[e]]; j < col_starts[cells[e] + 1]; j++, k++) {
                    float s = bnd[k];
                    if (s > high || arg < 0) high = s, arg = j;
                    if (relative >= 0 && (n_heap < size || s > heap_s[0]))
                        heap_push(heap_s, heap_j, &n_heap, size, s, j);
                }
            if (relative >= 0 && n_heap > 0) {
                float least = INFINITY;
                for (int64_t i = r0[t]; i < r1[t]; i++) {
                    float row_best = -INFINITY;
                    for (int64_t k = 0; k < n_heap; k++) {
                        int64_t j = heap_j[k];
                        float d0 = x[3 * i] - ys[j], d1 = x[3 * i + 1] - ys[M + j], d2 = x[3 * i + 2] - ys[2 * M + j];
                        float s = f[i] + g[j] - 0.5f * (d0 * d0 + d1 * d1 + d2 * d2);
                        row_best = s > row_best ? s : row_best;
                    }
                    least = row_best < least ? row_best : least;
                }
                if (least - relative > fl) fl = least - relative;
            }
            tile_floor[t] = fl, best[t] = (int32_t)arg;
        } else {
            fl = tile_floor[t], arg = best[t];
        }
        /* the kept columns, in increasing order, as runs */
        int64_t n = 0, n_runs = 0, r = mode == 1 ? ptr[t - t_begin] : 0, last = -2;
        for (int64_t e = cell_ptr[t], k = 0; e < cell_ptr[t + 1]; e++)
            for (int64_t j = col_starts[cells[e]]; j < col_starts[cells[e] + 1]; j++, k++) {
                if (!(bnd[k] >= fl || j == arg)) continue;
                n++;
                if (j != last + 1) {
                    if (mode == 1) {
                        if (n_runs > 0) hi[r++] = (int32_t)(last + 1);
                        lo[r] = (int32_t)j;
                    }
                    n_runs++;
                }
                last = j;
            }
        if (mode == 1 && n_runs > 0) hi[r] = (int32_t)(last + 1);
        if (mode == 0) count[t] = n, runs[t] = n_runs;
    }
    free(heap_j);
    free(heap_s);
    free(bnd);
    return status;
}

/* The grid backend's banded 1-D reduction (engine/grid.py, _log_conv_banded), float32.
 *
 * For lines k0..k1-1 of x (K, L), writes out[k, j] = log sum_l exp(x_kl - (u_j - v_l)^2 / (2 eps))
 * (inv2eps = 1 / (2 eps)) over the blocks of `size` consecutive columns that can matter:
 * xbar (K, n_b) holds each block's largest entry, qmin and qmax (J, n_b) the nearest and
 * farthest squared distances from u_j to each block's span, times inv2eps. With
 * lam = max_b xbar_kb - qmax_jb (a lower bound of the largest term), block b is summed when
 * its upper bound xbar_kb - qmin_jb is at least lam - margin; the others are dropped. The
 * kept terms are shifted by their exact maximum (the largest term's block is always kept).
 * Returns 1 when its buffer cannot be allocated, else 0.
 */
int band_lse_1d(const float *x, int64_t n_l, const float *u, int64_t n_j, const float *v,
                const float *xbar, int64_t size, int64_t n_b, const float *qmin, const float *qmax,
                float inv2eps, float margin, int64_t k0, int64_t k1, float *out) {
    float *buf = malloc((size_t)(n_l > 0 ? n_l : 1) * sizeof(float));
    if (!buf) return 1;
    for (int64_t k = k0; k < k1; k++) {
        const float *xk = x + k * n_l, *xb = xbar + k * n_b;
        for (int64_t j = 0; j < n_j; j++) {
            const float *qn = qmin + j * n_b, *qf = qmax + j * n_b;
            float lam = -INFINITY;
            for (int64_t b = 0; b < n_b; b++) {
                float t = xb[b] - qf[b];
                lam = t > lam ? t : lam;
            }
            float thr = lam - margin, uj = u[j], m = -INFINITY;
            int64_t n = 0;
            for (int64_t b = 0; b < n_b; b++) {
                if (xb[b] - qn[b] < thr) continue;
                int64_t l1 = (b + 1) * size < n_l ? (b + 1) * size : n_l;
                for (int64_t l = b * size; l < l1; l++) {
                    float d = uj - v[l];
                    float t = xk[l] - d * d * inv2eps;
                    buf[n++] = t;
                    m = t > m ? t : m;
                }
            }
            float s = 0.0f;
            for (int64_t i = 0; i < n; i++) s += exp_neg(buf[i] - m);
            out[k * n_j + j] = m + logf(s);
        }
    }
    free(buf);
    return 0;
}
#endif
