"""What spans the layers: every architecture and variant trained and checked against merged
weights, the first screen of a 32-layer model, a real TensorBoard server, the MiniLM study of
the paper's figure, and the docstring examples."""
