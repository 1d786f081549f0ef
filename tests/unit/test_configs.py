"""The shipped Serve configs parse with the app's typed args and name real deployments."""

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serve_app.deployments.app import AppArgs, deployment_names
from serve_app.engine.spec import ModelSpec

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["local.yaml", "config.yaml"])
def test_config_is_a_valid_serve_config_with_valid_args(name):
    config = yaml.safe_load((ROOT / "deploy" / name).read_text())
    ServeDeploySchema.model_validate(config)  # Serve's own schema
    (app,) = config["applications"]
    assert app["import_path"] == "serve_app.deployments.app:build_app"
    args = AppArgs.model_validate(app["args"])
    tokenizers, embedders = deployment_names(args.models)
    expected = {"Ingress", *tokenizers.values(), *embedders.values()}
    assert {d["name"] for d in app["deployments"]} == expected


def test_production_config_serves_sfr_correctly():
    config = yaml.safe_load((ROOT / "deploy" / "config.yaml").read_text())
    (app,) = config["applications"]
    (sfr,) = AppArgs.model_validate(app["args"]).models
    assert sfr.source == "Salesforce/SFR-Embedding-Mistral"
    assert (sfr.pooling, sfr.append_eos, sfr.normalize, sfr.max_input_tokens) == ("last_token", True, True, 4096)
    assert sfr.query_instruction == "Given a web search query, retrieve relevant passages that answer the query"
    embedder = next(d for d in app["deployments"] if d["name"] == "Embedder")
    assert embedder["ray_actor_options"]["num_gpus"] == 1
    assert embedder["autoscaling_config"]["max_replicas"] > embedder["autoscaling_config"].get("min_replicas", 1)


def test_unknown_arg_keys_are_errors():
    with pytest.raises(ValueError):
        AppArgs.model_validate({"models": [{"name": "m", "source": "s"}], "batch_size": 3})
    with pytest.raises(ValueError):
        AppArgs.model_validate({"models": [{"name": "m", "source": "s"}, {"name": "m", "source": "t"}]})


def test_a_tuning_dial_at_a_models_top_level_says_where_it_moved():
    with pytest.raises(ValueError, match=r"cpu_threads moved to tuning\.cpu_threads"):
        ModelSpec.model_validate({"name": "m", "source": "s", "cpu_threads": 2})
    assert ModelSpec.model_validate({"name": "m", "source": "s", "tuning": {"cpu_threads": 2}}).tuning.cpu_threads == 2
