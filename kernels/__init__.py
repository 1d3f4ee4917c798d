"""Triton kernels for vgen, each with a PyTorch reference beside it.

This package shares its import name with Hugging Face's `kernels` distribution, which transformers
probes for; tests/test_text_encoder.py keeps transformers' encoders importable with vgen installed.
"""
