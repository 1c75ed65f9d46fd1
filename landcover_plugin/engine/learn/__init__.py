"""Learning: the dataset folder, the networks, training, export to ONNX, inference with onnxruntime."""
