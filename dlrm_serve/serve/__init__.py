"""Serving: the TorchServe request adapter and Predictor, OIP, the KServe predictor, archive packaging."""
