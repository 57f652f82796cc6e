"""Text rules shared by every consumer: chat rendering, the fact-sentence rules, token rules
read from the tokenizer. Depends on nothing else in the package.
"""
