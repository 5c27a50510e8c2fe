"""Llama-family model, block plan, checkpoint format and importers."""
