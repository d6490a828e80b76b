"""The OpenAI-compatible HTTP API, one folder per endpoint (api_router.py / protocol.py / serving.py)."""
