"""Data files the course ships: the text corpus and the trained tiny-GPT checkpoints."""
