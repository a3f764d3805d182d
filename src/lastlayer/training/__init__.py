"""The last layer's training: its data, the softmax and its fits, their scores and TensorBoard curves."""
