"""mlx-llama: run Llama-family language models locally with MLX.

The stable API for apps is `load`, `generate` and `stream_generate`.
"""

from .errors import MlxLlamaError
from .loading import load

# Imported eagerly, after the submodule of the same name: importing `mlx_llama.generate` binds
# the module to this package's `generate`, and the line below rebinds it to the function
# (a lazy `__getattr__` cannot: the module attribute shadows it once anything imports it).
from .generate import generate, stream_generate  # noqa: E402

__all__ = ["MlxLlamaError", "load", "generate", "stream_generate"]
__version__ = "0.1.0"
