"""POST /tokenize and POST /detokenize (vLLM's extensions)."""
