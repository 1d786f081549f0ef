"""API keys: configuration, header parsing, constant-time lookup, no raw key in errors or logs."""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import sys

import pytest
from pydantic import ValidationError

from serve_app.api import auth, keys
from serve_app.api.auth import (
    ANONYMOUS,
    AuthConfig,
    AuthConfigError,
    Authenticator,
    generate_key,
    hash_key,
    load_keys,
)
from serve_app.api.errors import OpenAIError

ALICE = generate_key()
BOB = generate_key()
ENV = "TEST_EMBED_API_KEYS"


def entry(name: str, key: str) -> str:
    return f"{name}:{hash_key(key)}"


@pytest.fixture
def keys_file(tmp_path):
    path = tmp_path / "api_keys"
    path.write_text(f"# issued 2025-01\n{entry('alice', ALICE)}\n\n{entry('bob', BOB)}  # laptop\n")
    return path


@pytest.fixture
def authenticator(keys_file):
    return Authenticator(AuthConfig(keys_file=str(keys_file)))


def rejected(authenticator: Authenticator, header: str | None) -> OpenAIError:
    with pytest.raises(OpenAIError) as info:
        authenticator.authenticate(header)
    err = info.value
    assert err.status == 401 and err.code == "invalid_api_key"
    assert err.body()["error"]["type"] == "authentication_error"
    assert err.headers == {"WWW-Authenticate": "Bearer"}
    assert err.__cause__ is None and err.__context__ is None  # no chained error holding the key
    return err


def everything_about(err: BaseException) -> str:
    """Every string an error could leak through: message, repr, body, headers."""
    parts = [str(err), repr(err), repr(err.args)]
    if isinstance(err, OpenAIError):
        parts += [repr(err.body()), repr(err.headers)]
    return "\n".join(parts)


# --- keys and hashes ---


def test_generated_keys_are_long_random_and_prefixed():
    made = {generate_key() for _ in range(50)}
    assert len(made) == 50
    for key in made:
        assert key.startswith("sk-emb-") and len(key) == len("sk-emb-") + 43  # 32 bytes, urlsafe base64
        assert not any(ch.isspace() or ch in ":,#" for ch in key)


def test_hash_format_is_versioned_sha256():
    assert hash_key("sk-emb-x") == "sha256:" + hashlib.sha256(b"sk-emb-x").hexdigest()


# --- authenticate ---


def test_valid_keys_return_their_names(authenticator):
    assert authenticator.authenticate(f"Bearer {ALICE}") == "alice"
    assert authenticator.authenticate(f"Bearer {BOB}") == "bob"
    assert authenticator.authenticate(f"bearer  {ALICE} ") == "alice"  # scheme is case-insensitive
    assert authenticator.names == ["alice", "bob"]


def test_wrong_key(authenticator):
    err = rejected(authenticator, f"Bearer {ALICE}x")
    assert "Incorrect API key provided" in err.message
    rejected(authenticator, "Bearer " + generate_key())
    rejected(authenticator, "Bearer " + hash_key(ALICE))  # the stored hash is not a key


@pytest.mark.parametrize("header", [None, "", "   "])
def test_missing_header(authenticator, header):
    assert "didn't provide an API key" in rejected(authenticator, header).message


@pytest.mark.parametrize("header", ["Bearer", "Bearer ", "bearer   "])
def test_bearer_without_key(authenticator, header):
    assert "didn't provide an API key" in rejected(authenticator, header).message


@pytest.mark.parametrize(
    "header",
    [
        "Basic YWxpY2U6c2VjcmV0",
        f"Basic {ALICE}",
        ALICE,  # the key without a scheme
        f"Token {ALICE}",
        f"Bearer {ALICE} {BOB}",
        f"Bearer\t{ALICE}",
    ],
    ids=["basic", "basic-with-key", "no-scheme", "token-scheme", "two-keys", "tab"],
)
def test_malformed_header(authenticator, header):
    err = rejected(authenticator, header)
    assert "Bearer" in err.message
    assert ALICE not in everything_about(err)


def test_non_ascii_header_is_just_wrong(authenticator):
    rejected(authenticator, "Bearer sk-emb-\udcff\u00e9")


def test_raw_key_never_in_errors_or_logs(authenticator, caplog):
    caplog.set_level(logging.DEBUG)
    secret = ALICE[:-4] + "ZZZZ"  # a near miss of a real key
    for header in (f"Bearer {secret}", f"Basic {secret}", secret, f"Bearer {secret} extra"):
        err = rejected(authenticator, header)
        text = everything_about(err)
        assert secret not in text and secret[7:20] not in text
    assert authenticator.authenticate(f"Bearer {ALICE}") == "alice"
    for key in (secret, ALICE, BOB):
        assert key not in caplog.text and key[7:20] not in caplog.text


def test_every_stored_hash_is_compared_without_early_exit(tmp_path, monkeypatch):
    """Structural constant-time check: each lookup compares the presented key's digest with
    every stored digest, whether it matches the first, the last or none."""
    raw = [generate_key() for _ in range(5)]
    path = tmp_path / "keys"
    path.write_text("\n".join(entry(f"k{i}", key) for i, key in enumerate(raw)))
    authenticator = Authenticator(AuthConfig(keys_file=str(path)))

    calls: list[tuple[bytes, bytes]] = []

    def counting_compare(a, b):
        calls.append((a, b))
        return hmac.compare_digest(a, b)

    monkeypatch.setattr(auth, "_compare_digest", counting_compare)
    stored = {bytes.fromhex(hash_key(key).split(":")[1]) for key in raw}
    for header, expected in [(raw[0], "k0"), (raw[4], "k4"), (generate_key(), None)]:
        calls.clear()
        if expected is None:
            rejected(authenticator, f"Bearer {header}")
        else:
            assert authenticator.authenticate(f"Bearer {header}") == expected
        assert len(calls) == 5
        assert {b for _, b in calls} == stored
        assert all(len(a) == len(b) == 32 for a, b in calls)  # fixed-length digests, never raw keys


# --- disabled ---


def test_disabled_auth_warns_loudly_and_lets_everything_through(caplog):
    caplog.set_level(logging.WARNING)
    authenticator = Authenticator(AuthConfig(enabled=False))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == auth.__name__]
    assert warnings and "DISABLED" in warnings[0].getMessage()
    for header in (None, "", "Basic x", f"Bearer {ALICE}"):
        assert authenticator.authenticate(header) == ANONYMOUS
    assert authenticator.names == [ANONYMOUS]


def test_enabled_is_the_default_and_needs_a_source():
    assert AuthConfig(keys_env=ENV).enabled is True
    with pytest.raises(ValidationError, match="enabled: false"):
        AuthConfig()
    with pytest.raises(ValidationError):
        AuthConfig(enabled=True)
    with pytest.raises(ValidationError, match="extra"):
        AuthConfig(keys_env=ENV, keys=["sk-emb-raw"])


# --- sources ---


def test_keys_from_env(monkeypatch):
    monkeypatch.setenv(ENV, f"{entry('alice', ALICE)},{entry('bob', BOB)}")
    authenticator = Authenticator(AuthConfig(keys_env=ENV))
    assert authenticator.authenticate(f"Bearer {BOB}") == "bob"
    # newlines and spaces separate entries too; an injected environment works without os.environ
    environ = {ENV: f"\n{entry('carol', ALICE)}\n {entry('dave', BOB)} \n"}
    assert load_keys(AuthConfig(keys_env=ENV), environ).keys() == {"carol", "dave"}


def test_keys_from_file_and_env_together(keys_file):
    carol = generate_key()
    config = AuthConfig(keys_file=str(keys_file), keys_env=ENV)
    authenticator = Authenticator(config, environ={ENV: entry("carol", carol)})
    assert authenticator.names == ["alice", "bob", "carol"]
    assert authenticator.authenticate(f"Bearer {carol}") == "carol"
    assert authenticator.authenticate(f"Bearer {ALICE}") == "alice"


def test_uppercase_hex_is_accepted(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"alice:sha256:{hashlib.sha256(ALICE.encode()).hexdigest().upper()}\n")
    assert Authenticator(AuthConfig(keys_file=str(path))).authenticate(f"Bearer {ALICE}") == "alice"


def test_missing_file_is_a_startup_error(tmp_path):
    with pytest.raises(AuthConfigError, match="does not exist"):
        Authenticator(AuthConfig(keys_file=str(tmp_path / "nope")))


def test_directory_instead_of_file_is_a_startup_error(tmp_path):
    with pytest.raises(AuthConfigError, match="cannot be read"):
        Authenticator(AuthConfig(keys_file=str(tmp_path)))


def test_unset_env_is_a_startup_error():
    with pytest.raises(AuthConfigError, match=f"{ENV} is not set"):
        Authenticator(AuthConfig(keys_env=ENV), environ={})


@pytest.mark.parametrize("content", ["", "# only a comment\n\n", "  \n"])
def test_zero_keys_is_a_startup_error(tmp_path, content):
    path = tmp_path / "keys"
    path.write_text(content)
    with pytest.raises(AuthConfigError, match="no API keys"):
        Authenticator(AuthConfig(keys_file=str(path)))
    with pytest.raises(AuthConfigError, match="no API keys"):
        Authenticator(AuthConfig(keys_env=ENV), environ={ENV: content})


@pytest.mark.parametrize(
    "line, message",
    [
        ("alice", "line 2: malformed entry"),
        (":" + hash_key(ALICE), "line 2: malformed entry"),
        ("al/ice:" + hash_key(ALICE), "line 2: malformed entry"),
        ("a" * 65 + ":" + hash_key(ALICE), "line 2: malformed entry"),
        ("alice:" + hash_key(ALICE)[:-1], "line 2: the entry for key 'alice' is not a hash"),
        ("alice:" + hash_key(ALICE) + "0", "not a hash"),
        ("alice:md5:" + hashlib.md5(ALICE.encode()).hexdigest(), "not a hash"),
        ("alice:" + hash_key(ALICE).split(":")[1], "not a hash"),  # hex without the scheme
        ("alice:sha256:" + "g" * 64, "not a hash"),
    ],
    ids=["no-hash", "no-name", "bad-name", "long-name", "short-hex", "long-hex", "md5", "no-scheme", "not-hex"],
)
def test_malformed_entries_are_startup_errors(tmp_path, line, message):
    path = tmp_path / "keys"
    path.write_text(f"{entry('bob', BOB)}\n{line}\n")
    with pytest.raises(AuthConfigError, match=message) as info:
        Authenticator(AuthConfig(keys_file=str(path)))
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "line", [ALICE, f"alice:{ALICE}", f"alice:sha256:{ALICE}"], ids=["bare", "named", "as-hash"]
)
def test_raw_key_in_keys_file_is_refused_without_echoing_it(tmp_path, caplog, line):
    caplog.set_level(logging.DEBUG)
    path = tmp_path / "keys"
    path.write_text(line + "\n")
    with pytest.raises(AuthConfigError) as info:
        Authenticator(AuthConfig(keys_file=str(path)))
    assert "line 1" in str(info.value)
    assert ALICE not in everything_about(info.value) and ALICE[7:20] not in everything_about(info.value)
    assert ALICE not in caplog.text
    if line != f"alice:sha256:{ALICE}":
        assert "raw API key" in str(info.value)


def test_duplicate_names_and_hashes_are_startup_errors(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"{entry('alice', ALICE)}\n{entry('alice', BOB)}\n")
    with pytest.raises(AuthConfigError, match="'alice' is configured more than once"):
        Authenticator(AuthConfig(keys_file=str(path)))
    path.write_text(f"{entry('alice', ALICE)}\n{entry('bob', ALICE)}\n")
    with pytest.raises(AuthConfigError, match="same hash"):
        Authenticator(AuthConfig(keys_file=str(path)))


def test_startup_logs_names_but_no_hashes(keys_file, caplog):
    caplog.set_level(logging.DEBUG)
    Authenticator(AuthConfig(keys_file=str(keys_file)))
    assert "alice" in caplog.text and "bob" in caplog.text
    assert hash_key(ALICE).split(":")[1] not in caplog.text and ALICE not in caplog.text


# --- CLI ---


def run_cli(monkeypatch, capsys, argv: list[str], stdin: str = "") -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    try:
        rc = keys.main(argv)
    except SystemExit as exc:  # argparse errors
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_new_prints_a_working_key_and_entry(monkeypatch, capsys, tmp_path):
    rc, out, err = run_cli(monkeypatch, capsys, ["new", "--name", "alice"])
    assert rc == 0
    key, line = out.splitlines()
    assert key.startswith("sk-emb-") and line == entry("alice", key)
    assert "only this once" in err
    path = tmp_path / "keys"
    path.write_text(line + "\n")
    assert Authenticator(AuthConfig(keys_file=str(path))).authenticate(f"Bearer {key}") == "alice"


def test_cli_hash_reads_stdin(monkeypatch, capsys):
    rc, out, _ = run_cli(monkeypatch, capsys, ["hash", "--name", "bob"], BOB + "\n")
    assert rc == 0 and out == entry("bob", BOB) + "\n"


def test_cli_hash_refuses_short_empty_or_spaced_keys(monkeypatch, capsys):
    rc, out, err = run_cli(monkeypatch, capsys, ["hash", "--name", "bob"], "hunter2\n")
    assert rc == 2 and out == "" and "shorter than" in err and "hunter2" not in err
    rc, out, _ = run_cli(monkeypatch, capsys, ["hash", "--name", "bob", "--allow-short"], "hunter2\n")
    assert rc == 0 and out == entry("bob", "hunter2") + "\n"
    rc, out, _ = run_cli(monkeypatch, capsys, ["hash", "--name", "bob"], "\n")
    assert rc == 2 and out == ""
    rc, out, _ = run_cli(monkeypatch, capsys, ["hash", "--name", "bob"], f"{ALICE} {BOB}\n")
    assert rc == 2 and out == ""


def test_cli_rejects_bad_names(monkeypatch, capsys):
    rc, out, err = run_cli(monkeypatch, capsys, ["new", "--name", "a:b"])
    assert rc == 2 and out == "" and "key name" in err
