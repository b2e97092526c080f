"""Serve a trained model on Ray Serve: JSON API, streamed denoising states, OpenAI's completions and a live page.

    mdlm serve                                                 # models:/mdlm@current on 127.0.0.1:8000
    mdlm serve serve.model=runs/ray/cpu-demo/model             # the main job's exported model
    mdlm serve serve.max_batch_size=32 serve.port=8001
    mdlm serve serve.model=s3://bucket/model serve.device=cuda serve.num_replicas=2 serve.host=0.0.0.0
    serve run mdlm.serve.app:build_app model=runs/ray/cpu-demo/model   # Serve's own CLI, the same settings
    serve run cluster/serve.yaml                               # ... or a Serve config

Settings are the config tree's ``serve`` section (mdlm/serve/settings.py: limits, batching, replicas). Listens on
127.0.0.1:8000 unless serve.host/serve.port say otherwise. Ctrl-C stops it; with --detach on a running cluster
(RAY_ADDRESS set) the app keeps running after this command exits.
(``python pipelines/serve.py ...`` is the same command.)
"""

from __future__ import annotations

import os
import signal
import sys
import time

from mdlm.cli import config_parser, load_config_or_exit
from mdlm.output import setup_output


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = config_parser(__doc__, default_preset="cpu-ray", prog=prog)
    parser.add_argument("--detach", action="store_true", help="deploy and exit (the cluster keeps serving)")
    args = parser.parse_args(argv)
    setup_output(verbose=args.verbose)
    settings = load_config_or_exit(args.preset, args.overrides).serve

    from mdlm.serve.app import build_app

    try:
        app = build_app(settings)
    except FileNotFoundError as exc:
        print(f"error: serve.{exc}", file=sys.stderr)
        return 2

    from ray import serve

    from mdlm.runtime import init_ray

    joined = bool(os.environ.get("RAY_ADDRESS"))  # else init_ray starts a local Ray that ends with this process
    init_ray()
    serve.start(http_options={"host": settings.host, "port": settings.port})
    try:
        serve.run(app, name=settings.app_name, route_prefix="/")
    except Exception as exc:  # the replica failed to start (bad weights, no GPU...): say why and stop
        print(f"error: the service did not start: {exc}", file=sys.stderr)
        serve.shutdown()
        return 1
    if not args.detach:
        signal.signal(signal.SIGTERM, _stop)  # `kill PID` shuts down as cleanly as Ctrl-C (installed after Ray's)
    url = f"http://{settings.host}:{settings.port}"
    print(f"serving {settings.model}\n  page:     {url}/\n  API docs: {url}/docs\n  OpenAI:   base_url={url}/v1\n"
          f"  try:      curl -s {url}/v1/generate -H 'Content-Type: application/json' "
          "-d '{\"prompt\": \"To be\", \"length\": 64, \"steps\": 64}'", flush=True)
    if args.detach:
        return 0
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        _stop_serving(settings.app_name, joined)
    return 0


def _stop_serving(app_name: str, joined: bool) -> None:
    """On a cluster this process joined, delete this application only (other applications keep serving);
    on the local Ray it started, stop Ray, Serve with it (``serve.shutdown()`` there has Ray print a failed
    ``graceful_shutdown`` retry of the controller it kills)."""
    import ray
    from ray import serve

    if joined:
        serve.delete(app_name)
    else:
        ray.shutdown()


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt

