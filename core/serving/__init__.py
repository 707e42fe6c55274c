"""Serving: the continuous-batching engine and its OpenAI-compatible HTTP server."""
