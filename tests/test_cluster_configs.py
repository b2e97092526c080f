"""cluster/: Ray autoscaler YAMLs, KubeRay manifests and Serve configs, checked offline.

Every YAML parses; autoscaler configs pass Ray's own schema and config preparation; KubeRay resources carry the
fields KubeRay needs and the installed Ray version; Serve configs pass Serve's schema and name the mdlm
application; every ``python .../pipelines/X.py ...`` command anywhere in cluster/ names a script of this
repository and its ``--preset`` and ``a.b=value`` overrides pass mdlm's own config loading. The object-storage
variants (OBJECT_STORAGE) depend on no shared file system: every path they read or write is a bucket URL.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

from mdlm.cli import config_parser
from mdlm.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
AUTOSCALER = ["aws.yaml", "gcp.yaml", "aws-s3.yaml", "gcp-gcs.yaml"]
SERVE_CONFIGS = ["serve.yaml", "serve-local.yaml", "serve-s3.yaml", "serve-gcs.yaml"]
# The variants with everything on a bucket and no shared file system: file -> the URL scheme of their paths.
OBJECT_STORAGE = {"aws-s3.yaml": "s3://", "gcp-gcs.yaml": "gs://", "serve-s3.yaml": "s3://", "serve-gcs.yaml": "gs://",
                  "kuberay/shared-s3.yaml": "s3://", "kuberay/rayjob-train-s3.yaml": "s3://",
                  "kuberay/rayservice-s3.yaml": "s3://"}
SHARED_ROOT = "/mnt/shared/"  # where the other configs mount the shared file system
KUBERAY_KINDS = {"RayCluster", "RayJob", "RayService"}
SERVE_IMPORT_PATH = "mdlm.serve.app:build_app"
SERVE_ARGS = {"model", "device", "max_batch_size", "batch_wait_timeout_s", "num_cpus"}  # used by the configs
SERVE_DEPLOYMENT = "MDLMService"
REMOTE_PROJECT = "/home/ray/mdlm"  # where the configs put the repository on the nodes


def yaml_files() -> list[Path]:
    return sorted(CLUSTER.rglob("*.yaml"))


def load_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kuberay_docs() -> list[tuple[str, dict[str, Any]]]:
    return [(f"{path.relative_to(CLUSTER)}:{doc['kind']}", doc) for path in yaml_files() for doc in load_docs(path)
            if isinstance(doc, dict) and str(doc.get("apiVersion", "")).startswith("ray.io/")]


def strings(node: Any) -> list[str]:
    """Every string value in a parsed YAML document."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for value in node.values() for s in strings(value)]
    if isinstance(node, list):
        return [s for value in node for s in strings(value)]
    return []


def text_lines(text: str, comments_only: bool = False) -> list[str]:
    """Lines of a file with comment markers dropped and backslash continuations joined (shell in comments and
    Markdown code blocks); ``comments_only``: just the comment lines (YAML values are read parsed)."""
    out: list[str] = []
    pending = ""
    for raw in text.splitlines():
        if comments_only and not raw.lstrip().startswith("#"):
            continue
        line = re.sub(r"^\s*#\s?", "", raw).strip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    if pending:
        out.append(pending)
    return out


PIPELINE_COMMAND = re.compile(r"\bpython3?\s+(\S*pipelines/[\w-]+\.py)((?:\s+[^\s&;|]+)*)")


def commands_in(path: Path) -> list[tuple[str, list[str]]]:
    """(script path as written, arguments) of every pipelines/ command in one file of cluster/ (YAML string
    values, comments, README code), deduplicated."""
    texts = text_lines(path.read_text(), comments_only=path.suffix == ".yaml")
    if path.suffix == ".yaml":
        for doc in load_docs(path):
            for value in strings(doc):
                texts.append(" ".join(value.split()))
                if value.lstrip().startswith(("applications:", "http_options:")):  # serveConfigV2
                    texts += [" ".join(s.split()) for s in strings(yaml.safe_load(value))]
    seen, out = set(), []
    for text in texts:
        for match in PIPELINE_COMMAND.finditer(text):
            key = (match.group(1), match.group(2).strip())
            if key not in seen:
                seen.add(key)
                out.append((match.group(1), shlex.split(match.group(2))))
    return out


def pipeline_commands() -> list[tuple[str, str, list[str]]]:
    """(where, script path as written, arguments) of every pipelines/ command in cluster/, deduplicated."""
    seen, out = set(), []
    for path in sorted(p for p in CLUSTER.rglob("*") if p.is_file()):
        for script, argv in commands_in(path):
            if (script, tuple(argv)) not in seen:
                seen.add((script, tuple(argv)))
                out.append((str(path.relative_to(CLUSTER)), script, argv))
    return out


def script_parser(script: Path):
    """The script's CLI: mdlm.cli.config_parser with its command's default preset plus the options it adds (the
    script runs ``main`` of an ``mdlm.commands`` module)."""
    command = re.search(r"from mdlm\.commands\.(\w+) import main", script.read_text())
    assert command, f"{script}: does not run an mdlm.commands module"
    source = (ROOT / "mdlm" / "commands" / f"{command.group(1)}.py").read_text()
    preset = re.search(r'default_preset="([^"]+)"', source)
    assert preset, f"{script}: no default_preset in config_parser(...)"
    parser = config_parser(None, preset.group(1))
    for option, rest in re.findall(r'add_argument\(\s*"(--[\w-]+)"([^)]*)\)', source):
        if 'action="store_true"' in rest:
            parser.add_argument(option, action="store_true")
        else:
            parser.add_argument(option)
    return parser


def test_every_yaml_parses():
    files = yaml_files()
    assert {p.name for p in files} >= {*AUTOSCALER, *SERVE_CONFIGS}
    for path in files:
        assert load_docs(path), f"{path}: empty"


# ---------------------------------------------------------------------------------------------------------
# Ray autoscaler configs


def autoscaler_schema() -> dict[str, Any]:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_autoscaler_configs_are_the_listed_ones():
    found = {str(p.relative_to(CLUSTER)) for p in yaml_files()
             if any(isinstance(d, dict) and "provider" in d and "available_node_types" in d for d in load_docs(p))}
    assert found == set(AUTOSCALER)


@pytest.mark.parametrize("name", AUTOSCALER)
def test_autoscaler_config_passes_rays_schema_and_preparation(name):
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / name).read_text())
    jsonschema.validate(config, autoscaler_schema())
    prepared = prepare_config(copy.deepcopy(config))  # what `ray up` does before it calls the cloud
    validate_config(prepared)
    assert prepared["provider"]["type"] == name.removesuffix(".yaml").split("-")[0]


@pytest.mark.parametrize("name", AUTOSCALER)
def test_autoscaler_node_types(name):
    config = yaml.safe_load((CLUSTER / name).read_text())
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert types[config["head_node_type"]]["resources"].get("CPU") == 0, "the head should run no tasks"
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    gpu = [k for k, v in workers.items() if v["resources"].get("GPU", 0) > 0]
    cpu = [k for k, v in workers.items() if not v["resources"].get("GPU")]
    assert gpu and cpu, "a CPU and a GPU worker group"
    for node in workers.values():
        assert node.get("min_workers", 0) == 0 and node["max_workers"] <= config["max_workers"]
    assert sum(v.get("min_workers", 0) for v in types.values()) <= config["max_workers"]
    assert "ray start --head" in " ".join(config["head_start_ray_commands"])
    assert "ray start --address=$RAY_HEAD_IP:6379" in " ".join(config["worker_start_ray_commands"])



@pytest.mark.parametrize("name", AUTOSCALER)
def test_autoscaler_cluster_runs_with_token_authentication(name):
    """Every node starts Ray with RAY_AUTH_MODE=token and the token of the machine that ran `ray up`, which the
    header tells the user to create before `ray up` (and which the Jobs CLI there reads)."""
    text = (CLUSTER / name).read_text()
    config = yaml.safe_load(text)
    assert config["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts and all(c.index("export RAY_AUTH_MODE=token;") < c.index("ray start") for c in starts), key
    header = text_lines(text, comments_only=True)
    order = [next(i for i, line in enumerate(header) if needle in line)
             for needle in ("export RAY_AUTH_MODE=token", "ray get-auth-token --generate", f"ray up cluster/{name}",
                            "ray job submit")]
    assert order == sorted(order)


def test_no_cluster_file_switches_authentication_off():
    for path in [*yaml_files(), CLUSTER / "README.md", CLUSTER / "Dockerfile"]:
        assert "RAY_AUTH_MODE=disabled" not in path.read_text(), path
        assert "mode: disabled" not in path.read_text(), path

# pip install -e of the synced project, with or without extras: -e /home/ray/mdlm or -e '/home/ray/mdlm[s3]'.
EDITABLE_INSTALL = rf"pip install --quiet -e '?{re.escape(REMOTE_PROJECT)}(\[[\w,]+\])?'?(\s|$)"


def _torch_pin() -> str:
    pin = re.search(r"^torch==(\S+)$", (ROOT / "constraints.txt").read_text(), flags=re.MULTILINE)
    assert pin, "constraints.txt pins torch"
    return pin.group(1)


@pytest.mark.parametrize("name", AUTOSCALER)
def test_autoscaler_installs_the_project_with_the_right_torch(name):
    config = yaml.safe_load((CLUSTER / name).read_text())
    pin = f"torch=={_torch_pin()}"
    assert config["file_mounts"][REMOTE_PROJECT] == "."
    cpu_setup = " ".join(config["setup_commands"])
    assert pin in cpu_setup and "download.pytorch.org/whl/cpu" in cpu_setup
    assert re.search(EDITABLE_INSTALL, cpu_setup)
    for node in config["available_node_types"].values():
        if node["resources"].get("GPU"):
            gpu_setup = " ".join(node["worker_setup_commands"])  # replaces setup_commands on GPU nodes
            assert pin in gpu_setup and "whl/cpu" not in gpu_setup and "torch.version.cuda" in gpu_setup
            assert re.search(EDITABLE_INSTALL, gpu_setup)
            assert node["docker"]["worker_image"].endswith("-gpu")
    assert not any(pattern.lstrip("/*").startswith(("data", "mdlm")) and not pattern.startswith("/")
                   for pattern in config["rsync_exclude"]), "unanchored excludes would drop mdlm/data"


def test_images_match_the_installed_ray():
    images = [s for p in [*yaml_files(), CLUSTER / "Dockerfile"] for s in re.findall(r"rayproject/ray:(\S+)",
                                                                                     p.read_text())]
    assert images
    for tag in images:
        assert tag.startswith(f"{ray.__version__}-py311-"), tag


def test_dockerfile_copies_what_exists_and_pins_torch():
    text = (CLUSTER / "Dockerfile").read_text()
    for line in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+)$", text, flags=re.M):
        *sources, _ = line.split()
        for source in sources:
            assert (ROOT / source).exists(), source
    assert f"torch=={_torch_pin()}" in text


# ---------------------------------------------------------------------------------------------------------
# Commands


def test_cluster_commands_use_existing_scripts_and_valid_overrides():
    commands = pipeline_commands()
    scripts = {Path(script).name for _, script, _ in commands}
    assert {"train.py", "prepare_data.py"} <= scripts
    assert any("run.use_gpu=true" in args for _, _, args in commands), "a GPU training command"
    for where, script, argv in commands:
        local = ROOT / "pipelines" / Path(script).name
        assert local.is_file(), f"{where}: {script} is not in the repository"
        if script.startswith("/"):
            assert script == f"{REMOTE_PROJECT}/pipelines/{local.name}", f"{where}: {script}"
        args = script_parser(local).parse_args(argv)
        assert all("=" in o for o in args.overrides), f"{where}: {argv}"
        load_config(args.preset, args.overrides)  # raises ConfigError on any unknown key or bad value
        # Multi-node: whatever the command writes or reads must be on the shared file system or a bucket.
        for key, value in _storage_paths(local.name, args.overrides).items():
            assert value.startswith((SHARED_ROOT, *URL_SCHEMES)), \
                f"{where}: {key} must be set under {SHARED_ROOT} or to a bucket URL, got {value!r}"


URL_SCHEMES = ("s3://", "gs://")


def _storage_paths(script: str, overrides: list[str]) -> dict[str, str]:
    """The paths a pipelines/ command writes or reads on several nodes (unset ones as ''): data.output_dir;
    for train.py run.storage_path, and run.export_dir when given."""
    given = dict(o.split("=", 1) for o in overrides)
    keys = ["data.output_dir"] + (["run.storage_path"] if script == "train.py" else [])
    keys += [k for k in ("run.export_dir",) if k in given]
    return {key: given.get(key, "") for key in keys}


# ---------------------------------------------------------------------------------------------------------
# KubeRay


def _cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"),
            "RayService": spec.get("rayClusterConfig")}[doc["kind"]]


def _pod_specs(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    return [cluster["headGroupSpec"]["template"]["spec"],
            *(group["template"]["spec"] for group in cluster.get("workerGroupSpecs", []))]


def test_all_kuberay_kinds_present():
    assert {doc["kind"] for _, doc in kuberay_docs()} == KUBERAY_KINDS


@pytest.mark.parametrize(("where", "doc"), kuberay_docs(), ids=[w for w, _ in kuberay_docs()])
def test_kuberay_resource(where, doc):
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] in KUBERAY_KINDS and doc["metadata"]["name"]
    cluster = _cluster_spec(doc)
    assert cluster, f"{where}: no Ray cluster spec"
    assert cluster["rayVersion"] == ray.__version__
    head = cluster["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    for group in cluster.get("workerGroupSpecs", []):
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
    gpu_groups = [g for g in cluster.get("workerGroupSpecs", [])
                  if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
                         for c in g["template"]["spec"]["containers"])]
    assert gpu_groups, f"{where}: a GPU worker group"
    for pod in _pod_specs(cluster):
        volumes = {v["name"] for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            assert container["name"] and container["image"]
            assert {m["name"] for m in container.get("volumeMounts", [])} <= volumes
            shared = any(m["mountPath"] == SHARED_ROOT.rstrip("/") for m in container.get("volumeMounts", []))
            assert shared != (where.split(":")[0] in OBJECT_STORAGE), f"{where}: {SHARED_ROOT} mounted or not"
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert env.get("MLFLOW_TRACKING_URI", "").startswith("http"), f"{where}: shared MLflow server"
    assert cluster["authOptions"] == {"mode": "token"}, f"{where}: Ray's token authentication on"
    if doc["kind"] == "RayCluster":
        assert cluster["enableInTreeAutoscaling"] is True
    if doc["kind"] == "RayJob":
        assert doc["spec"]["entrypoint"].count("pipelines/train.py") == 1
        assert "run.use_gpu=true" in doc["spec"]["entrypoint"]


def test_kuberay_volumes_name_the_shared_claim():
    claims = {doc["metadata"]["name"]: doc for path in yaml_files() for doc in load_docs(path)
              if isinstance(doc, dict) and doc.get("kind") == "PersistentVolumeClaim"}
    assert claims
    for where, doc in kuberay_docs():
        for pod in _pod_specs(_cluster_spec(doc)):
            for volume in pod.get("volumes", []):
                if "persistentVolumeClaim" in volume:
                    claim = claims.get(volume["persistentVolumeClaim"]["claimName"])
                    assert claim is not None, f"{where}: {volume}"
                    assert "ReadWriteMany" in claim["spec"]["accessModes"], "every node mounts it"


# ---------------------------------------------------------------------------------------------------------
# Serve


def serve_configs() -> list[tuple[str, dict[str, Any]]]:
    out = [(name, yaml.safe_load((CLUSTER / name).read_text())) for name in SERVE_CONFIGS]
    out += [(f"{where}.serveConfigV2", yaml.safe_load(doc["spec"]["serveConfigV2"]))
            for where, doc in kuberay_docs() if doc["kind"] == "RayService"]
    return out


@pytest.mark.parametrize(("where", "config"), serve_configs(), ids=[w for w, _ in serve_configs()])
def test_serve_config(where, config):
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)  # Serve's own validation of a deploy config
    assert len(schema.applications) == 1
    app = config["applications"][0]
    assert app["import_path"] == SERVE_IMPORT_PATH and app["route_prefix"] == "/"
    assert set(app["args"]) <= SERVE_ARGS and app["args"]["model"]
    assert app["args"]["device"] in ("cpu", "cuda")
    assert isinstance(app["args"]["max_batch_size"], int) and isinstance(app["args"]["batch_wait_timeout_s"], float)
    assert {d["name"] for d in app.get("deployments", [])} <= {SERVE_DEPLOYMENT}


@pytest.mark.parametrize(("where", "config"), serve_configs(), ids=[w for w, _ in serve_configs()])
def test_serve_args_accepted_by_the_application(where, config):
    settings = pytest.importorskip("mdlm.serve.settings")
    parsed = settings.serve_config_from_dict(config["applications"][0]["args"])
    assert parsed.device == config["applications"][0]["args"]["device"]


# ---------------------------------------------------------------------------------------------------------
# Object storage instead of a shared file system


def test_object_storage_variants_are_listed_and_present():
    assert OBJECT_STORAGE
    for name in OBJECT_STORAGE:
        assert (CLUSTER / name).is_file(), name
    assert {n for n in OBJECT_STORAGE if n in AUTOSCALER} == {"aws-s3.yaml", "gcp-gcs.yaml"}
    assert {n for n in OBJECT_STORAGE if n in SERVE_CONFIGS} == {"serve-s3.yaml", "serve-gcs.yaml"}
    assert {w.split(":")[0] for w, _ in kuberay_docs()} & set(OBJECT_STORAGE)


# A shared file system in a parsed value: its mount point, an NFS mount, an EFS or Filestore address.
SHARED_FS = re.compile(r"/mnt/shared|\bnfs\d?\b|mount\s+-t|\.efs\.|filestore", re.IGNORECASE)


@pytest.mark.parametrize("name", sorted(OBJECT_STORAGE))
def test_object_storage_variant_mounts_no_shared_file_system(name):
    """No NFS/EFS/Filestore mount or address and no /mnt/shared in any value (comments may name them); the VMs
    mount nothing into their containers; on Kubernetes no ReadWriteMany claim and no Ray pod volume other
    than emptyDir."""
    docs = load_docs(CLUSTER / name)
    for value in (s for doc in docs for s in strings(doc)):
        assert not SHARED_FS.search(value), f"{name}: {value!r}"
    for doc in docs:
        if "provider" in doc:  # autoscaler
            assert not any(o.startswith(("-v ", "--volume", "--mount")) for o in doc["docker"].get("run_options", []))
            assert set(doc["file_mounts"]) == {REMOTE_PROJECT, "/home/ray/.ray/auth_token"}
            assert not doc.get("initialization_commands"), "nothing to mount on the hosts"
        if doc.get("kind") == "PersistentVolumeClaim":
            assert "ReadWriteMany" not in doc["spec"]["accessModes"], f"{name}: a shared volume"
        if str(doc.get("apiVersion", "")).startswith("ray.io/"):
            for pod in _pod_specs(_cluster_spec(doc)):
                for volume in pod.get("volumes", []):
                    assert set(volume) == {"name", "emptyDir"}, f"{name}: {volume}"


def _object_url(value: str, scheme: str) -> bool:
    return value.startswith(scheme) and len(value) > len(scheme) and not value[len(scheme):].startswith("/")


@pytest.mark.parametrize("name", sorted(n for n in OBJECT_STORAGE if commands_in(CLUSTER / n)))
def test_object_storage_commands_keep_everything_on_the_bucket(name):
    """Each variant prepares and trains; every data.output_dir, run.storage_path and run.export_dir of its
    commands, and the corpus (data.source) unless it is the bundled default, is a URL of the file's bucket."""
    scheme = OBJECT_STORAGE[name]
    commands = commands_in(CLUSTER / name)
    assert {Path(script).name for script, _ in commands} >= {"prepare_data.py", "train.py"}, name
    for script, argv in commands:
        args = script_parser(ROOT / "pipelines" / Path(script).name).parse_args(argv)
        paths = _storage_paths(Path(script).name, args.overrides)
        source = dict(o.split("=", 1) for o in args.overrides).get("data.source", "shakespeare")
        if source != "shakespeare":
            paths["data.source"] = source
        for key, value in paths.items():
            assert _object_url(value, scheme), f"{name}: {key}={value!r} is not an {scheme} URL"


def test_object_storage_readme_commands_keep_everything_on_the_bucket():
    """The README's object-storage walk-through: its commands name bucket URLs only."""
    text = (CLUSTER / "README.md").read_text()
    section = text.split("## Object storage instead of a shared file system", 1)
    assert len(section) == 2, "README: the object-storage section"
    body = section[1].split("\n## ", 1)[0]
    found = [m for line in text_lines(body) for m in PIPELINE_COMMAND.finditer(line)]
    assert found
    for match in found:
        script = Path(match.group(1)).name
        args = script_parser(ROOT / "pipelines" / script).parse_args(shlex.split(match.group(2)))
        for key, value in _storage_paths(script, args.overrides).items():
            assert value.startswith(URL_SCHEMES), f"README: {key}={value!r}"


@pytest.mark.parametrize("name", sorted(n for n in OBJECT_STORAGE if n in SERVE_CONFIGS or "rayservice" in n))
def test_object_storage_serves_the_model_from_the_bucket(name):
    configs = [c for w, c in serve_configs() if w == name or w.split(":")[0] == name]
    assert configs, name
    for config in configs:
        model = config["applications"][0]["args"]["model"]
        assert _object_url(model, OBJECT_STORAGE[name]) and model.endswith("/model"), f"{name}: {model}"


def _mlflow_server_commands(name: str) -> list[str]:
    docs = load_docs(CLUSTER / name)
    found = [" ".join(s.split()) for doc in docs for s in strings(doc) if "mlflow server" in s]
    return found


@pytest.mark.parametrize("name", ["aws-s3.yaml", "gcp-gcs.yaml", "kuberay/shared-s3.yaml"])
def test_object_storage_mlflow_keeps_artifacts_on_the_bucket(name):
    """The MLflow server's artifacts go to the bucket (proxied), its run records to a local store of its own, and
    it creates the `mdlm` experiment itself once up (an experiment a job created would put its artifacts on the
    driver's disk)."""
    servers = _mlflow_server_commands(name)
    assert len(servers) == 1, name
    destination = re.search(r"--(?:artifacts-destination|default-artifact-root)\s+(\S+)", servers[0])
    assert destination and _object_url(destination.group(1), OBJECT_STORAGE[name]), servers[0]
    assert "--no-serve-artifacts" not in servers[0]
    backend = re.search(r"--backend-store-uri\s+(\S+)", servers[0])
    assert backend and not SHARED_FS.search(backend.group(1))
    text = " ".join(" ".join(s.split()) for doc in load_docs(CLUSTER / name) for s in strings(doc))
    assert "c.get_experiment_by_name('mdlm') or c.create_experiment('mdlm')" in text
    from mdlm.config import RunConfig

    assert RunConfig().mlflow_experiment == "mdlm"


def test_object_storage_clients_are_installed():
    """s3: the project's s3 extra on every node type (and in the KubeRay image); gs: gcsfs and
    google-cloud-storage under the project's pins."""
    for name, scheme in (("aws-s3.yaml", "s3://"), ("gcp-gcs.yaml", "gs://")):
        config = yaml.safe_load((CLUSTER / name).read_text())
        setups = [config["setup_commands"]] + [node["worker_setup_commands"]
                                               for node in config["available_node_types"].values()
                                               if "worker_setup_commands" in node]
        assert len(setups) >= 2, name
        for setup in setups:
            joined = " ".join(setup)
            if scheme == "s3://":
                assert f"-e '{REMOTE_PROJECT}[s3]'" in joined, f"{name}: {joined}"
            else:
                assert re.search(rf"pip install --quiet gcsfs google-cloud-storage -c {REMOTE_PROJECT}/"
                                 r"constraints\.txt", joined), f"{name}: {joined}"
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert "-e '/home/ray/mdlm[s3]'" in dockerfile
    assert (ROOT / "constraints.txt").is_file()
    extras = re.search(r"^s3\s*=\s*\[(.*)\]", (ROOT / "pyproject.toml").read_text(), flags=re.M)
    assert extras and "s3fs" in extras.group(1) and "boto3" in extras.group(1)


def test_object_storage_credentials_are_never_literal():
    """Workers get the bucket through instance profiles / service accounts; on Kubernetes the AWS keys come
    from a Secret by reference (or the ServiceAccount's role), never as values."""
    aws = yaml.safe_load((CLUSTER / "aws-s3.yaml").read_text())
    gcp = yaml.safe_load((CLUSTER / "gcp-gcs.yaml").read_text())
    for config, key in ((aws, "IamInstanceProfile"), (gcp, "serviceAccounts")):
        for name, node in config["available_node_types"].items():
            if name != config["head_node_type"]:  # the head gets Ray's default profile / account
                assert key in node["node_config"], name
    for name in OBJECT_STORAGE:
        text = (CLUSTER / name).read_text()
        assert not re.search(r"AKIA[0-9A-Z]{12,}", text), name
        for doc in load_docs(CLUSTER / name):
            for node in _dicts(doc):
                if node.get("name") in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                    assert "value" not in node and "secretKeyRef" in node["valueFrom"], f"{name}: {node}"
        for value in (s for doc in load_docs(CLUSTER / name) for s in strings(doc)):
            assert not re.search(r"AWS_(ACCESS_KEY_ID|SECRET_ACCESS_KEY)=\S", value), f"{name}: {value!r}"


def _dicts(node: Any) -> list[dict[str, Any]]:
    if isinstance(node, dict):
        return [node, *(d for value in node.values() for d in _dicts(value))]
    if isinstance(node, list):
        return [d for value in node for d in _dicts(value)]
    return []
