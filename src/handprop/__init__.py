"""handprop: neural networks with every forward and backward pass written by hand."""

__version__ = "0.1.0"
