"""Kernels: one file per op, each a plain-torch reference (``*_ref``) and, where it pays,
a Triton kernel with the same signature. ``exactllm.layers.ops`` picks one per device and
numerics mode; kernels themselves never read global state."""
