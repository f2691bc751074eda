"""The deployment files: they parse, Ray's own cluster schema accepts the launcher config,
every path and config they name exists and loads, the image installs what pyproject.toml
asks for, and no file carries a credential."""

from __future__ import annotations

import copy
import importlib.metadata as md
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from rayattr.config import load_config

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"


def load_yaml(rel: str) -> dict:
    return yaml.safe_load((ROOT / rel).read_text())


def test_cluster_launcher_config_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = load_yaml("infra/aws/cluster.yaml")
    validate_config(prepare_config(copy.deepcopy(cfg)))  # Ray's JSON schema and node-type checks
    assert cfg["provider"]["type"] == "aws"
    gpu = cfg["available_node_types"]["gpu_worker"]
    assert gpu["node_config"]["InstanceType"].startswith(("p4", "p5", "g5", "g6"))
    for node in cfg["available_node_types"].values():  # S3 through the instance role
        assert node["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")
    broken = copy.deepcopy(cfg)
    broken["head_node_type"] = "missing"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(broken))


def entrypoint_args(entrypoint: str) -> list[str]:
    args = shlex.split(entrypoint)
    assert args[0] == "python" and (ROOT / args[1]).is_file(), args[:2]
    return args


def test_rayjob_runs_the_job_with_a_config_that_loads():
    job = load_yaml("infra/k8s/rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    args = entrypoint_args(job["spec"]["entrypoint"])
    assert args[1] == "jobs/pretrain_attr.py"
    config = args[args.index("--config") + 1]
    load_config(ROOT / config)
    assert args[args.index("--store") + 1].startswith("s3://")
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert set(runtime_env) <= {"working_dir", "env_vars", "pip", "py_modules"}
    # the working dir is where the image put the checkout (K8sJobMode submits from the image)
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    workdir = re.search(r"^WORKDIR (\S+)", dockerfile, re.M).group(1)
    assert runtime_env["working_dir"] == workdir
    assert all(isinstance(v, str) for v in runtime_env.get("env_vars", {}).values())
    spec = job["spec"]["rayClusterSpec"]
    import ray

    assert spec["rayVersion"] == ray.__version__
    workers = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert int(workers["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    images = {c["image"] for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
              for c in g["template"]["spec"]["containers"]}
    assert images == {load_yaml("infra/aws/cluster.yaml")["docker"]["image"]}  # one image everywhere


def dockerfile_installs() -> list[tuple[list[str], list[str]]]:
    """Each `pip install` of the Dockerfile: (its constraint files, the packages it names)."""
    text = (INFRA / "docker" / "Dockerfile").read_text().replace("\\\n", " ")
    installs = []
    for line in text.splitlines():
        if line.startswith("RUN ") and "pip install" in line:
            words = shlex.split(line[4:])
            constraints, pkgs = [], []
            args = iter(words[words.index("install") + 1:])
            for w in args:
                if w in ("-c", "--constraint"):
                    constraints.append(next(args))
                elif not w.startswith("-"):  # -e's path is what it installs
                    pkgs.append(w)
            installs.append((constraints, pkgs))
    return installs


def constraint_pins() -> dict[str, str]:
    pins = {}
    for line in (INFRA / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier  # exactly one: name==version
            assert spec.operator == "==", line
            pins[canonicalize_name(req.name)] = spec.version
    return pins


def test_image_installs_what_pyproject_asks_for_at_the_constraints_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {canonicalize_name(Requirement(d).name): Requirement(d) for d in project["dependencies"]}
    text = (INFRA / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM .*pytorch", text, re.M)  # CUDA torch from the base image
    for name in ("pyproject.toml", "rayattr", "jobs"):
        assert re.search(rf"^COPY .*\b{name}\b", text, re.M), name
    copied = re.search(r"^COPY infra/constraints\.txt (\S+)", text, re.M)
    assert copied, "the image must get infra/constraints.txt"
    installs = dockerfile_installs()
    assert installs and all(c == [copied.group(1)] for c, _ in installs), "every pip install uses the constraints"
    assert installs[-1][1] == ["."], "the image must install the project"
    cached = {canonicalize_name(Requirement(p).name): Requirement(p) for p in installs[0][1]}
    assert all(not r.specifier for r in cached.values()), "versions come from constraints.txt alone"
    pins = constraint_pins()
    assert "torch" not in pins  # the base image's CUDA build
    for name, req in wanted.items():
        if name == "torch":
            continue
        assert name in cached, f"{name} from pyproject.toml is not in the image's cached layer"
        assert set(req.extras) <= set(cached[name].extras), f"{cached[name]} vs pyproject {req}"
        assert name in pins, f"{name} from pyproject.toml has no pin in infra/constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} vs pyproject {req}"
    # the image's Python (asserted at build time) is one every pin supports
    major, minor = map(int, re.search(r"sys\.version_info\[:2\] == \((\d+), (\d+)\)", text).groups())
    for name, version in pins.items():
        dist = md.distribution(name)
        if dist.version == version and dist.metadata.get("Requires-Python"):
            assert SpecifierSet(dist.metadata["Requires-Python"]).contains(f"{major}.{minor}"), \
                f"{name}=={version} needs Python {dist.metadata['Requires-Python']}, the image has {major}.{minor}"


def test_constraints_cover_what_the_dependencies_pull_in():
    """infra/constraints.py follows requirements with their extras (ray[default] brings aiohttp)
    and leaves torch and what only torch needs to the base image."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("constraints", INFRA / "constraints.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    found = gen.pins([Requirement("ray[default]"), Requirement("torch")])
    assert {"ray", "aiohttp", "grpcio"} <= set(found) and "torch" not in found and "sympy" not in found
    assert "aiohttp" not in gen.pins([Requirement("ray")])  # only with the extra
    pins = constraint_pins()
    assert set(gen.pins(gen.project_requirements())) == set(pins), "regenerate: python infra/constraints.py"


def test_example_configs_load_and_are_gpu_cluster_shaped():
    for path in sorted((ROOT / "jobs" / "configs").glob("*.yaml")):
        load_config(path)
    for name in ("gpu_cluster.yaml", "llama7b_1t.yaml"):
        cfg = load_config(ROOT / "jobs" / "configs" / name)
        assert cfg.train.use_gpu and cfg.store.uri.startswith("s3://")
        assert not cfg.store.storage_options  # credentials come from the role / environment


SECRET = re.compile(r"(AKIA|ASIA)[0-9A-Z]{16}|aws_secret_access_key\s*[:=]|secret_key\s*[:=]\s*\S{8,}", re.I)


def test_no_credentials_in_deployment_files():
    files = [p for p in INFRA.rglob("*") if p.is_file()] + list((ROOT / "jobs" / "configs").glob("*.yaml"))
    assert len(files) >= 6
    for path in files:
        assert not SECRET.search(path.read_text()), f"{path} looks like it holds a credential"


def test_commands_in_infra_files_name_existing_files():
    """Every repo path the README and the files' own usage comments mention exists."""
    for doc in [INFRA / "README.md", *(p for p in INFRA.rglob("*") if p.is_file() and p.suffix != ".md")]:
        text = doc.read_text()
        named = re.findall(r"(?<![\w/])(?:infra|jobs|docs)/[\w./-]+(?:\.yaml|\.py|\.md|\.txt|/Dockerfile)|(?<![\w/])(?:docker/Dockerfile|"
                           r"aws/cluster\.yaml|k8s/rayjob\.yaml)", text)
        for rel in named:
            path = ROOT / rel if rel.startswith(("infra", "jobs", "docs")) else INFRA / rel
            assert path.is_file(), f"{doc.relative_to(ROOT)} names {rel}, which does not exist"
    assert "infra/docker/Dockerfile" in (INFRA / "aws" / "cluster.yaml").read_text()


def pod_mounts(group: dict) -> list[str]:
    """The mount paths of a RayJob group's Ray container, for volumes the pod declares."""
    spec = group["template"]["spec"]
    volumes = {v["name"] for v in spec.get("volumes", [])}
    (container,) = spec["containers"]
    return [m["mountPath"] for m in container.get("volumeMounts", []) if m["name"] in volumes]


def local_paths(cfg) -> list[str]:
    """The absolute local paths an example config reads (not URIs, not built-in names)."""
    return [p for p in (cfg.data.tokenizer, cfg.data.train, cfg.data.validation)
            if isinstance(p, str) and p.startswith("/")]


def test_every_local_path_of_the_example_configs_is_in_the_image_or_mounted():
    job = load_yaml("infra/k8s/rayjob.yaml")["spec"]["rayClusterSpec"]
    groups = [job["headGroupSpec"], *job["workerGroupSpecs"]]
    launcher = load_yaml("infra/aws/cluster.yaml")["file_mounts"]
    under = lambda path, roots: any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)  # noqa: E731
    named = 0
    for config in sorted((ROOT / "jobs" / "configs").glob("*.yaml")):
        for path in local_paths(load_config(config)):
            named += 1
            if (ROOT / path.lstrip("/")).exists():
                continue
            for g in groups:  # the driver (head) and the ranks (workers) both read it
                assert under(path, pod_mounts(g)), f"{config.name}: {path} is not mounted in rayjob.yaml"
            assert under(path, launcher), f"{config.name}: {path} is not in cluster.yaml's file_mounts"
    assert named >= 1  # llama7b_1t.yaml's tokenizer
    assert under("/opt/tokenizers/llama-2", ["/opt/tokenizers"]) and not under("/opt/tokenizersX", ["/opt/tokenizers"])


def test_rayjob_can_grow_to_the_7b_examples_ranks():
    spec = load_yaml("infra/k8s/rayjob.yaml")["spec"]["rayClusterSpec"]
    autoscaling = spec.get("enableInTreeAutoscaling", False)
    gpus = 0
    for g in spec["workerGroupSpecs"]:
        (container,) = g["template"]["spec"]["containers"]
        per_pod = int(container["resources"]["limits"].get("nvidia.com/gpu", 0))
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        gpus += per_pod * (g["maxReplicas"] if autoscaling else g["replicas"])  # without it: replicas, fixed
    for name in ("gpu_cluster.yaml", "llama7b_1t.yaml"):
        ranks = load_config(ROOT / "jobs" / "configs" / name).train.ranks
        assert gpus >= ranks, f"rayjob.yaml reaches {gpus} GPUs; {name} has {ranks} ranks"
    cluster = load_yaml("infra/aws/cluster.yaml")  # the launcher's ceiling too: 32 nodes x 8 GPUs
    assert cluster["available_node_types"]["gpu_worker"]["max_workers"] * 8 >= ranks
