"""The modeling code of a tiny remote-code model, copied next to its weights (`tiny.remote`): transformers imports
it from the model folder under trust_remote_code, never from here."""
