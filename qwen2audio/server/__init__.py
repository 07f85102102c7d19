"""OpenAI-compatible HTTP server (FastAPI) over the continuous-batching engine, with a web page.

Heavy imports (fastapi, torch) happen in `app` and in the `serve` handler, not here, so that
`qwen2audio --help` stays fast.
"""
