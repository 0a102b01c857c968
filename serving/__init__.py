"""Serving tier (PyTorch; never imports JAX): engine, trace export client, weight hot-swap."""
