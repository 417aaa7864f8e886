"""A chat session apart from the terminal: the conversation and slash commands (`session.py`) and the
OpenAI-compatible client it streams from (`client.py`). Standard library only; the terminal side is
`vmetal.cli.chat`."""
