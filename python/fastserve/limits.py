"""Documented per-request limits (README "Limits"), torch-free: the server validates requests
against them and the engine sizes its per-step sample rows from MAX_N.

Bounds on what one request may make the engine hold or check per token (vLLM has none;
without them n=10**6 or 10**5 stop strings from one client would stall everyone)."""

# vLLM's default --max-logprobs: the number of alternatives a request may ask for.
MAX_LOGPROBS = 20
MAX_N = 128  # n and best_of
MAX_STOP_STRINGS = 64  # checked against the new text at every token
MAX_STOP_STRING_CHARS = 1024
MAX_TOKEN_ID_LIST = 1024  # stop_token_ids, and bad_words entries
MAX_PROMPTS = 1024  # prompts in one /v1/completions request
