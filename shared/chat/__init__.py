"""OpenAI-style chat messages -> a templated prompt plus the ordered media parts it refers to."""
