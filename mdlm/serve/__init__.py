"""Serving: a Ray Serve application that hosts a trained model for generation, scoring and a live page.

``settings`` (limits and deployment options) -> ``schemas`` (request bodies), ``responses`` and ``errors`` ->
``engine`` (the model side, no Ray) -> ``openai_schemas`` and ``openai_api`` (OpenAI's completions on the
engine) -> ``app`` (FastAPI ingress, dynamic batching, streaming, the Serve deployment).
"""
