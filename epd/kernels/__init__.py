"""Attention and cache kernels: a torch reference path (CPU, tests) and fast paths behind it."""
