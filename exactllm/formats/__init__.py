"""File formats: GGUF block quantization (quant.py) and model file readers."""
