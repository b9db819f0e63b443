// The roofline's two measuring loops, written once over a vector-traits type V (F, kLanes, set1,
// load, store, add, fma) and included by roofline.cpp inside each ISA's target region. No include
// guard: included once per region, each in its own namespace.

// The lanes of a added in order, through memory (not _mm512_reduce_add_ps: GCC 12 warns inside
// it, GCC bug 105593). Once per call, outside the timed loops.
template <class V>
float sum(typename V::F a) {
    float x[V::kLanes];
    V::store(x, a);
    float total = 0;
    for (float v : x) total += v;
    return total;
}

// kChains (roofline.cpp) independent chains of multiply-adds acc = acc * a + b, so that several
// are in flight while each waits out the latency of the one before. a < 1 keeps every value finite.
template <class V>
float fma_chains(int64_t iterations, float a, float b) {
    typename V::F acc[kChains];
    const typename V::F va = V::set1(a), vb = V::set1(b);
    KVFOLD_UNROLL(12)
    for (int i = 0; i < kChains; ++i) acc[i] = V::set1(static_cast<float>(i));
    for (int64_t it = 0; it < iterations; ++it) {
        KVFOLD_UNROLL(12)
        for (int i = 0; i < kChains; ++i) acc[i] = V::fma(acc[i], va, vb);
    }
    float total = 0;
    for (int i = 0; i < kChains; ++i) total += sum<V>(acc[i]);
    return total;
}

// Reads n floats (a multiple of 8 vectors) `passes` times into 8 running sums: the loads, not the
// additions, set the pace.
template <class V>
float read_passes(const float* x, int64_t n, int64_t passes) {
    typename V::F acc[8];
    KVFOLD_UNROLL(8)
    for (int j = 0; j < 8; ++j) acc[j] = V::set1(0);
    for (int64_t p = 0; p < passes; ++p) {
        for (int64_t i = 0; i < n; i += 8 * V::kLanes) {
            KVFOLD_UNROLL(8)
            for (int j = 0; j < 8; ++j) acc[j] = V::add(acc[j], V::load(x + i + j * V::kLanes));
        }
    }
    float total = 0;
    for (int j = 0; j < 8; ++j) total += sum<V>(acc[j]);
    return total;
}
