"""From a user's prompt to an EngineRequest: parse and validate, resolve media to embeddings, assemble."""
