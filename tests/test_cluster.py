"""cluster.yaml passes Ray's own cluster-launcher schema and never names pretrained weights."""
from __future__ import annotations

from pathlib import Path

import yaml


def test_cluster_yaml_is_valid_for_ray():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "cluster.yaml").read_text())
    validate_config(prepare_config(config))  # raises on schema violations
    assert config["head_node_type"] in config["available_node_types"]
    assert any("sslpipe" in cmd or "pip install" in cmd for cmd in config["setup_commands"])
