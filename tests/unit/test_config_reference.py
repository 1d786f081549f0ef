"""docs/configuration.md is what `make docs` generates from the pydantic models today."""

from serve_app.config_reference import OUTPUT, render


def test_configuration_reference_is_current():
    assert OUTPUT.read_text() == render(), "docs/configuration.md is stale: run `make docs`"


def test_expert_settings_come_last_in_their_own_section():
    text = render()
    expert = text.index("## Expert settings")
    assert text.index("### args.models[].tuning") > expert
    assert "`micro_batch_tokens`" not in text[:expert]  # not among a model's ordinary keys
