// The roofline the benchmarks print beside their times: what one core of this CPU can do (FMA peak,
// read bandwidth at a given working-set size), measured, and what a benchmark case asks of it
// (bytes moved and FLOPs per step). Internal: the benchmarks' tool, not part of the public API.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

namespace kvfold {
namespace roofline {

// FLOP/s of the calling thread running independent chains of fused multiply-adds (enough to cover
// the FMA latency) in the vectors of `backend`: avx512 512-bit, avx2 256-bit, neon and scalar
// 128-bit (the scalar backend's baseline vectors: SSE2 multiply then add on x86-64). The best of
// several rounds over about `seconds`. ValueError for a backend this machine does not run.
double fma_peak(const std::string& backend, double seconds);

// A buffer of `bytes` bytes (64 to 2^36; ValueError otherwise), aligned and on huge pages when
// large as the cache's own buffers, and mapped when made. read() reads all of it passes() times
// with the vector loads of the active backend: at least 8 MB a call, so that timing a call times
// the reads, not the call. Timed in rounds between a benchmark case's own, it gives the read
// bandwidth under the same conditions as the case: on a machine shared with other work the rate
// moves from second to second, and a bound measured apart from the case would move the case's
// fraction of it.
class ReadLoop {
   public:
    explicit ReadLoop(int64_t bytes);
    ~ReadLoop();
    ReadLoop(const ReadLoop&) = delete;
    ReadLoop& operator=(const ReadLoop&) = delete;
    int64_t bytes() const;   // what one pass reads: `bytes` rounded up to whole blocks of the widest vectors
    int64_t passes() const;  // passes a read() makes
    void read() const;

   private:
    struct Buffer;
    std::unique_ptr<Buffer> buffer_;
};

// What one step of a benchmark case asks for: a decode step (tokens == 1), or one token of a
// prefill of `tokens` tokens from an empty cache. B = 1, query heads = KV heads, d_k = d_v.
struct StepWork {
    double bytes = 0;      // read by the step, at least once each (its writes go to lines it read)
    double flops = 0;      // useful floating-point operations (a multiply-add counts 2)
    double footprint = 0;  // distinct bytes the step's reads come from: the working set to measure
};
// `rule` is one of drop, cumulative, ema (summary memories), linear, gated, delta, gated_delta
// (matrix memories); ValueError for another or for sizes out of range. element_bytes: 4, or 2 for
// float16/bfloat16 storage, or 1 for int8 (q8_0: counted with its scales, 1.125 bytes a value).
StepWork step_work(const std::string& rule, int64_t heads, int64_t head_dim, int64_t window, int64_t sinks,
                   int64_t element_bytes, int64_t tokens);

}  // namespace roofline
}  // namespace kvfold
