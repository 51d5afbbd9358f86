"""Quantized block formats: numpy reference dequantizers, fused Numba kernels, quantizers."""
