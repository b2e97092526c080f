"""Serving: a Ray Serve application that hosts a trained model for generation, scoring and a live page.

``settings`` (limits and deployment options) -> ``schemas`` (request bodies) -> ``engine`` (the model side,
no Ray) -> ``app`` (FastAPI ingress, dynamic batching, streaming, the Serve deployment).
"""
