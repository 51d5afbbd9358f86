"""File formats: GGUF reading, tokenizers and chat templates from GGUF metadata."""
