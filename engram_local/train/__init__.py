"""Training: the Engram retrofit, its corpus, the shared skill adapter.
"""
