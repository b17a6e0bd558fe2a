"""Concept engine: Deep Feature Factorization (NMF) over CNN activations, on NumPy or CuPy."""
