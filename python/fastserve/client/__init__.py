"""fastserve's async client for any OpenAI-compatible server (aiohttp only; no torch)."""

from .async_client import APIError, AsyncClient, Result, StreamError

__all__ = ["AsyncClient", "Result", "APIError", "StreamError"]
