"""One module per architecture, chosen by GGUF `general.architecture`, and the catalogue of pullable models."""
