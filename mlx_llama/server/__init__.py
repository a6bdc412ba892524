"""OpenAI-compatible local HTTP server (`mlx-llama serve`).

`app.create_app` builds the FastAPI app over a `worker.GenerationWorker`, the single thread
that owns the model; `prefix_cache` keeps recent prompt caches for multi-turn reuse.
FastAPI and uvicorn come with the `server` extra: `pip install 'mlx-llama[server]'`.
"""
