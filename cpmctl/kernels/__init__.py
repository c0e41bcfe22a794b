"""cpmctl's C kernels for the CPU, built on first use into one library (library.py): the int8
weight-only matmul (int8.py), the fp32/bf16 matmul of inference and fp32 training (dense.py),
and generation's attention over the KV cache (attention.py). Each module checks its arguments
before calling C and falls back to PyTorch where the library cannot be built."""
