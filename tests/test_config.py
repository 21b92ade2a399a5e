"""Typed config: defaults < TOML file < environment < flags, and checks at start-up."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from hyperrec.app.config import ServerConfig, add_arguments, describe_fields, load_config
from hyperrec.core.errors import ConfigError


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_defaults_are_the_embedded_setup() -> None:
    config = load_config(parse([]), env={})
    assert config == ServerConfig()
    assert config.redis_url is None and config.port == 50051 and config.host == "127.0.0.1"


def test_precedence_file_then_env_then_flags(tmp_path: Path) -> None:
    file = tmp_path / "hyperrec.toml"
    file.write_text('port = 6000\ncandidates = 300\nmodel_name = "from-file"\nmax_k = 50\n')
    env = {"HYPERREC_PORT": "7000", "HYPERREC_CANDIDATES": "400"}
    config = load_config(parse(["--config", str(file), "--port", "8000"]), env=env)
    assert config.port == 8000  # flag beats env beats file
    assert config.candidates == 400  # env beats file
    assert config.model_name == "from-file" and config.max_k == 50  # file beats defaults


def test_types_are_converted() -> None:
    env = {"HYPERREC_MODEL_REPO": "/srv/models", "HYPERREC_PROFILE_BUDGET_MS": "12.5", "HYPERREC_MODEL_VERSION": "3"}
    config = load_config(parse([]), env=env)
    assert config.model_repo == Path("/srv/models")
    assert config.profile_budget_ms == 12.5 and config.model_version == 3


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"HYPERREC_PORT": "eighty"}, "port: cannot read"),
        ({"HYPERREC_PORT": "70000"}, "out of range"),
        ({"HYPERREC_MAX_K": "600"}, "max_k must not exceed candidates"),
        ({"HYPERREC_REDIS_URL": "redis://localhost:6379/0"}, "profile_secret"),
        ({"HYPERREC_PROFILE_SECRET": "short"}, "at least 16 bytes"),
        ({"HYPERREC_LOG_LEVEL": "LOUD"}, "log_level"),
    ],
)
def test_bad_values_refuse_to_start(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(parse([]), env=env)


def test_unknown_file_keys_are_rejected(tmp_path: Path) -> None:
    file = tmp_path / "bad.toml"
    file.write_text("prot = 1\n")
    with pytest.raises(ConfigError, match="unknown config fields"):
        load_config(parse(["--config", str(file)]), env={})


def test_every_field_is_documented_in_docs() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    for name, _, help_text in describe_fields():
        assert help_text
        assert f"`{name}`" in doc, f"docs/configuration.md lacks {name}; regenerate with `hyperrec config`"


def test_empty_values_mean_unset_only_for_optional_fields() -> None:
    config = load_config(parse([]), env={"HYPERREC_PROFILE_SECRET": "", "HYPERREC_REDIS_URL": ""})
    assert config.profile_secret is None and config.redis_url is None
    for name in ("PORT", "MODEL_REPO", "CANDIDATES"):
        with pytest.raises(ConfigError, match="needs a value"):
            load_config(parse([]), env={f"HYPERREC_{name}": ""})


@pytest.mark.parametrize(
    "env",
    [
        {"HYPERREC_PROFILE_TTL_S": "0"},
        {"HYPERREC_PROFILE_BUDGET_MS": "nan"},
        {"HYPERREC_REDIS_READ_TIMEOUT_MS": "0"},
        {"HYPERREC_GRACE_S": "-1"},
        {"HYPERREC_INDEX_THREADS": "0"},
    ],
)
def test_values_that_cannot_work_are_refused(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        load_config(parse([]), env=env)


def test_renamed_fields_are_read_under_their_old_names_with_a_warning(tmp_path: Path) -> None:
    """faiss_threads became index_threads: an operator's old TOML key, variable or flag still works, and says so."""
    file = tmp_path / "old.toml"
    file.write_text("faiss_threads = 3\n")
    with pytest.warns(FutureWarning, match="faiss_threads is deprecated: use index_threads"):
        assert load_config(parse(["--config", str(file)]), env={}).index_threads == 3
    with pytest.warns(FutureWarning, match="HYPERREC_FAISS_THREADS is deprecated"):
        assert load_config(parse([]), env={"HYPERREC_FAISS_THREADS": "2"}).index_threads == 2
    with pytest.warns(FutureWarning, match="--faiss-threads is deprecated"):
        assert load_config(parse(["--faiss-threads", "4"]), env={}).index_threads == 4
    # the new name wins over the old one from a source of lower precedence, and both in one file is an error
    with pytest.warns(FutureWarning):
        assert load_config(parse(["--index-threads", "5"]), env={"HYPERREC_FAISS_THREADS": "2"}).index_threads == 5
    file.write_text("faiss_threads = 3\nindex_threads = 3\n")
    with pytest.raises(ConfigError, match="faiss_threads and index_threads are the same setting"):
        load_config(parse(["--config", str(file)]), env={})
