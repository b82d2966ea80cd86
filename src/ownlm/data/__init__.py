"""The data stage: corpus records (`id`, `text`, `meta`), readers for user data, and the embedded
default corpus, so every later stage reads one simple format whatever the text came from."""
