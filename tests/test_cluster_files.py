"""Every file in cluster/ checked as the tool that reads it would: the KubeRay manifests against
KubeRay v1.7.0's own CRD schemas, the launcher configs with Ray's cluster-config validation, the
Dockerfile with hadolint, the runtime_env with Ray's RuntimeEnv, the training config with
steelseg's."""

import copy
import gzip
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = Path(__file__).parent / "kuberay"


def test_every_file_in_cluster_says_how_to_use_it():
    files = sorted(p for p in CLUSTER.rglob("*") if p.is_file())
    assert len(files) >= 7
    for path in files:
        header = path.read_text().split("\n\n")[0]
        assert header.startswith("#"), f"{path.name} has no header"
        assert re.search(r"(ray|kubectl|docker|steelseg|python) \S", header), path.name


# --- KubeRay -----------------------------------------------------------------------------------


def crd_schema(kind: str) -> dict:
    """A CRD's v1 schema, strict as the API server with field validation: a property a schema
    does not name is an error, except where the schema keeps unknown fields."""
    schema = json.loads(gzip.decompress((KUBERAY / f"{kind}-v1.schema.json.gz").read_bytes()))

    def strict(node):
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                strict(value)
        elif isinstance(node, list):
            for value in node:
                strict(value)

    strict(schema)
    return schema


def errors(manifest: dict, kind: str) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft7Validator(crd_schema(kind))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(manifest)]  # fmt: skip


def manifest(name: str) -> dict:
    return yaml.safe_load((CLUSTER / "kuberay" / name).read_text())


@pytest.mark.parametrize(("name", "kind"), [("rayjob.yaml", "rayjobs"),
                                            ("raycluster.yaml", "rayclusters"),
                                            ("rayservice.yaml", "rayservices")])  # fmt: skip
def test_kuberay_manifests_validate_against_the_crd_and_a_typo_does_not(name, kind):
    document = manifest(name)
    assert document["apiVersion"] == "ray.io/v1"
    assert errors(document, kind) == []
    broken = copy.deepcopy(document)
    spec = cluster_spec(broken)
    spec["workerGroupSpecs"][0]["maxReplica"] = 4  # misspelled
    spec["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # must be a string
    found = errors(broken, kind)
    assert any("'maxReplica' was unexpected" in e for e in found), found
    assert any(e.endswith("0 is not of type 'string'") for e in found), found


def cluster_spec(document: dict) -> dict:
    """A manifest's Ray cluster: a RayCluster's spec, a RayJob's or a RayService's own."""
    spec = document["spec"]
    return spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec


def check_cluster_spec(spec: dict) -> None:
    assert spec["authOptions"]["mode"] == "token"
    assert spec["rayVersion"] == pinned("ray")
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (gpu,) = spec["workerGroupSpecs"]
    assert gpu["minReplicas"] < gpu["maxReplicas"] and spec["enableInTreeAutoscaling"]
    pod = gpu["template"]["spec"]
    (container,) = pod["containers"]
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
        pod["tolerations"]
    )
    for group in (spec["headGroupSpec"], gpu):
        (container,) = group["template"]["spec"]["containers"]
        assert container["envFrom"] == [{"secretRef": {"name": "steelseg-s3"}}]
        assert "AWS_SECRET_ACCESS_KEY" not in json.dumps(container)  # only by reference


def test_rayjob_trains_from_a_bucket_and_cleans_up():
    job = manifest("rayjob.yaml")["spec"]
    check_cluster_spec(job["rayClusterSpec"])
    assert job["entrypoint"].startswith("steelseg train --data s3://")
    assert "--storage s3://" in job["entrypoint"]
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0
    assert job["backoffLimit"] >= 1
    assert yaml.safe_load(job["runtimeEnvYAML"])["env_vars"]
    train_args = job["entrypoint"].split()[2:]
    check_train_flags(train_args)


def test_raycluster_scales_gpu_workers_from_zero():
    spec = manifest("raycluster.yaml")["spec"]
    check_cluster_spec(spec)
    assert spec["workerGroupSpecs"][0]["minReplicas"] == 0


def check_train_flags(argv: list[str]) -> None:
    """The train command takes these flags (parsed, not run)."""
    import argparse

    from steelseg.config import add_arguments, from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = from_args(parser.parse_args(argv))
    assert config.use_gpu and config.storage.startswith("s3://")
    assert config.workers == (1, 4)  # elastic: goes on when a (spot) GPU node goes away


def test_rayservice_serves_the_serve_configs_application():
    from ray.serve.schema import ServeDeploySchema

    service = manifest("rayservice.yaml")["spec"]
    check_cluster_spec(service["rayClusterConfig"])
    ports = [c["ports"] for group in [service["rayClusterConfig"]["headGroupSpec"],
             *service["rayClusterConfig"]["workerGroupSpecs"]]
             for c in group["template"]["spec"]["containers"]]  # fmt: skip
    assert all({"containerPort": 8000, "name": "serve"} in p for p in ports)
    config = yaml.safe_load(service["serveConfigV2"])
    ServeDeploySchema.model_validate(config)
    assert config["applications"] == yaml.safe_load(serve_config())["applications"]


def serve_config() -> str:
    return (CLUSTER / "serve.yaml").read_text()


def test_the_serve_config_passes_serves_schema_and_builds_steelsegs_application(tmp_path):
    """cluster/serve.yaml as `serve run` reads it: Ray Serve's schema, then its application
    built from import_path and args (the checkpoint swapped for a local one)."""
    import pydantic
    import torch
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema
    from ray.serve.scripts import import_attr

    from steelseg import runs
    from steelseg.config import TrainConfig
    from steelseg.training.recipe import build_model

    config = yaml.safe_load(serve_config())
    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    broken = copy.deepcopy(config)
    broken["applications"][0]["import_paths"] = broken["applications"][0].pop("import_path")
    with pytest.raises(pydantic.ValidationError, match="import_path"):
        ServeDeploySchema.model_validate(broken)

    checkpoint = tmp_path / "epoch_0001"
    torch.manual_seed(0)
    state = {"model": build_model(TrainConfig()).state_dict(), "config": TrainConfig().to_dict()}
    runs.write_state(checkpoint, {**state, "epoch": 1, "metrics": {}})
    args = {**app.args, "checkpoint": str(tmp_path)}
    built = call_user_app_builder_with_args_if_necessary(import_attr(app.import_path), args)
    deployment = built._bound_deployment
    assert deployment.ray_actor_options == {"num_cpus": 2, "num_gpus": 0.5}
    scaling = deployment._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas) == (1, 4)
    assert deployment.max_ongoing_requests == 2 * app.args["max_batch_size"]


# --- Ray cluster launcher ----------------------------------------------------------------------


def launcher(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def ray_up_checks(config: dict) -> dict:
    """What ``ray up`` does with a config before it starts anything: fill in the provider's
    defaults, then validate against Ray's cluster schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.mark.parametrize("name", ["aws.yaml", "onprem.yaml"])
def test_launcher_configs_pass_rays_validation_and_a_typo_does_not(name):
    import jsonschema

    ray_up_checks(launcher(name))
    broken = launcher(name)
    broken["idle_timeout_minute"] = 5
    with pytest.raises(jsonschema.ValidationError, match="idle_timeout_minute"):
        ray_up_checks(broken)


@pytest.mark.parametrize("name", ["aws.yaml", "onprem.yaml"])
def test_launcher_configs_keep_the_dashboard_local_and_the_token_on(name):
    config = launcher(name)
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in json.dumps(config)
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"]
              if "ray start" in c]  # fmt: skip
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts)
    assert any(src == "~/.ray/auth_token" for src in config["file_mounts"].values())


def test_aws_config_has_a_cpu_head_and_spot_gpu_workers_with_a_role_not_keys():
    config = ray_up_checks(launcher("aws.yaml"))
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    gpu = types["gpu_worker"]
    assert gpu["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p"))
    assert "IamInstanceProfile" in gpu["node_config"]
    assert "AWS_SECRET_ACCESS_KEY" not in (CLUSTER / "aws.yaml").read_text()


def test_the_gpu_training_config_is_a_config_the_train_job_takes():
    from steelseg.config import TrainConfig, read_config_file

    config = TrainConfig.from_dict(read_config_file(CLUSTER / "severstal-gpu.yaml"))
    assert config.use_gpu and config.data.startswith("s3://") and config.storage.startswith("s3://")


def test_the_best_recipe_config_is_the_gpu_config_with_the_measured_levers():
    from steelseg.config import TrainConfig, read_config_file

    plain = TrainConfig.from_dict(read_config_file(CLUSTER / "severstal-gpu.yaml"))
    best = TrainConfig.from_dict(read_config_file(CLUSTER / "severstal-gpu-best.yaml"))
    levers = {"arch": "unet-resnet18", "presence_head": True, "defect_crops": 0.5,
              "dice_over": "batch", "name": best.name}  # fmt: skip
    assert best == plain.replace(**levers)


# --- image and runtime_env ---------------------------------------------------------------------


def pinned(package: str) -> str:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.startswith(f"{package}=="):
            return line.split("==")[1].strip()
    raise AssertionError(f"{package} is not pinned")


def test_dockerfile_is_hadolint_clean_non_root_and_on_the_pinned_ray():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    dockerfile = CLUSTER / "Dockerfile"
    result = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    text = dockerfile.read_text()
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert f"ARG RAY_IMAGE=rayproject/ray:{pinned('ray')}-{python}-gpu" in text
    assert re.search(r"^USER [1-9]\d*", text, re.M), "the image must not run as root"
    assert "pip install -e" not in text and "steelseg-*.whl" in text
    for package in ("ray[serve]", "python-multipart"):  # steelseg serve, the RayService
        assert f'"{package}=={pinned(package.split("[")[0])}"' in text, package


def test_runtime_env_is_valid_and_brings_every_dependency():
    import tomllib
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)  # raises on a field Ray does not know
    packages = env["pip"]["packages"]
    names = {re.split(r"[<>=\[]", p)[0] for p in packages}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["smp"]
    needed = {re.split(r"[<>=\[]", d)[0] for d in wanted} - {"ray"}
    assert needed == names
    assert f"torch=={pinned('torch')}" in packages
