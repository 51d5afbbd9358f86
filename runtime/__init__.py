"""The engine the CLI, the library and the server share: loading, KV cache, forward, generation."""
