"""mlx-llama: run Llama-family language models locally with MLX.

The stable API for apps is `load`, `generate` and `stream_generate`.
"""

from .errors import MlxLlamaError
from .loading import load

__all__ = ["MlxLlamaError", "load", "generate", "stream_generate"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # generate.py pulls in sampling and the tokenizer; keep `import mlx_llama` cheap.
    if name in ("generate", "stream_generate"):
        from . import generate as _generate

        return getattr(_generate, name)
    raise AttributeError(name)
