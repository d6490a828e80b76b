"""Benchmark clients shipped with mmpipe (`mmpipe bench serve`): a random multimodal dataset and a streaming
OpenAI client that times each request. Light at import time (PIL, numpy and openai load inside the functions)."""
