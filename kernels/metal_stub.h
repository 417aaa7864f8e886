// Stand-ins for the Metal Shading Language, just enough for a C++ compiler to check the syntax (and the
// names, types and template instantiation) of kernels/*.metal off a Mac. Never used to run anything.
// Used by tests/unit/test_kernels_syntax.py, which wraps each body in the signature MLX would generate.
// MSL is C++14-based: compile with -std=c++14 so that later C++ features are caught too.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

// Address spaces and function qualifiers: nothing in C++.
#define device
#define constant
#define threadgroup
#define thread

typedef unsigned int uint;
// Metal's 16-bit floats convert to and from float implicitly, as a float does.
typedef float half;
typedef float float16_t;
typedef float bfloat16_t;

struct uint3 {
  uint x, y, z;
};

namespace metal {
using std::exp;
using std::sqrt;
using std::tanh;
// Metal's full-precision variants of its math functions.
namespace precise {
using std::tanh;
template <typename U>
U rsqrt(U x) { return U(1) / std::sqrt(x); }
}
// Metal's fast-math variants (mlx's rope uses them).
namespace fast {
using std::cos;
using std::sin;
}

template <typename U>
U max(U a, U b) { return a > b ? a : b; }
template <typename U>
U min(U a, U b) { return a < b ? a : b; }

// The sum over the 32 lanes of a SIMD group; one lane here.
template <typename U>
U simd_sum(U x) { return x; }
template <typename U>
U simd_max(U x) { return x; }

enum class mem_flags { mem_none, mem_device, mem_threadgroup };
inline void threadgroup_barrier(mem_flags) {}
}  // namespace metal
