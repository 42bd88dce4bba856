"""Test and benchmark support: a private TorchServe, process memory measurement."""
