"""Serving: an OpenAI-compatible HTTP API with continuous batching, GLM blank infilling, a
playground page and Prometheus metrics. Needs fastapi and uvicorn; `create_app` builds the app."""

from openglm.serve.app import create_app, serve, serve_in_thread

__all__ = ["create_app", "serve", "serve_in_thread"]
