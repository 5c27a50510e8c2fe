"""The gateway's HTTP surface, one module per endpoint family, each a small handler class.

``completions`` and ``chat`` (``POST /v1/completions``, ``POST /v1/chat/completions``) share
``generation``: admission, the first token awaited before the headers, text deltas with stop
strings, JSON or SSE. ``models`` serves ``/v1/models``, ``admin`` the ``/admin`` API, ``health``
``/health`` and ``/metrics``. ``state`` holds what the handlers share per app, ``auth`` the bearer
key checks, ``errors`` the OpenAI error envelope for every failure. ``serve.app.create_app`` wires
these together; nothing here imports it.
"""
