"""bench.front_profile's reading of py-spy's raw stacks, without a server."""

import pytest

from bench.front_profile import summarize_raw

RAW = """\
_run_once (asyncio/base_events.py:1900);handle (serve_app/deployments/ingress.py:240);dumps (orjson/__init__.py:1) 6
_run_once (asyncio/base_events.py:1900);handle (serve_app/deployments/ingress.py:240) 3
_run_once (/usr/lib/python3.11/asyncio/base_events.py:1900) 1
"""


def test_self_inclusive_and_package_shares():
    profile = summarize_raw(RAW)
    assert profile["samples"] == 10
    own = dict(profile["self"])
    assert own["dumps (orjson/__init__.py)"] == pytest.approx(0.6)
    assert own["handle (deployments/ingress.py)"] == pytest.approx(0.3)
    assert dict(profile["inclusive"])["handle (deployments/ingress.py)"] == pytest.approx(0.9)
    packages = dict(profile["packages_self"])
    assert packages == pytest.approx({"orjson": 0.6, "serve_app": 0.3, "/usr/lib/python3.11/asyncio/base_events.py": 0.1})
