"""Quantized weights: the GPTQ checkpoint format and solver, quantization settings, FP8 at load (torch only)."""
