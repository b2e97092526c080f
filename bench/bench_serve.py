"""Serving throughput: dynamic batching vs no batching, with 32 concurrent HTTP clients, in one run.

    python bench/bench_serve.py [--model DIR] [--clients 32] [--requests 4] [--length 128] [--steps 128]

Both sides are the same Ray Serve application on the same cores, one replica; the only difference is
``max_batch_size`` (``--batch`` vs 1: requests one at a time). Each client sends ``--requests`` generate
requests back to back. Without ``--model`` a demo-sized model is built with random weights (the shape of the
main job's 'cpu-ray' model; sampling cost does not depend on the weights' values).
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdlm.config import load_config
from mdlm.data.spec import DataSpec, resolve_model_config
from mdlm.data.tokenizer import special_tokens_for, train_bpe
from mdlm.modeling import build_model


def demo_model(path: Path) -> Path:
    config = load_config("cpu-ray")
    texts = [f"line {i}: to be, or not to be, that is the question of {i * 7919 % 1000}" for i in range(2000)]
    tokenizer = train_bpe(texts, config.data.tokenizer_vocab_size)
    spec = DataSpec.from_special(special_tokens_for(tokenizer, "bpe"), config.data.block_size)
    build_model(resolve_model_config(config.model, spec), config.noise, tokenizer=tokenizer).save_pretrained(path)
    return path


def forward_cost_per_row(model_dir: str, length: int, batch: int, threads: int) -> dict[int, float]:
    """Seconds per row of one denoiser forward at batch 1 and at ``batch``: the most batching can give here."""
    import torch

    from mdlm.modeling import load_pretrained

    torch.set_num_threads(threads)
    model = load_pretrained(model_dir)
    out = {}
    for size in (1, batch):
        z = torch.full((size, length), model.mask_id)
        t = torch.ones(size)
        with torch.inference_mode():
            model.backbone(z, t)
            reps = max(3, 64 // size)
            started = time.perf_counter()
            for _ in range(reps):
                model.backbone(z, t)
        out[size] = (time.perf_counter() - started) / reps / size
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(url: str, body: dict, clients: int, per_client: int) -> dict:
    """``clients`` threads each send ``per_client`` requests back to back; returns throughput and latency."""
    latencies: list[float] = []
    batch_sizes: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        session = requests.Session()
        for _ in range(per_client):
            started = time.perf_counter()
            response = session.post(url, json=body, timeout=600)
            elapsed = time.perf_counter() - started
            with lock:
                if response.status_code != 200:
                    errors.append(response.text[:200])
                else:
                    latencies.append(elapsed)
                    batch_sizes.append(response.json()["batch"]["requests"])

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    latencies.sort()
    return {"requests": len(latencies), "wall_s": wall, "requests_per_s": len(latencies) / wall,
            "p50_s": statistics.median(latencies), "p99_s": latencies[min(len(latencies) - 1,
                                                                          int(0.99 * len(latencies)))],
            "mean_batch": statistics.fmean(batch_sizes)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory (default: a demo-sized model with random weights)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--batch", type=int, default=32, help="max_batch_size of the batching side")
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--sampler", default="cached")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--output", default=None, help="JSON results file")
    args = parser.parse_args()

    import ray
    from ray import serve

    from mdlm.serve.app import build_app

    body = {"length": args.length, "steps": args.steps, "sampler": args.sampler}
    results = {}
    with tempfile.TemporaryDirectory(prefix="mdlm-bench-serve-") as tmp:
        model = args.model or str(demo_model(Path(tmp) / "model"))
        per_row = forward_cost_per_row(model, args.length, args.batch, args.cpus)
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}/v1/generate"
        try:
            for name, batch in (("no batching", 1), ("batching", args.batch)):
                serve.run(build_app({"model": model, "max_batch_size": batch, "batch_wait_timeout_s": 0.05,
                                     "num_cpus": 1, "max_num_samples": 1}), name="bench", route_prefix="/")
                load(url, body, 2, 1)  # warm-up
                results[name] = load(url, body, args.clients, args.requests)
                serve.delete("bench")
        finally:
            serve.shutdown()
            ray.shutdown()
    ratio = results["batching"]["requests_per_s"] / results["no batching"]["requests_per_s"]
    print(f"{args.clients} clients x {args.requests} requests, length {args.length}, {args.steps} steps, "
          f"{args.sampler} sampler, 1 replica on {args.cpus} cores")
    print(f"{'':14}{'req/s':>8}{'tokens/s':>10}{'p50 s':>8}{'p99 s':>8}{'mean batch':>12}")
    for name, r in results.items():
        print(f"{name:14}{r['requests_per_s']:8.2f}{r['requests_per_s'] * args.length:10.0f}{r['p50_s']:8.2f}"
              f"{r['p99_s']:8.2f}{r['mean_batch']:12.1f}")
    print(f"throughput ratio batching / no batching: {ratio:.2f}  (target >= 8)")
    ceiling = per_row[1] / per_row[args.batch]
    print(f"denoiser forward per row: {per_row[1] * 1e3:.2f} ms at batch 1, {per_row[args.batch] * 1e3:.2f} ms "
          f"at batch {args.batch}: batching can save at most {ceiling:.2f}x of the model's work on these cores")
    if args.output:
        record = {"args": vars(args), "results": results, "ratio": ratio, "forward_s_per_row": per_row,
                  "machine": platform.platform(), "date": time.strftime("%Y-%m-%d")}
        Path(args.output).write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
