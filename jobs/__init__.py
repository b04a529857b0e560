"""Entry points that a person, `make` or `ray job submit` runs."""

import os

# transformers warns on import that torchvision is absent; tailseed never needs torchvision.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
