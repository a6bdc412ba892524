"""The converter: Hugging Face folders, hub repos and GGUF files into MLX model folders.

The runtime (`mlx_llama`) never imports this package; the MLX folder format is the only
interface between the two.
"""
