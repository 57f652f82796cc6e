"""Running a MODEL_DIR: model loading, the llama.cpp and torch backends, the session (prompt ->
text), sampling, perplexity.
"""
