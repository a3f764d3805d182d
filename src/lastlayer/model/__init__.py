"""The retrained model: its contract, the onnxruntime sessions that run networks, its export and its use."""
