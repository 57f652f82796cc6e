"""Option help and helpers shared by several commands."""

MODEL_HELP = ("Model: a MODEL_DIR from `engram-local convert`, or an Engram checkpoint directory "
              "(default: the built-in SmolLM2-135M-Instruct + Engram).")
