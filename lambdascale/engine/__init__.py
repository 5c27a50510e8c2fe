"""Inference engine: stages over block ranges with their own KV cache, continuous batching,
pure seeded sampling, streaming (sync and asyncio). See docs/arch/engine.md.

Modules: ``stage`` (the stage API λPipe composes), ``kv_cache``, ``scheduler`` (pure),
``runner``, ``sampling``, ``sequence`` (TokenState, RequestOutput), ``engine`` (the loop),
``async_engine``, ``cli`` (``lambdascale generate``). Nothing heavy is imported here.
"""
