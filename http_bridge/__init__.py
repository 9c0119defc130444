"""glmserve HTTP bridge: OpenAI-compatible HTTP+SSE in front of gRPC model servers (no torch)."""
