"""Names an agent's transport uses: its buffers and the tags that label arrivals.

Every node names a model's stream buffer and a pipeline's hidden-state buffers the same way, so a
send lands in the same-named buffer of its peer; an arrival's tag tells the receiving agent what
came: a model chunk (``<model>|<chunk>``), a stage's input (``h|...``) or shipped KV (``kv|...``).
"""

from __future__ import annotations

HIDDEN_PREFIX = "h|"
KV_PREFIX = "kv|"


def buffer_name(model: str) -> str:
    """Transport buffer holding ``model``'s whole byte stream (same name on every node)."""
    return f"{model}/stream"


def chunk_tag(model: str, chunk: int) -> str:
    """Tag of an arrival of chunk ``chunk`` of ``model``."""
    return f"{model}|{chunk}"


def parse_tag(tag: str) -> tuple[str, int]:
    """(model, chunk) of a :func:`chunk_tag`."""
    model, _, c = tag.rpartition("|")
    return model, int(c)


def hidden_buffer(pipeline: str, boundary: int) -> str:
    """Transport buffer of the hidden states crossing into stage ``boundary`` of ``pipeline``."""
    return f"pipe/{pipeline}/h{boundary}"


def hidden_tag(pipeline: str, step: int, index: int) -> str:
    """Tag of the hidden states entering stage ``index`` at ``step``."""
    return f"{HIDDEN_PREFIX}{pipeline}|{step}|{index}"


def kv_tag(buffer: str) -> str:
    """Tag of shipped KV in ``buffer`` (the controller sequences it; the receiver ignores the arrival)."""
    return f"{KV_PREFIX}{buffer}"
