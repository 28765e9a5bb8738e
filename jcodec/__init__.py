"""jcodec: run LLMs in JAX from compressed weights, decoded tile by tile on the GPU.

    model = jcodec.load("model.jcodec", mode="compressed")
    print(jcodec.generate(model, "What is the capital of France?"))
"""
from jcodec.api import load
from jcodec.reader import open
from jcodec.generation import Model, generate, perplexity
from jcodec.tensor import CompressedTensor, decode

__version__ = "0.1.0"
__all__ = ["load", "open", "generate", "perplexity", "Model", "CompressedTensor", "decode"]
