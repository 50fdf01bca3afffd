"""User-facing APIs over the engine: offline batch generation and async streaming."""
