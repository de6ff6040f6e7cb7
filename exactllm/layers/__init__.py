"""Model building blocks: quantized/parallel linear layers, attention, norms, MoE."""
