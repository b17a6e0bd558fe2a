"""Feature server: ONNX Runtime activations of real ImageNet models, in-process or over gRPC."""
