// copy_blocks: the pools after copying whole blocks src[i] -> dst[i] (copy-on-write).
// Reference: vmetal/engine/runner/attention/reference.py::copy_blocks.
// Test: tests/unit/test_paged_attention.py::test_metal_cache_kernels_match_reference (Metal only).
//
// This file is a kernel BODY: MLX (mx.fast.metal_kernel) writes the signature from the names below.
// MLX kernels write fresh output buffers, so this kernel writes the whole new pool: one thread per element.
// Launch (vmetal/engine/runner/attention/metal.py::plan_copy_blocks): grid (BS * HKV * D, num_blocks, 1),
// threadgroup (min(BS * HKV * D, 256), 1, 1).
// Template: BLOCK = BS * HKV * D, the elements of one block.
// Inputs:  k_pool, v_pool [num_blocks, BS, HKV, D];
//          block_src [num_blocks] int32: the block each block's new contents come from (src[i] for block
//          dst[i], the block itself otherwise). Every read is of the old pools, as in the reference.
// Outputs: k_out, v_out, shaped like the pools.

// Step 1: which element of which block this thread produces.
const uint e = thread_position_in_grid.x;  // element inside the block
const uint block_id = thread_position_in_grid.y;

// Step 2: where that element comes from.
const size_t src = size_t(block_src[block_id]) * BLOCK + e;
const size_t dst = size_t(block_id) * BLOCK + e;

// Step 3: copy it, in both pools.
k_out[dst] = k_pool[src];
v_out[dst] = v_pool[src];
