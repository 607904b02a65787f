from pathlib import Path

import pytest

from dermpacs.config import ConfigError, load_settings

REPO = Path(__file__).resolve().parents[1]


def test_default_file_matches_embedded_defaults():
    assert load_settings(REPO / "config" / "dermpacs.toml", environ={}) == load_settings(environ={})


def test_environment_overrides_a_key():
    settings = load_settings(environ={"DERMPACS__LISTENER__PORT": "11113"})
    assert settings.listener.port == 11113


def test_environment_override_of_a_list():
    settings = load_settings(environ={"DERMPACS__LISTENER__ALLOWED_CALLING_AETS": '["CAM1"]'})
    assert settings.listener.allowed_calling_aets == ["CAM1"]


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[listener]\nprot = 1\n")
    with pytest.raises(ConfigError, match=r"listener\.prot"):
        load_settings(path, environ={})


def test_bad_value_is_named(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[listener]\nport = "many"\n')
    with pytest.raises(ConfigError, match=r"listener\.port"):
        load_settings(path, environ={})


def test_config_file_from_environment(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[listener]\nae_title = "SKIN"\n')
    settings = load_settings(environ={"DERMPACS_CONFIG": str(path)})
    assert settings.listener.ae_title == "SKIN"
