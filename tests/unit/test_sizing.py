"""An app that can never be placed fails at start, and models that tokenize alike share one
Tokenizer deployment (so that three models over one base fit on a 2-core machine)."""

from __future__ import annotations

import pytest

from serve_app.deployments.app import deployment_names, share_tokenizer
from serve_app.deployments.embedder import Embedder
from serve_app.deployments.ingress import Ingress
from serve_app.deployments.sizing import Need, check_app_fits, need_of
from serve_app.deployments.tokenizer import Tokenizer
from serve_app.engine.spec import ModelSpec, share_base

BASE = "intfloat/e5-mistral-7b-instruct"
THREE_ON_ONE_BASE = [
    ModelSpec(name="e5", source=BASE),
    ModelSpec(name="sfr", source=BASE, adapter="org/sfr-lora", query_instruction="Find passages"),
    ModelSpec(name="tenant", source=BASE, adapter="org/tenant-lora", max_batch_tokens=16384),
]


def app_needs(models: list[ModelSpec], overrides: dict | None = None) -> list[Need]:
    """What build_app's deployments ask for, as it binds them."""
    tokenizers, embedders = deployment_names(models)
    deployments = [Ingress] + [Tokenizer.options(name=n) for n in dict.fromkeys(tokenizers.values())]
    deployments += [Embedder.options(name=n) for n in dict.fromkeys(embedders.values())]
    return [need_of(d, (overrides or {}).get(d.name)) for d in deployments]


def test_models_that_tokenize_alike_share_one_tokenizer():
    assert [[s.name for s in g] for g in share_tokenizer(THREE_ON_ONE_BASE)] == [["e5", "sfr", "tenant"]]
    tokenizers, embedders = deployment_names(THREE_ON_ONE_BASE)
    assert set(tokenizers.values()) == {"Tokenizer-e5"} and set(embedders.values()) == {"Embedder-e5"}
    # Anything that changes the token ids splits them.
    for change in ({"revision": "v2"}, {"max_input_tokens": 128}, {"append_eos": False}, {"long_input": "chunk"},
                   {"pooling": "mean"}, {"source": "org/other"}):
        other = ModelSpec(name="other", source=BASE).model_copy(update=change)
        assert len(share_tokenizer([THREE_ON_ONE_BASE[0], other])) == 2, change


def test_three_models_on_one_base_fit_two_cores_with_the_default_sizes():
    needs = app_needs(THREE_ON_ONE_BASE)
    assert [(n.name, n.replicas) for n in needs] == [("Ingress", 1), ("Tokenizer-e5", 1), ("Embedder-e5", 1)]
    check_app_fits(needs, {"CPU": 2, "GPU": 0}, "ray.cluster_resources()")
    assert len(share_base(THREE_ON_ONE_BASE)) == 1


def test_an_app_that_cannot_be_placed_fails_naming_what_to_lower():
    overrides = {"Tokenizer-e5": {"autoscaling_config": {"min_replicas": 3, "max_replicas": 4}},
                 "Embedder-e5": {"ray_actor_options": {"num_cpus": 1}}}
    needs = app_needs(THREE_ON_ONE_BASE, overrides)
    assert {n.name: n.replicas for n in needs}["Tokenizer-e5"] == 3
    with pytest.raises(ValueError) as raised:
        check_app_fits(needs, {"CPU": 2, "GPU": 0}, "ray.cluster_resources()")
    message = str(raised.value)
    assert "need 2.75 CPUs" in message and "at most 2" in message
    assert "Tokenizer-e5 3 x 0.5" in message and "Embedder-e5 1 x 1" in message
    assert "num_cpus" in message and "min_replicas" in message


def test_gpus_count_the_config_overrides_and_the_autoscalers_maximum():
    needs = app_needs(THREE_ON_ONE_BASE[:1], {"Embedder": {"ray_actor_options": {"num_gpus": 1, "num_cpus": 4},
                                                           "autoscaling_config": {"min_replicas": 2, "max_replicas": 8}}})
    assert {n.name: (n.replicas, n.cpus, n.gpus) for n in needs}["Embedder"] == (2, 4.0, 1.0)
    check_app_fits(needs, {"CPU": 16, "GPU": 8}, "the autoscaler's largest cluster")
    with pytest.raises(ValueError, match=r"need 2 GPUs .*Embedder 2 x 1.*num_gpus"):
        check_app_fits(needs, {"CPU": 16, "GPU": 1}, "ray.cluster_resources()")
    check_app_fits(needs, {"CPU": 16, "GPU": 0}, "ray.cluster_resources()", skip_gpus=True)


def test_fixed_replica_counts_and_code_defaults():
    (ingress, tokenizer, embedder) = app_needs(THREE_ON_ONE_BASE[:1], {"Tokenizer": {"num_replicas": 2}})
    assert (ingress.replicas, ingress.cpus) == (1, 0.25)
    assert (tokenizer.replicas, tokenizer.cpus) == (2, 0.5)
    assert (embedder.replicas, embedder.cpus, embedder.gpus) == (1, 1.0, 0.0)
