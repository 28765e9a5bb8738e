"""jcodec: run LLMs in JAX from compressed weights, decoded tile by tile on the GPU.

    model = jcodec.load("model.jcodec", mode="compressed")
    print(jcodec.generate(model, "What is the capital of France?"))
"""
__version__ = "0.1.0"

from jcodec.api import load  # noqa: E402
from jcodec.generation import Model, generate, perplexity  # noqa: E402
from jcodec.tensor import CompressedTensor, decode  # noqa: E402

__all__ = ["load", "generate", "perplexity", "Model", "CompressedTensor", "decode"]
