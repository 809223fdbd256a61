// IEEE f32 arithmetic for the CPU kernels, whatever mode the calling thread runs in.
//
// XLA's CPU runtime runs its threads with flush-to-zero and denormals-are-zero (x86 MXCSR FTZ and
// DAZ; AArch64 FPCR.FZ). The contract's f32 arithmetic is IEEE's, as gguf-py's decode and the CUDA
// kernels are: subnormal values count (MXFP4's scales 2^-128 and 2^-127 for e = 0, 1; tiny d x sc
// products; subnormal bf16 weights). Under DAZ they read as zero and the CPU results left the
// contract. The CPU handler holds this scope for the call: it clears those bits and restores the
// caller's on exit; the worker threads the call starts (parallel.h) inherit the cleared mode.
#pragma once

#include <cstdint>

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

namespace jax_moe {

class IeeeFloatScope {
 public:
  IeeeFloatScope() {
#if defined(__x86_64__) || defined(__i386__)
    saved_ = _mm_getcsr();
    _mm_setcsr(saved_ & ~kFtzDaz);
#elif defined(__aarch64__)
    uint64_t fpcr;
    asm volatile("mrs %0, fpcr" : "=r"(fpcr));
    saved_ = fpcr;
    asm volatile("msr fpcr, %0" ::"r"(fpcr & ~kFz));
#endif
  }
  ~IeeeFloatScope() {
#if defined(__x86_64__) || defined(__i386__)
    _mm_setcsr(static_cast<unsigned>(saved_));
#elif defined(__aarch64__)
    asm volatile("msr fpcr, %0" ::"r"(saved_));
#endif
  }
  IeeeFloatScope(const IeeeFloatScope&) = delete;
  IeeeFloatScope& operator=(const IeeeFloatScope&) = delete;

 private:
  static constexpr unsigned kFtzDaz = (1u << 15) | (1u << 6);  // MXCSR FTZ, DAZ
  static constexpr uint64_t kFz = uint64_t{1} << 24;           // FPCR.FZ
  uint64_t saved_ = 0;
};

}  // namespace jax_moe
