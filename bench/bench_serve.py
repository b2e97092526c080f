"""Serving throughput with concurrent HTTP clients, in one run: no batching, request batching and continuous
batching on the same Ray Serve application, cores and traffic; plus the service's overhead against the engine.

    python bench/bench_serve.py [--traffic mixed|uniform] [--model DIR] [--clients 32] [--requests 4]
                                [--length 128] [--steps 128] [--batch 32] [--cpus 2] [--output FILE]

Sides, one replica each: ``no batching`` (``batching=request``, ``max_batch_size=1``: requests one at a time),
``request batching`` (``batching=request``, ``max_batch_size=--batch``: identical unseeded requests share one
sampler call) and ``continuous`` (``batching=continuous``: every running request joins the next forward pass,
mdlm.serve.continuous). Each client sends ``--requests`` generate requests back to back. ``uniform`` traffic: every
request is ``--length`` tokens, ``--steps`` steps, the cached sampler, no seed. ``mixed``: lengths L/4..L, steps
L/4..L, all five step-taking samplers, every other request seeded (the list is fixed, so every side gets the same
requests). Reported per side: requests/s, sample tokens/s (each sample's length), p50/p99 latency and the mean
batch (request batching: requests per sampler call; continuous: requests per forward pass, averaged over each
request's passes).
Overhead: the continuous side's tokens/s over the engine's (the same requests through ``Engine.run_continuous``
in this process, the same number of concurrent threads and torch threads, no Ray or HTTP); goal >= 0.9.
Without ``--model`` a demo-sized model is built with random weights (the shape of the main job's 'cpu-ray' model;
sampling cost does not depend on the weights' values).
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


def traffic(kind: str, count: int, length: int, steps: int, sampler: str) -> list[dict]:
    """The request bodies, in the order the clients send them (client c sends bodies c, c + clients, ...)."""
    if kind == "uniform":
        return [{"length": length, "steps": steps, "sampler": sampler} for _ in range(count)]
    lengths = [length // 4, length // 2, 3 * length // 4, length]
    samplers = ["ancestral", "cached", "first_hitting", "confidence_k", "remdm"]
    bodies = []
    for i in range(count):
        size = lengths[i % 4]
        body = {"length": size, "steps": max(1, size // (1, 2, 4)[i % 3]), "sampler": samplers[i % 5]}
        if i % 2:
            body["seed"] = i
        bodies.append(body)
    return bodies


def _summary(latencies: list[float], batches: list[float], tokens: int, wall: float) -> dict:
    latencies = sorted(latencies)
    return {"requests": len(latencies), "wall_s": wall, "requests_per_s": len(latencies) / wall,
            "tokens_per_s": tokens / wall, "p50_s": statistics.median(latencies),
            "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "mean_batch": statistics.fmean(batches)}


def _batch_size(response: dict) -> float:
    batch = response["batch"]
    return batch.get("mean_requests_per_pass") or batch["requests"]


def load(url: str, bodies: list[dict], clients: int) -> dict:
    """``clients`` threads send ``bodies`` (client c: bodies c, c + clients, ...) back to back."""
    latencies: list[float] = []
    batches: list[float] = []
    errors: list[str] = []
    tokens = [0]
    lock = threading.Lock()

    def client(c: int) -> None:
        session = requests.Session()
        for body in bodies[c::clients]:
            started = time.perf_counter()
            response = session.post(url, json=body, timeout=600)
            elapsed = time.perf_counter() - started
            with lock:
                if response.status_code != 200:
                    errors.append(response.text[:200])
                else:
                    latencies.append(elapsed)
                    batches.append(_batch_size(response.json()))
                    tokens[0] += body["length"]

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return _summary(latencies, batches, tokens[0], wall)


def engine_load(model_dir: str, bodies: list[dict], clients: int, threads: int, settings: dict) -> dict:
    """The continuous side's requests through the engine in this process: no Ray, no HTTP, same concurrency."""
    import torch

    from mdlm.modeling import load_pretrained
    from mdlm.serve.engine import Engine
    from mdlm.serve.schemas import GenerateRequest
    from mdlm.serve.settings import serve_config_from_dict

    torch.set_num_threads(threads)
    engine = Engine(load_pretrained(model_dir), serve_config_from_dict({"model": model_dir, **settings}))
    jobs = [engine.plan_generate(GenerateRequest(**body)) for body in bodies]
    for job in jobs[:2]:  # warm-up
        engine.run_continuous(job)
    latencies: list[float] = []
    batches: list[float] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        for job in jobs[c::clients]:
            started = time.perf_counter()
            result = engine.run_continuous(job)
            with lock:
                latencies.append(time.perf_counter() - started)
                batches.append(_batch_size(result))

    workers = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    started = time.perf_counter()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    wall = time.perf_counter() - started
    engine.batcher.close()
    return _summary(latencies, batches, sum(b["length"] for b in bodies), wall)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traffic", choices=["mixed", "uniform"], default="mixed")
    parser.add_argument("--model", help="model directory (default: a demo-sized model with random weights)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--batch", type=int, default=32, help="max_batch_size of the request-batching side")
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=128, help="uniform traffic's steps")
    parser.add_argument("--sampler", default="cached", help="uniform traffic's sampler")
    parser.add_argument("--cpus", type=int, default=2, help="Ray CPUs and torch threads")
    parser.add_argument("--sides", nargs="+", default=["no batching", "request batching", "continuous"],
                        choices=["no batching", "request batching", "continuous"])
    parser.add_argument("--output", default=None, help="JSON results file")
    args = parser.parse_args()

    import ray
    from ray import serve

    from mdlm.serve.app import build_app

    bodies = traffic(args.traffic, args.clients * args.requests, args.length, args.steps, args.sampler)
    common = {"batch_wait_timeout_s": 0.05, "num_cpus": 1, "max_num_samples": 1, "torch_threads": args.cpus,
              "max_batch_rows": max(args.clients, 1)}
    sides = {"no batching": {"batching": "request", "max_batch_size": 1},
             "request batching": {"batching": "request", "max_batch_size": args.batch},
             "continuous": {"batching": "continuous", "max_batch_size": args.batch}}
    results = {}
    with tempfile.TemporaryDirectory(prefix="mdlm-bench-serve-") as tmp:
        model = args.model or str(demo_model(Path(tmp) / "model"))
        per_row = forward_cost_per_row(model, args.length, args.batch, args.cpus)
        engine = None
        if "continuous" in args.sides:
            engine = engine_load(model, bodies, args.clients, args.cpus, {**common, **sides["continuous"]})
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}/v1/generate"
        try:
            for name in args.sides:
                serve.run(build_app({"model": model, **common, **sides[name]}), name="bench", route_prefix="/")
                load(url, bodies[:2], 2)  # warm-up
                results[name] = load(url, bodies, args.clients)
                serve.delete("bench")
        finally:
            serve.shutdown()
            ray.shutdown()
    print(f"{args.clients} clients x {args.requests} requests, {args.traffic} traffic (length {args.length}"
          + (f", {args.steps} steps, {args.sampler}" if args.traffic == "uniform" else " max") + f"), 1 replica on "
          f"{args.cpus} cores")
    print(f"{'':18}{'req/s':>8}{'tokens/s':>10}{'p50 s':>8}{'p99 s':>8}{'mean batch':>12}")
    for name, r in {**results, **({"engine (no Serve)": engine} if engine else {})}.items():
        print(f"{name:18}{r['requests_per_s']:8.2f}{r['tokens_per_s']:10.0f}{r['p50_s']:8.2f}"
              f"{r['p99_s']:8.2f}{r['mean_batch']:12.1f}")
    ratios = {}
    base = results.get("no batching")
    for name in ("request batching", "continuous"):
        if base and name in results:
            ratios[f"{name} / no batching"] = results[name]["tokens_per_s"] / base["tokens_per_s"]
    if "request batching" in results and "continuous" in results:
        ratios["continuous / request batching"] = (results["continuous"]["tokens_per_s"]
                                                   / results["request batching"]["tokens_per_s"])
    if engine and "continuous" in results:
        ratios["service overhead: continuous / engine"] = results["continuous"]["tokens_per_s"] / engine["tokens_per_s"]
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}" + ("  (goal >= 0.9)" if name.startswith("service") else ""))
    ceiling = per_row[1] / per_row[args.batch]
    print(f"denoiser forward per row: {per_row[1] * 1e3:.2f} ms at batch 1, {per_row[args.batch] * 1e3:.2f} ms "
          f"at batch {args.batch}: batching can save at most {ceiling:.2f}x of the model's work on these cores")
    if args.output:
        record = {"args": vars(args), "results": results, "engine": engine, "ratios": ratios,
                  "forward_s_per_row": per_row, "machine": platform.platform(), "date": time.strftime("%Y-%m-%d")}
        Path(args.output).write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
