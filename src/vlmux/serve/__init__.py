"""`vlmux serve`: an OpenAI-compatible server over one ModelPool (parent side: never imports torch)."""
