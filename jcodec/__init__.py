"""jcodec: run LLMs in JAX from compressed weights, decoded tile by tile on the GPU."""
__version__ = "0.1.0"
