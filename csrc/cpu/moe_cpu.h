// The CPU implementation of moe_matmul for all three kinds (docs/contract.md §4).
#pragma once

#include "../common/moe_problem.h"

namespace jax_moe {

// Compute one validated call. Multi-threaded; results do not depend on the thread count.
void moe_forward_cpu(const MoeProblem& p, const MoeBuffers& b);

}  // namespace jax_moe
