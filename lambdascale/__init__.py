"""lambdascale: serverless LLM inference whose edge is fast scaling.

The package tree mirrors the architecture (see docs/ARCHITECTURE.md):
model -> store -> transfer -> pipe -> engine -> control -> runtime -> serve, and sim beside them.
Heavy optional backends (nixl, ray, matplotlib, transformers) are imported where used.
"""

__version__ = "0.1.0"
