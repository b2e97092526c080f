"""Serve a trained model on Ray Serve: JSON API, streamed denoising states and a live page.

    python pipelines/serve.py --model runs/ray/cpu-demo/model          # the main job's exported model
    python pipelines/serve.py --model models:/mdlm@current max_batch_size=32 port=8001
    python pipelines/serve.py --model s3://bucket/model device=cuda num_replicas=2 host=0.0.0.0
    serve run cluster/serve.yaml                                       # the same app from a Serve config

Settings are ``key=value`` (see mdlm/serve/settings.py: limits, batching, replicas). Listens on
127.0.0.1:8000 unless host/port say otherwise. Ctrl-C stops it; with --detach on a running cluster
(RAY_ADDRESS set) the app keeps running after this script exits.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

from mdlm.cli import add_verbose_flag
from mdlm.config import ConfigError, parse_override
from mdlm.output import setup_output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("settings", nargs="*", help="service settings key=value")
    parser.add_argument("--model", help="model directory, fsspec URL, models:/NAME@ALIAS or runs:/ID/model")
    parser.add_argument("--name", default="mdlm", help="Serve application name")
    parser.add_argument("--detach", action="store_true", help="deploy and exit (the cluster keeps serving)")
    add_verbose_flag(parser)
    args = parser.parse_args(argv)
    setup_output(verbose=args.verbose)

    from mdlm.serve.app import build_app
    from mdlm.serve.settings import serve_config_from_dict

    try:
        values: dict = {}
        for text in args.settings:
            values.update(parse_override(text))
        if args.model:
            values["model"] = args.model
        settings = serve_config_from_dict(values)
        app = build_app(settings.to_dict())
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from ray import serve

    from mdlm.runtime import init_ray

    init_ray()
    serve.start(http_options={"host": settings.host, "port": settings.port})
    try:
        serve.run(app, name=args.name, route_prefix="/")
    except Exception as exc:  # the replica failed to start (bad weights, no GPU...): say why and stop
        print(f"error: the service did not start: {exc}", file=sys.stderr)
        serve.shutdown()
        return 1
    url = f"http://{settings.host}:{settings.port}"
    print(f"serving {settings.model}\n  page:     {url}/\n  API docs: {url}/docs\n  OpenAI:   base_url={url}/v1\n"
          f"  try:      curl -s {url}/v1/generate -H 'Content-Type: application/json' "
          "-d '{\"prompt\": \"To be\", \"length\": 64, \"steps\": 64}'", flush=True)
    if args.detach:
        return 0
    signal.signal(signal.SIGTERM, _stop)  # `kill PID` shuts down as cleanly as Ctrl-C
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        serve.shutdown()
    return 0


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
