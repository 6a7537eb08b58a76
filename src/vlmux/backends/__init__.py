"""What runs models inside a worker. Imported before transformers in every worker and preparing process."""
import logging

# torchao, where installed, registers enums with torch's pytree when transformers imports it, and torch logs a
# deprecation warning for each on the user's terminal.
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
