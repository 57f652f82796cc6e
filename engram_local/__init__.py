"""engram-local: a local runtime for Engram language models with per-user row-override memory.

Importing the package is cheap: torch, transformers and llama_cpp are imported only inside the
commands and modules that need them.
"""

__version__ = "0.1.0"
