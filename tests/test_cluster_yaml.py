"""``ray_cluster.yaml`` is a valid Ray cluster-launcher config with a GPU worker type for the detector."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "ray_cluster.yaml"


def _ray_schema() -> dict[str, Any]:
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_validates_against_ray_schema(config: dict[str, Any]) -> None:
    jsonschema.validate(config, _ray_schema())


def test_schema_check_can_fail(config: dict[str, Any]) -> None:
    broken = {**config, "available_node_types": {"gpu": {"resources": {"GPU": 1}}}}  # no node_config
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, _ray_schema())


def test_ray_fills_defaults_and_accepts_it(config: dict[str, Any]) -> None:
    """Ray's own preparation (defaults merged, as ``ray up`` does before launching) accepts the file."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(config)
    validate_config(prepared)
    assert prepared["head_node_type"] == "head"


def _node_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return config["available_node_types"]


def test_gpu_worker_type_declares_gpus(config: dict[str, Any]) -> None:
    gpu_types = {n: t for n, t in _node_types(config).items() if t["resources"].get("GPU", 0) >= 1}
    assert list(gpu_types) == ["gpu"]
    gpu = gpu_types["gpu"]
    assert gpu["node_config"]["InstanceType"].startswith("g")  # an AWS GPU instance family
    assert 0 <= gpu["min_workers"] <= gpu["max_workers"]
    assert gpu["max_workers"] >= 1


def test_head_is_cpu_only_and_cpu_workers_exist(config: dict[str, Any]) -> None:
    types = _node_types(config)
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"]["CPU"] == 0  # no task or actor is scheduled on the head node
    cpu = types["cpu"]
    assert cpu["resources"]["CPU"] >= 1 and cpu["resources"].get("GPU", 0) == 0
    assert 0 <= cpu["min_workers"] <= cpu["max_workers"]
    workers = sum(t.get("max_workers", 0) for n, t in types.items() if n != config["head_node_type"])
    assert config["max_workers"] >= workers


def test_setup_installs_regionflow(config: dict[str, Any]) -> None:
    setup = " ".join(config["setup_commands"])
    assert "regionflow" in setup and "pip install" in setup
    starts = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert "ray start --head" in starts and "$RAY_HEAD_IP" in starts
