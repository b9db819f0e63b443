// What the SIMD kernel files share, written once over a small vector-traits type `V` (the pattern of
// Highway's -inl.h headers). x86_avx2.cpp, x86_avx512.cpp and arm_neon.cpp each define, in their own
// namespace and target region,
//   V::F         a vector of V::kLanes floats, and
//   V::zero, set1, load, store, load_f16, load_bf16 (widened to float32), add, sub, mul, min, max,
//   fma (a b + c, one rounding), fnma (c - a b, one rounding), round (to nearest even),
//   pow2 (p 2^n, n integral and in the range the file clamps to), sum (all lanes added),
// and then include this file there. No include guard: each kernel file includes it once. It
// includes nothing itself: <cmath>, <type_traits>, half.hpp, platform.hpp, kernels.hpp and
// target.hpp come first, outside the target region.

using F = V::F;
constexpr int kLanes = V::kLanes;

// Stored elements as float32: a whole vector, or its first lanes under a mask m (where V has masked
// loads); one value for scalar tails.
struct F32 {
    using T = float;
    template <class... Mask>
    static F load(const float* p, Mask... m) {
        return V::load(p, m...);
    }
    static float one(float x) { return x; }
};

// The two 16-bit formats: IEEE float16 and bfloat16 (float32's top half).
enum class Half16 { f16, bf16 };
template <Half16 Format>
struct Half {
    using T = uint16_t;
    template <class... Mask>
    static F load(const uint16_t* p, Mask... m) {
        if constexpr (Format == Half16::f16)
            return V::load_f16(p, m...);
        else
            return V::load_bf16(p, m...);
    }
    static float one(uint16_t h) { return Format == Half16::f16 ? half_to_float(h) : bf16_to_float(h); }
};
using F16 = Half<Half16::f16>;
using BF16 = Half<Half16::bf16>;

// exp(x) = 2^n e^r with n = round(x log2 e) and r = x - n ln 2 (ln 2 in two parts, so r is exact);
// e^r by the Cephes expf polynomial: about 1 ulp. The caller clamps x to where V::pow2 is exact;
// CapN keeps n <= 127 where the clamp lets x reach 88.7 (which rounds to n = 128).
template <bool CapN>
inline F exp_clamped(F x) {
    F n = V::round(V::mul(x, V::set1(1.44269504088896341f)));
    if (CapN) n = V::min(n, V::set1(127.0f));
    F r = V::fnma(n, V::set1(0.693359375f), x);
    r = V::fnma(n, V::set1(-2.12194440e-4f), r);
    F p = V::set1(1.9875691500e-4f);
    p = V::fma(p, r, V::set1(1.3981999507e-3f));
    p = V::fma(p, r, V::set1(8.3334519073e-3f));
    p = V::fma(p, r, V::set1(4.1665795894e-2f));
    p = V::fma(p, r, V::set1(1.6666665459e-1f));
    p = V::fma(p, r, V::set1(5.0000001201e-1f));
    p = V::fma(V::mul(p, r), r, V::add(r, V::set1(1.0f)));
    return V::pow2(p, n);
}

// ---------------------------------------------------------------------------------------------
// Register tiles. A tile is NV vectors of a row: Tile::load(p, t) and store(p, t, x) move vector t
// of the row at p. An ISA with masked moves (Tile::kMasks) passes its own tile type, whose last
// vector may be partial; Whole is the tile of whole vectors, where the columns past the last whole
// vector go to the scalar table instead.

template <int NV>
struct Whole {
    static constexpr int kVectors = NV;
    static constexpr bool kMasks = false;
    explicit Whole(int64_t /* values in the last vector: all of them */) {}
    F load(const float* p, int t) const { return V::load(p + kLanes * t); }
    void store(float* p, int t, F x) const { V::store(p + kLanes * t, x); }
};

// fn(std::integral_constant<int, n>()) for Min <= n <= Max: a count known at run time becomes a
// template argument, so that each count has its own fully unrolled code.
template <int Min, int Max, class Fn>
void with_count(int64_t n, Fn fn) {
    if constexpr (Max > Min)
        if (n < Max) return with_count<Min, Max - 1>(n, fn);
    fn(std::integral_constant<int, Max>());
}

// fn(std::integral_constant<int, n>(), last) for the tile of as few vectors n (at most NV) as hold
// w > 0 columns, `last` of them in its last vector.
template <int NV, class Fn>
void with_vectors(int64_t w, Fn fn) {
    if constexpr (NV > 1)
        if (w <= (NV - 1) * kLanes) return with_vectors<NV - 1>(w, fn);
    fn(std::integral_constant<int, NV>(), w - (NV - 1) * kLanes);
}

// The columns a tiled kernel covers: all of them where Tile masks, else the whole vectors.
template <template <int> class Tile>
int64_t tiled_columns(int64_t n) {
    return Tile<1>::kMasks ? n : n / kLanes * kLanes;
}

// ---------------------------------------------------------------------------------------------
// The matrix-memory sweep (MatrixPass in kernels.hpp), tile by tile of columns: the first pass
// (delta rules) reads the tile, the second updates it and lets up to kQueries queries read it in
// registers; further queries re-read the tile while it is still in L1.

constexpr int kQueries = 4;

// Second pass over a tile: S <- diag(a) S + k u^T row by row, and NQ queries read the new rows.
// Inlined into step_tile, where u stays in registers and a full tile's mask is a constant.
template <int NQ, class Tile>
KVFOLD_ALWAYS_INLINE void update_tile(const MatrixPass& m, int64_t c, const F* u, const Tile& tile) {
    constexpr int NV = Tile::kVectors;
    F acc[NQ > 0 ? NQ : 1][NV];
    for (int j = 0; j < NQ; ++j)
        for (int t = 0; t < NV; ++t) acc[j][t] = V::zero();
    const float* a = m.decay ? m.decay : &m.decay0;
    const int64_t a_step = m.decay ? 1 : 0;
    for (int64_t i = 0; i < m.dk; ++i) {
        float* row = m.S + i * m.ld + c;
        if (V::kRequestNext && m.next && m.delta)  // the next sweep's first pass then reads from L2, not L3
            for (int t = 0; t < NV; ++t) prefetch(m.next + i * m.ld + c + kLanes * t);
        const F ai = V::set1(a[i * a_step]), ki = V::set1(m.k[i]);
        F s[NV];
        for (int t = 0; t < NV; ++t) {
            s[t] = V::fma(ki, u[t], V::mul(ai, tile.load(row, t)));
            tile.store(row, t, s[t]);
        }
        for (int j = 0; j < NQ; ++j) {
            const F qj = V::set1(m.q[j * m.q_stride + i]);
            for (int t = 0; t < NV; ++t) acc[j][t] = V::fma(qj, s[t], acc[j][t]);
        }
    }
    const F scale = V::set1(m.scale);
    for (int j = 0; j < NQ; ++j)
        for (int t = 0; t < NV; ++t) tile.store(m.out + j * m.out_stride + c, t, V::mul(scale, acc[j][t]));
}

// NQ queries read a tile: out_j = scale q_j^T S over the tile's columns.
template <int NQ, class Tile>
void read_tile(const MatrixPass& m, int64_t c, const float* q, float* out, const Tile& tile) {
    constexpr int NV = Tile::kVectors;
    F acc[NQ][NV];
    for (int j = 0; j < NQ; ++j)
        for (int t = 0; t < NV; ++t) acc[j][t] = V::zero();
    for (int64_t i = 0; i < m.dk; ++i) {
        const float* row = m.S + i * m.ld + c;
        F s[NV];
        for (int t = 0; t < NV; ++t) s[t] = tile.load(row, t);
        for (int j = 0; j < NQ; ++j) {
            const F qj = V::set1(q[j * m.q_stride + i]);
            for (int t = 0; t < NV; ++t) acc[j][t] = V::fma(qj, s[t], acc[j][t]);
        }
    }
    const F scale = V::set1(m.scale);
    for (int j = 0; j < NQ; ++j)
        for (int t = 0; t < NV; ++t) tile.store(out + j * m.out_stride + c, t, V::mul(scale, acc[j][t]));
}

// Queries first, first + kQueries, ... read the tile, kQueries at a time.
template <class Tile>
void read_queries(const MatrixPass& m, int64_t c, int64_t first, const Tile& tile) {
    for (int64_t j = first; j < m.nq; j += kQueries) {
        const float* q = m.q + j * m.q_stride;
        float* out = m.out + j * m.out_stride;
        switch (m.nq - j < kQueries ? m.nq - j : kQueries) {
            case 1: read_tile<1>(m, c, q, out, tile); break;
            case 2: read_tile<2>(m, c, q, out, tile); break;
            case 3: read_tile<3>(m, c, q, out, tile); break;
            default: read_tile<4>(m, c, q, out, tile); break;
        }
    }
}

// The tile of NV vectors at column c, `last` columns in its last vector. (The tile is made here,
// from a count: where the count is a constant, the compiler makes a copy of the function for it.)
template <template <int> class Tile, int NV>
void step_tile(const MatrixPass& m, int64_t c, int64_t last) {
    const Tile<NV> tile(last);
    F u[NV];
    for (int t = 0; t < NV; ++t) u[t] = tile.load(m.v + c, t);
    if (m.delta) {  // first pass: u = beta (v - (diag(a) S)^T k) over this tile's columns
        F r0[NV], r1[NV];
        for (int t = 0; t < NV; ++t) r0[t] = r1[t] = V::zero();
        const float* a = m.decay ? m.decay : &m.decay0;
        const int64_t a_step = m.decay ? 1 : 0;
        int64_t i = 0;
        for (; i + 2 <= m.dk; i += 2) {
            const F w0 = V::set1(a[i * a_step] * m.k[i]);
            const F w1 = V::set1(a[(i + 1) * a_step] * m.k[i + 1]);
            const float* row = m.S + i * m.ld + c;
            for (int t = 0; t < NV; ++t) {
                r0[t] = V::fma(w0, tile.load(row, t), r0[t]);
                r1[t] = V::fma(w1, tile.load(row + m.ld, t), r1[t]);
            }
        }
        if (i < m.dk) {
            const F w0 = V::set1(a[i * a_step] * m.k[i]);
            for (int t = 0; t < NV; ++t) r0[t] = V::fma(w0, tile.load(m.S + i * m.ld + c, t), r0[t]);
        }
        const F beta = V::set1(m.beta);
        for (int t = 0; t < NV; ++t) u[t] = V::mul(beta, V::sub(u[t], V::add(r0[t], r1[t])));
    }
    switch (m.nq < kQueries ? m.nq : kQueries) {
        case 0: update_tile<0>(m, c, u, tile); break;
        case 1: update_tile<1>(m, c, u, tile); break;
        case 2: update_tile<2>(m, c, u, tile); break;
        case 3: update_tile<3>(m, c, u, tile); break;
        default: update_tile<4>(m, c, u, tile); break;
    }
    read_queries(m, c, kQueries, tile);
}

// The columns of m from c on, as a pass of their own (for the scalar table: the sweep is
// column-separable).
inline MatrixPass columns_from(const MatrixPass& m, int64_t c) {
    MatrixPass t = m;
    t.S = m.S + c;
    t.dv = m.dv - c;
    if (m.v) t.v = m.v + c;
    if (m.out) t.out = m.out + c;
    return t;
}

// Tiles of NV vectors; with a single query, tiles of Wide vectors first (registers to spare: S then
// streams in longer runs of each row). The columns left over make one masked tile where Tile
// masks, else whole vectors and then the scalar table.
template <template <int> class Tile, int NV, int Wide>
void tiled_matrix_step(const MatrixPass& m) {
    int64_t c = 0;
    if (m.nq <= 1)
        for (; c + Wide * kLanes <= m.dv; c += Wide * kLanes) step_tile<Tile, Wide>(m, c, kLanes);
    for (; c + NV * kLanes <= m.dv; c += NV * kLanes) step_tile<Tile, NV>(m, c, kLanes);
    const int64_t end = tiled_columns<Tile>(m.dv);
    for (; c < end; c += NV * kLanes)
        with_vectors<NV>(end - c, [&](auto nv, int64_t last) { step_tile<Tile, decltype(nv)::value>(m, c, last); });
    if (end < m.dv) scalar_kernels()->matrix_step(columns_from(m, end));
}

template <template <int> class Tile, int NV>
void tiled_matrix_read(const MatrixPass& m) {
    int64_t c = 0;
    for (; c + NV * kLanes <= m.dv; c += NV * kLanes) read_queries(m, c, 0, Tile<NV>(kLanes));
    const int64_t end = tiled_columns<Tile>(m.dv);
    for (; c < end; c += NV * kLanes)
        with_vectors<NV>(end - c,
                         [&](auto nv, int64_t last) { read_queries(m, c, 0, Tile<decltype(nv)::value>(last)); });
    if (end < m.dv) scalar_kernels()->matrix_read(columns_from(m, end));
}

// ---------------------------------------------------------------------------------------------
// The chunked prefill's matrix product and triangular solve (Gemm and solve_unit_lower in
// kernels.hpp), in register tiles of R rows x NV vectors. Column panels (NV vectors wide) stay in
// L1 while the row tiles pass over them.

// gemm: each row of b is loaded once per tile and every a value is broadcast from memory. TransA
// is g.trans_a, a constant: the tile's a values then sit at fixed offsets from one pointer.
template <int R, bool TransA, class Tile>
void gemm_tile(const Gemm& g, int64_t i0, int64_t j0, int64_t k, const Tile& tile) {
    constexpr int NV = Tile::kVectors;
    F acc[R][NV];
    KVFOLD_UNROLL(8)
    for (int r = 0; r < R; ++r) {
        KVFOLD_UNROLL(8)
        for (int t = 0; t < NV; ++t) acc[r][t] = V::zero();
    }
    const int64_t row = TransA ? 1 : g.lda, col = TransA ? g.lda : 1;  // a[i][p] at a + i * row + p * col
    const float* a = g.a + i0 * row;
    const float* b = g.b + j0;
    for (int64_t p = 0; p < k; ++p, a += col, b += g.ldb) {
        F bp[NV];
        KVFOLD_UNROLL(8)
        for (int t = 0; t < NV; ++t) bp[t] = tile.load(b, t);
        KVFOLD_UNROLL(8)
        for (int r = 0; r < R; ++r) {
            const F w = V::set1(a[r * row]);
            KVFOLD_UNROLL(8)
            for (int t = 0; t < NV; ++t) acc[r][t] = V::fma(w, bp[t], acc[r][t]);
        }
    }
    const F alpha = V::set1(g.alpha), beta = V::set1(g.beta);
    KVFOLD_UNROLL(8)
    for (int r = 0; r < R; ++r) {
        float* c = g.c + (i0 + r) * g.ldc + j0;
        KVFOLD_UNROLL(8)
        for (int t = 0; t < NV; ++t)
            tile.store(
                c, t,
                g.accumulate ? V::fma(alpha, acc[r][t], V::mul(beta, tile.load(c, t))) : V::mul(alpha, acc[r][t]));
    }
}

// Gemm::ahead's lines requested per tile: the chunked prefill's products of a chunk have about a
// hundred tiles for the next chunk's 768 lines, and each tile computes long enough for 8 to arrive.
constexpr int kLinesPerTile = 8;

// Rows of the next tile when `left` remain: R, but a last tile of fewer than R - 2 rows would keep
// too few FMA chains in flight, so R + 1 .. 2R - 3 rows go as two near-equal tiles.
template <int R>
inline int64_t tile_rows(int64_t left) {
    if (left <= R) return left;
    if (left < 2 * R - 2) return (left + 1) / 2;
    return R;
}

template <template <int> class Tile, int R, int NV>
void tiled_gemm(const Gemm& g) {
    constexpr int64_t kCols = NV * kLanes;
    const int64_t n = tiled_columns<Tile>(g.n);
    for (int64_t j0 = 0; j0 < n; j0 += kCols) {
        const int64_t w = n - j0 < kCols ? n - j0 : kCols;
        for (int64_t i0 = 0, rows = 0; i0 < g.m; i0 += rows) {
            rows = tile_rows<R>(g.m - i0);
            const int64_t k = g.lower_a && i0 + rows < g.k ? i0 + rows : g.k;
            // lower_c: a tile that reaches the diagonal computes only the vectors left of its last row's diagonal
            const int64_t cols = g.lower_c && i0 + rows - j0 < w ? i0 + rows - j0 : w;
            if (cols <= 0) continue;
            if (g.ahead) g.ahead->some(kLinesPerTile);
            with_vectors<NV>(cols, [&](auto nv, int64_t last) {
                const Tile<decltype(nv)::value> tile(last);
                with_count<1, R>(rows, [&](auto r) {
                    if (g.trans_a)
                        gemm_tile<decltype(r)::value, true>(g, i0, j0, k, tile);
                    else
                        gemm_tile<decltype(r)::value, false>(g, i0, j0, k, tile);
                });
            });
        }
    }
    if (n < g.n) {  // the last columns, all rows (lower_c's unwanted entries may be written)
        Gemm rest = g;
        rest.b = g.b + n;
        rest.c = g.c + n;
        rest.n = g.n - n;
        rest.lower_c = false;
        scalar_kernels()->gemm(rest);
    }
}

// Forward substitution, register-blocked like gemm: a tile takes off the rows above it (already
// solved) one loaded row at a time, then solves its own rows in registers.
template <int R, class Tile>
void solve_tile(const float* a, int64_t lda, float* x, int64_t ldx, int64_t i0, const Tile& tile) {
    constexpr int NV = Tile::kVectors;
    F acc[R][NV];
    KVFOLD_UNROLL(8)
    for (int r = 0; r < R; ++r) {
        KVFOLD_UNROLL(8)
        for (int t = 0; t < NV; ++t) acc[r][t] = tile.load(x + (i0 + r) * ldx, t);
    }
    const float* ai = a + i0 * lda;
    for (int64_t s = 0; s < i0; ++s) {
        F xs[NV];
        KVFOLD_UNROLL(8)
        for (int t = 0; t < NV; ++t) xs[t] = tile.load(x + s * ldx, t);
        KVFOLD_UNROLL(8)
        for (int r = 0; r < R; ++r) {
            const F w = V::set1(ai[r * lda + s]);
            KVFOLD_UNROLL(8)
            for (int t = 0; t < NV; ++t) acc[r][t] = V::fnma(w, xs[t], acc[r][t]);
        }
    }
    KVFOLD_UNROLL(8)
    for (int r = 1; r < R; ++r) {
        KVFOLD_UNROLL(8)
        for (int s = 0; s < r; ++s) {
            const F w = V::set1(ai[r * lda + i0 + s]);
            KVFOLD_UNROLL(8)
            for (int t = 0; t < NV; ++t) acc[r][t] = V::fnma(w, acc[s][t], acc[r][t]);
        }
    }
    KVFOLD_UNROLL(8)
    for (int r = 0; r < R; ++r) {
        KVFOLD_UNROLL(8)
        for (int t = 0; t < NV; ++t) tile.store(x + (i0 + r) * ldx, t, acc[r][t]);
    }
}

template <template <int> class Tile, int R, int NV>
void tiled_solve_unit_lower(const float* a, int64_t lda, float* x, int64_t ldx, int64_t m, int64_t n) {
    constexpr int64_t kCols = NV * kLanes;
    const int64_t end = tiled_columns<Tile>(n);
    for (int64_t c = 0; c < end; c += kCols) {
        const int64_t w = end - c < kCols ? end - c : kCols;
        for (int64_t i0 = 0; i0 < m; i0 += R) {
            const int64_t rows = m - i0 < R ? m - i0 : R;
            with_vectors<NV>(w, [&](auto nv, int64_t last) {
                const Tile<decltype(nv)::value> tile(last);
                with_count<1, R>(rows, [&](auto r) { solve_tile<decltype(r)::value>(a, lda, x + c, ldx, i0, tile); });
            });
        }
    }
    if (end < n) scalar_kernels()->solve_unit_lower(a, lda, x + end, ldx, m, n - end);
}
