"""Running a model: the backends (torch, ONNX Runtime), devices, explanations."""
