"""The main job as users run it: ``python pipelines/train.py`` on the default corpus, MLflow contents, bad input,
a NaN stop, and ``ray job submit`` against a local head node."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.n_layers=2", "model.hidden_size=32", "model.n_heads=2", "model.cond_dim=16",
         "training.global_batch_size=16", "training.micro_batch_size=8", "training.log_every=2",
         "run.checkpoint_every=2", "run.eval_batches=2", "sampling.steps=8", "sampling.num_samples=2",
         "sampling.length=32", "data.max_files=2", "data.tokenizer_vocab_size=300",
         "data.validation_fraction=0.3", "data.test_fraction=0.1"]


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(MLFLOW_DISABLE_TELEMETRY="true", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    return env


def _train(tmp_path: Path, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    args = [sys.executable, str(ROOT / "pipelines" / "train.py"), *SMALL,
            f"run.storage_path={tmp_path / 'runs' / 'ray'}", f"data.output_dir={tmp_path / 'data'}", *overrides]
    return subprocess.run(args, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=timeout)


def test_main_job_end_to_end(tmp_path):
    out = _train(tmp_path, "training.max_steps=4", "run.name=e2e")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (tmp_path / "data" / "manifest.json").is_file(), "the default corpus was not prepared on first use"
    model_dir = tmp_path / "runs" / "ray" / "e2e" / "model"
    assert sorted(p.name for p in model_dir.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                           "special_tokens_map.json", "tokenizer.json",
                                                           "tokenizer_config.json"]
    card = (model_dir / "README.md").read_text()
    assert "| optimizer steps | 4 |" in card and "| workers | 2 |" in card and "| val_nelbo |" in card
    assert "--- sample 0 ---" in out.stdout and "mlflow ui --backend-store-uri sqlite:///" in out.stdout
    run_id = out.stdout.split("MLflow run:")[1].split()[0]

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["run.name"] == "e2e" and run.data.params["model.kind"] == "mdlm"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [2, 4]
    assert client.get_metric_history(run_id, "val_nelbo")
    artifacts = {a.path for folder in ("run", "samples") for a in client.list_artifacts(run_id, folder)}
    assert {"run/config.yaml", "run/manifest.json", "samples/samples.txt"} <= artifacts
    # The training curves, drawn from the run's metric history, as a PNG figure on the run.
    assert [a.path for a in client.list_artifacts(run_id, "plots")] == ["plots/training_curves.png"]
    png = client.download_artifacts(run_id, "plots/training_curves.png", str(tmp_path))
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    version = client.get_model_version_by_alias("mdlm", "current")
    assert version.run_id == run_id
    # The prepared data is the run's dataset input, its digest the manifest fingerprint.
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    [dataset] = run.inputs.dataset_inputs
    assert dataset.dataset.digest == manifest["fingerprint"] and dataset.dataset.name == "data"
    # The registered model is an MLflow pyfunc model (a LoggedModel carrying the run's final metrics).
    import mlflow

    from mdlm.tracking import fluent_tracking_uri

    with fluent_tracking_uri(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"):
        texts = mlflow.pyfunc.load_model("models:/mdlm@current").predict(["ROMEO."], params={"steps": 4, "seed": 0})
        logged = mlflow.get_logged_model(version.source.removeprefix("models:/"))
    assert len(texts) == 1 and texts[0].startswith("ROMEO.")
    assert logged.source_run_id == run_id and "final_val_nelbo" in {m.key for m in logged.metrics}
    import mdlm

    model = mdlm.load_pretrained(model_dir)
    assert model.generate("ROMEO.\n", num_samples=1, length=24, steps=4, seed=0)[0].startswith("ROMEO.")

    # The AR baseline trains through the same script into the same experiment.
    ar = _train(tmp_path, "training.max_steps=2", "run.name=e2e-ar", "model.kind=ar", "run.registered_model=null")
    assert ar.returncode == 0, ar.stderr[-3000:]
    runs = client.search_runs([run.info.experiment_id])
    assert {r.data.params["model.kind"] for r in runs} == {"mdlm", "ar"}


def test_bad_config_and_missing_data_fail_before_training(tmp_path):
    out = _train(tmp_path, "run.num_workers=0")
    assert out.returncode == 2 and "run.num_workers" in out.stderr
    out = _train(tmp_path, "data.source=/nonexistent/corpus.txt", "training.max_steps=2")
    assert out.returncode == 1
    assert "prepare_data.py" in out.stderr and "/nonexistent/corpus.txt" in out.stderr
    assert not (tmp_path / "runs" / "ray").exists() or not any((tmp_path / "runs" / "ray").iterdir())


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    out = _train(tmp_path, "training.max_steps=20", "run.name=nan", "run.checkpoint_every=1", "training.lr=1e30",
                 "training.grad_clip=0", "training.warmup_steps=0", "run.max_failures=0")
    assert out.returncode == 1
    assert "non-finite loss" in out.stderr
    checkpoints = sorted(p for p in (tmp_path / "runs" / "ray" / "nan").glob("checkpoint_*") if p.is_dir())
    assert checkpoints, "the last good checkpoint was not kept"
    state = json.loads((checkpoints[-1] / "train_state.json").read_text())
    assert 1 <= state["progress"]["step"] < 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


README_CLUSTER_COMMANDS = [  # README.md, "Against a running cluster" (comments dropped, continuations joined)
    "export RAY_AUTH_MODE=token",
    "ray get-auth-token --generate > /dev/null",
    "ray start --head --num-cpus 2",
    "ray job submit --address http://127.0.0.1:8265 -- python pipelines/train.py run.storage_path=$PWD/runs/ray "
    "data.output_dir=$PWD/data/prepared/shakespeare-bpe1024-128",
]


def _readme_cluster_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text[text.index("Against a running cluster"):].split("```bash\n", 1)[1].split("```", 1)[0]
    commands, pending = [], ""
    for line in block.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
        elif line:
            commands.append(pending + line)
            pending = ""
    return commands


def _processes() -> dict[tuple[int, str], tuple[int, str, str]]:
    """Live (not zombie) processes: (pid, start time) -> (parent pid, state, command line), from /proc."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ..., starttime (field 22)
        if fields[0] not in ("Z", "X"):
            out[(int(entry), fields[19])] = (int(fields[1]), fields[0], cmdline.strip())
    return out


def _descendants(root: int, table: dict) -> set[tuple[int, str]]:
    children: dict[int, list[tuple[int, str]]] = {}
    for key, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(key)
    found, todo = set(), [root]
    while todo:
        for key in children.get(todo.pop(), []):
            if key not in found:
                found.add(key)
                todo.append(key[0])
    return found


def _stop_group(head: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM to the head's process group (``ray start --block`` takes its Ray processes down with it), then
    SIGKILL whatever of the group is still alive after ``timeout``."""
    pgid = head.pid  # start_new_session: the head leads its own process group
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_pgid(pid) == pgid for pid, _ in _processes()):
            return
        time.sleep(1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    head.wait(timeout=30)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def test_ray_job_submit_against_a_local_head(tmp_path):
    """The README's commands, as written, against a head with Ray's default token authentication: a private HOME
    (the token file is the test's own), private ports and temp dir (other Ray clusters on the machine are neither
    joined nor stopped), and only this head's process group is stopped afterwards."""
    commands = _readme_cluster_commands()
    assert commands == README_CLUSTER_COMMANDS, "README's cluster commands changed: update this test"
    export, generate, start, submit = commands

    auth_vars = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")  # the README's commands decide
    env = {k: v for k, v in _env(tmp_path).items() if k not in auth_vars}
    env["HOME"] = str(tmp_path / "home")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `ray` and `python` of this venv
    (tmp_path / "home").mkdir()
    name, value = export.removeprefix("export ").split("=", 1)
    env[name] = value

    def shell(command: str, timeout: int = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", command], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=timeout)

    out = shell(generate)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "home" / ".ray" / "auth_token").is_file()

    port, dashboard, client, agent = (_free_port() for _ in range(4))
    address = f"http://127.0.0.1:{dashboard}"
    # A short private temp dir: socket paths stay under the Unix limit, and /tmp/ray/ray_current_cluster (which a
    # plain ray.init() joins) is left alone.
    temp_dir = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")
    flags = (f" --block --port={port} --dashboard-host=127.0.0.1 --dashboard-port={dashboard}"
             f" --ray-client-server-port={client} --dashboard-agent-listen-port={agent} --include-dashboard=true"
             f" --disable-usage-stats --temp-dir={temp_dir}")
    before = set(_processes())
    log = (tmp_path / "head.log").open("w")
    # cwd: the repository root, like a user's shell; the job's driver runs there, so pipelines/train.py resolves.
    head = subprocess.Popen(["bash", "-c", "exec " + start + flags], env=env, cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    ours: set[tuple[int, str]] = set()
    try:
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in (tmp_path / "head.log").read_text():
            assert head.poll() is None and time.monotonic() < deadline, (tmp_path / "head.log").read_text()[-3000:]
            time.sleep(1)

        job = submit.replace("http://127.0.0.1:8265", address) + " " + " ".join(
            [*SMALL, "training.max_steps=2", "run.name=submitted", "run.registered_model=null"])
        out = shell(job, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "succeeded" in out.stdout.lower()
        assert (tmp_path / "runs" / "ray" / "submitted" / "model" / "model.safetensors").is_file()
        job_id = re.search(r"Job '([^']+)' succeeded", out.stdout).group(1)
        status = shell(f"ray job status --address {address} {job_id}")
        assert status.returncode == 0 and "succeeded" in status.stdout.lower(), status.stdout + status.stderr
        logs = shell(f"ray job logs --address {address} {job_id}")
        assert logs.returncode == 0 and "--- sample 0 ---" in logs.stdout, logs.stdout[-3000:] + logs.stderr
        # The token is what lets the CLI in: without RAY_AUTH_MODE=token it is refused.
        refused = shell(f"env -u RAY_AUTH_MODE ray job status --address {address} {job_id}")
        assert refused.returncode != 0 and "Authentication required" in refused.stdout + refused.stderr
    finally:
        table = _processes()
        ours = (_descendants(head.pid, table) | {k for k in table if k[0] == head.pid}) - before
        _stop_group(head)
        log.close()
        deadline = time.monotonic() + 60
        while True:
            left = {k: v[2] for k, v in _processes().items() if k in ours or temp_dir in v[2]}
            if not left or time.monotonic() > deadline:
                break
            time.sleep(1)
        for pid, _ in left:  # the test's own leftovers (pid and start time matched just above): kill, then fail
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert ours, "the head's Ray processes were not seen"
    assert not left, f"Ray processes of this test left running: {left}"
