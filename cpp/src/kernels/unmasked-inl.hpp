// The element-wise and row kernels of the SIMD files without masked moves (AVX2, NEON), written
// once over their vector traits V: whole vectors, then a scalar loop for the last few values.
// (AVX-512 masks its last vector instead, and has its own.) Besides what simd-inl.hpp asks of V:
//   V::kDotChains  independent FMA chains in a dot product,
//   V::reduce_max  the largest lane, and
//   V::sum4        four vectors' lane sums, scaled, stored at once;
// and, before this file, exp_neg (exp for x <= 0) and exp_any (exp over the whole float range).
//
// Include it inside the kernel file's namespace and target region, after simd-inl.hpp. No include
// guard: each file that uses it includes it once.

// s[0] + ... + s[N - 1], added in pairs.
template <int N>
inline F add_pairs(const F* s) {
    if constexpr (N == 1)
        return s[0];
    else
        return V::add(add_pairs<N / 2>(s), add_pairs<N / 2>(s + N / 2));
}

template <class E>
float dot(const float* a, const typename E::T* b, int64_t n) {
    constexpr int kChains = V::kDotChains;
    F s[kChains];
    for (int c = 0; c < kChains; ++c) s[c] = V::zero();
    int64_t i = 0;
    for (; i + kChains * kLanes <= n; i += kChains * kLanes) {
        KVFOLD_UNROLL(4)
        for (int c = 0; c < kChains; ++c) s[c] = V::fma(V::load(a + i + kLanes * c), E::load(b + i + kLanes * c), s[c]);
    }
    for (; i + kLanes <= n; i += kLanes) s[0] = V::fma(V::load(a + i), E::load(b + i), s[0]);
    float sum = V::sum(add_pairs<kChains>(s));
    for (; i < n; ++i) sum += a[i] * E::one(b[i]);
    return sum;
}

template <class E>
void axpy(float* y, float a, const typename E::T* x, int64_t n) {
    const F va = V::set1(a);
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) V::store(y + i, V::fma(va, E::load(x + i), V::load(y + i)));
    for (; i < n; ++i) y[i] += a * E::one(x[i]);
}

template <class E>
void widen(float* y, const typename E::T* x, int64_t n) {
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) V::store(y + i, E::load(x + i));
    for (; i < n; ++i) y[i] = E::one(x[i]);
}

void scale(float* y, float a, int64_t n) {
    const F va = V::set1(a);
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) V::store(y + i, V::mul(va, V::load(y + i)));
    for (; i < n; ++i) y[i] *= a;
}

float max(const float* x, int64_t n) {
    int64_t i = 0;
    float m = x[0];
    if (n >= kLanes) {
        F vm = V::load(x);
        for (i = kLanes; i + kLanes <= n; i += kLanes) vm = V::max(vm, V::load(x + i));
        m = V::reduce_max(vm);
    }
    for (; i < n; ++i) m = x[i] > m ? x[i] : m;
    return m;
}

float exp_sum(float* x, float shift, int64_t n) {
    const F vs = V::set1(shift);
    F acc = V::zero();
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
        const F e = exp_neg(V::sub(V::load(x + i), vs));
        V::store(x + i, e);
        acc = V::add(acc, e);
    }
    float s = V::sum(acc);
    for (; i < n; ++i) {
        x[i] = std::exp(x[i] - shift);
        s += x[i];
    }
    return s;
}

void exp_f32(float* y, const float* x, int64_t n) {
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) V::store(y + i, exp_any(V::load(x + i)));
    for (; i < n; ++i) y[i] = std::exp(x[i]);
}

// Without masked moves a row's columns take more than one pass (AVX2's 16 registers hold 64 of
// them): the rows go by in blocks of kRowBlock, each read in all its passes while it is in L1, so
// that the window streams in order. One pass per column slice over all 256 rows of a float32
// window took 1.2x the time, its later passes reading lines the prefetcher had not asked for.
constexpr int64_t kRowBlock = 32;

// Calls block(first, n, add_block) for the rows in blocks of kRowBlock. A weighted sum's block adds
// to the output when the caller asked it to or an earlier block has written it.
template <class Block>
inline void for_row_blocks(int64_t rows, bool add, Block block) {
    for (int64_t first = 0; first < rows; first += kRowBlock)
        block(first, rows - first < kRowBlock ? rows - first : kRowBlock, add || first > 0);
}

// Scores a block of rows at a time, as weighted_sum reads values: each slice of 8 vectors of the
// columns over the whole block (the query's slice in registers), a vector of partial sums per row
// carried from slice to slice and summed across its lanes once at the end, four rows at a time.
// Scored one row at a time (a call and a lane sum per row), a prefill over a window of 256 float32
// rows took 1.15x the time, and a decode step over 256 float16 rows 1.1x; with the lane sums taken
// one row at a time, a decode step over 256 float32 rows took about 1.1x.
template <class E>
void scores(const float* q, int64_t q_stride, int64_t nq, const typename E::T* k, int64_t rows, int64_t d, float scale,
            float* s, int64_t s_stride) {
    constexpr int64_t kSlice = 8 * kLanes;
    const int64_t whole = d / kLanes * kLanes;  // columns in whole vectors; the rest one by one
    F part[kRowBlock];
    for_row_blocks(rows, false, [&](int64_t j0, int64_t n, bool) {
        const typename E::T* k0 = k + j0 * d;
        for (int64_t i = 0; i < nq; ++i) {
            const float* qi = q + i * q_stride;
            int64_t c = 0;
            for (; c + kSlice <= whole; c += kSlice) {
                F x[8];
                for (int t = 0; t < 8; ++t) x[t] = V::load(qi + c + kLanes * t);
                for (int64_t j = 0; j < n; ++j) {
                    const typename E::T* row = k0 + j * d + c;
                    F a = c ? part[j] : V::zero(), b = V::zero();  // two chains
                    for (int t = 0; t < 8; t += 2) {
                        a = V::fma(x[t], E::load(row + kLanes * t), a);
                        b = V::fma(x[t + 1], E::load(row + kLanes * (t + 1)), b);
                    }
                    part[j] = V::add(a, b);
                }
            }
            if (c < whole)
                for (int64_t j = 0; j < n; ++j) {
                    F a = c ? part[j] : V::zero();
                    for (int64_t t = c; t < whole; t += kLanes) a = V::fma(V::load(qi + t), E::load(k0 + j * d + t), a);
                    part[j] = a;
                }
            float* si = s + i * s_stride + j0;
            if (whole == d) {  // four rows' lane sums at once; a row past the last four in all four places
                int64_t j = 0;
                for (; j + 4 <= n; j += 4) V::sum4(si + j, part + j, scale);
                for (float y[4]; j < n; ++j) {
                    const F row[4] = {part[j], part[j], part[j], part[j]};
                    V::sum4(y, row, scale);
                    si[j] = y[0];
                }
            } else
                for (int64_t j = 0; j < n; ++j) {
                    float sum = whole ? V::sum(part[j]) : 0.0f;
                    for (int64_t t = whole; t < d; ++t) sum += qi[t] * E::one(k0[j * d + t]);
                    si[j] = scale * sum;
                }
        }
    });
}

// o (R vectors) (+)= sum_j p_j v_j[0 : R kLanes]: the output stays in registers while the rows
// stream by.
template <class E, int R>
void accumulate(const float* p, const typename E::T* v, int64_t rows, int64_t d, float* o, bool add) {
    F acc[R];
    KVFOLD_UNROLL(8)
    for (int r = 0; r < R; ++r) acc[r] = add ? V::load(o + kLanes * r) : V::zero();
    for (int64_t j = 0; j < rows; ++j, v += d) {
        const F w = V::set1(p[j]);
        KVFOLD_UNROLL(8)
        for (int r = 0; r < R; ++r) acc[r] = V::fma(w, E::load(v + kLanes * r), acc[r]);
    }
    KVFOLD_UNROLL(8)
    for (int r = 0; r < R; ++r) V::store(o + kLanes * r, acc[r]);
}

template <class E>
void weighted_sum(const float* p, int64_t p_stride, int64_t nq, const typename E::T* v, int64_t rows, int64_t d,
                  float* out, int64_t out_stride, bool add) {
    using Acc = void (*)(const float*, const typename E::T*, int64_t, int64_t, float*, bool);
    static constexpr Acc by_registers[8] = {nullptr,          accumulate<E, 1>, accumulate<E, 2>, accumulate<E, 3>,
                                            accumulate<E, 4>, accumulate<E, 5>, accumulate<E, 6>, accumulate<E, 7>};
    for_row_blocks(rows, add, [&](int64_t j0, int64_t n, bool add_block) {
        const typename E::T* v0 = v + j0 * d;
        for (int64_t i = 0; i < nq; ++i) {
            const float* pi = p + i * p_stride + j0;
            float* o = out + i * out_stride;
            int64_t c = 0;
            for (; c + 8 * kLanes <= d; c += 8 * kLanes) accumulate<E, 8>(pi, v0 + c, n, d, o + c, add_block);
            if (int64_t regs = (d - c) / kLanes) {
                by_registers[regs](pi, v0 + c, n, d, o + c, add_block);
                c += kLanes * regs;
            }
            for (; c < d; ++c) {
                float sum = add_block ? o[c] : 0.0f;
                for (int64_t j = 0; j < n; ++j) sum += pi[j] * E::one(v0[j * d + c]);
                o[c] = sum;
            }
        }
    });
}
