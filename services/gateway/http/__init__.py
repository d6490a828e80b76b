"""HTTP plumbing shared by the OpenAI endpoints: the app, errors, auth, request ids, SSE, health, metrics."""
