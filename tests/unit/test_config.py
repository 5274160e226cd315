"""Settings: flags > FLUXD_ env > TOML > defaults; the TOML file as model registry. No torch, no server."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from pydantic import ValidationError

from pipelines.specs import SPECS
from server import registry
from server.config import Settings, load_settings
from server.registry import configured_specs, served_specs

README = Path(__file__).resolve().parents[2] / "README.md"


def toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fluxd.toml"
    path.write_text(text)
    return path


def checkpoint(folder: Path) -> Path:
    """The least a folder needs to count as present: its model_index.json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text("{}")
    return folder


@pytest.fixture(autouse=True)
def no_hub_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    # Presence also counts the Hugging Face cache; this machine's cache must not decide what is served here.
    monkeypatch.setattr(registry, "_in_hub_cache", lambda repo_id, filename: False)


def test_defaults_without_any_source() -> None:
    settings = load_settings(environ={})
    assert settings == Settings()
    assert (settings.host, settings.port, settings.devices) == ("127.0.0.1", 8000, ["cpu"])
    assert (settings.demo, settings.no_auth, settings.all_api_keys()) == (False, False, [])


def test_flags_beat_env_beat_toml_beat_defaults(tmp_path: Path) -> None:
    config = toml(tmp_path, 'port = 9001\nhost = "10.0.0.1"\ndefault_model = "flux.1-dev"\n')
    environ = {"FLUXD_PORT": "9002", "FLUXD_HOST": "10.0.0.2"}
    settings = load_settings({"port": 9003}, environ, config)
    assert settings.port == 9003  # flag over env and TOML
    assert settings.host == "10.0.0.2"  # env over TOML
    assert settings.default_model == "flux.1-dev"  # TOML over default
    assert settings.queue_size == 64  # default


def test_flags_left_unset_do_not_mask_lower_sources() -> None:
    # argparse hands every flag over, None when not given; None must not override the env.
    settings = load_settings({"port": None, "demo": None, "api_keys": None}, {"FLUXD_PORT": "9002"})
    assert (settings.port, settings.demo, settings.api_keys) == (9002, False, [])


def test_config_file_from_env_and_explicit_one_wins(tmp_path: Path) -> None:
    from_env = toml(tmp_path, "port = 9001\n")
    explicit = tmp_path / "explicit.toml"
    explicit.write_text("port = 9005\n")
    assert load_settings(environ={"FLUXD_CONFIG": str(from_env)}).port == 9001
    assert load_settings(environ={"FLUXD_CONFIG": str(from_env)}, config_file=explicit).port == 9005


@pytest.mark.parametrize(
    ("variable", "raw", "field", "expected"),
    [
        ("FLUXD_API_KEYS", " k1, k2,,k3 ,", "api_keys", ["k1", "k2", "k3"]),
        ("FLUXD_DEVICES", "cuda:0,cuda:1", "devices", ["cuda:0", "cuda:1"]),
        ("FLUXD_CORS_ORIGINS", "http://a.lan,http://b.lan", "cors_origins", ["http://a.lan", "http://b.lan"]),
        ("FLUXD_PRELOAD", "flux.1-dev", "preload", ["flux.1-dev"]),
        ("FLUXD_DEMO", "true", "demo", True),
        ("FLUXD_NO_AUTH", "1", "no_auth", True),
        ("FLUXD_MAX_BODY_MB", "0.5", "max_body_mb", 0.5),
        ("FLUXD_QUEUE_TIMEOUT_S", "30", "queue_timeout_s", 30.0),
        ("FLUXD_WEIGHTS_DIR", "/data/weights", "weights_dir", Path("/data/weights")),
    ],
)
def test_env_values_are_parsed(variable: str, raw: str, field: str, expected: object) -> None:
    assert getattr(load_settings(environ={variable: raw}), field) == expected


def test_api_keys_from_flags_and_file_are_merged_blank_ones_dropped(tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("f1\n\n  f2  \n")
    settings = load_settings({"api_keys": ["k1", "", "  "], "api_key_file": key_file}, {})
    assert settings.all_api_keys() == ["k1", "f1", "f2"]


@pytest.mark.parametrize(
    ("environ", "flags", "config"),
    [
        ({"FLUXD_PORT": "eighty"}, {}, ""),
        ({"FLUXD_PORT": "70000"}, {}, ""),
        ({"FLUXD_QUEUE_SIZE": "0"}, {}, ""),
        ({"FLUXD_DEMO": "maybe"}, {}, ""),
        ({}, {"max_batch_images": 0}, ""),
        ({}, {}, "max_body_mb = -1\n"),
        ({}, {}, 'devices = "cpu"\n'),  # TOML lists are lists: a bare string is a mistake, not a split
        ({}, {}, "[models.x]\ndefault_steps = 'many'\n"),
    ],
)
def test_bad_values_raise(tmp_path: Path, environ: dict, flags: dict, config: str) -> None:
    with pytest.raises(ValidationError):
        load_settings(flags, environ, toml(tmp_path, config) if config else None)


def test_broken_toml_raises(tmp_path: Path) -> None:
    with pytest.raises(tomllib.TOMLDecodeError):
        load_settings(environ={}, config_file=toml(tmp_path, "port = \n"))


@pytest.mark.parametrize("config", ['defualt_model = "flux.1-dev"\n', '[models.fast]\nbsae = "flux.2-dev"\n'])
def test_unknown_toml_keys_raise(tmp_path: Path, config: str) -> None:
    with pytest.raises(ValidationError):
        load_settings(environ={}, config_file=toml(tmp_path, config))


def test_registry_adds_a_local_folder_as_a_new_model(tmp_path: Path) -> None:
    folder = checkpoint(tmp_path / "my-finetune")
    config = toml(tmp_path, f'[models.my-finetune]\nbase = "flux.1-dev"\npath = "{folder}"\n')
    settings = load_settings({"weights_dir": tmp_path / "empty"}, {}, config)
    spec = configured_specs(settings)["my-finetune"]
    assert (spec.family, spec.alias, spec.checkpoint_path) == ("flux1", False, str(folder))
    assert spec.weights_id == "my-finetune"
    assert spec.default_steps == SPECS["flux.1-dev"].default_steps
    assert list(served_specs(settings)) == ["my-finetune"]  # nothing else is on disk


def test_registry_alias_with_its_own_defaults(tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    config = toml(
        tmp_path,
        '[models.fast]\nbase = "flux.2-dev"\ndefault_size = "768x512"\n'
        "default_steps = 12\ndefault_guidance = 3.5\n",
    )
    settings = load_settings({"weights_dir": weights}, {}, config)
    fast = configured_specs(settings)["fast"]
    assert (fast.alias, fast.weights_id, fast.family) == (True, "flux.2-dev", "flux2")
    assert (fast.default_size, fast.default_steps, fast.default_guidance) == ((768, 512), 12, 3.5)
    assert "fast" not in served_specs(settings)  # its base is not on disk yet
    checkpoint(weights / "flux.2-dev")
    assert {"fast", "flux.2-dev"} <= set(served_specs(settings))


def test_registry_changes_the_defaults_of_a_built_in_id(tmp_path: Path) -> None:
    config = toml(tmp_path, '[models."flux.1-dev"]\ndefault_steps = 20\n')
    spec = configured_specs(load_settings(environ={}, config_file=config))["flux.1-dev"]
    assert (spec.id, spec.alias, spec.default_steps) == ("flux.1-dev", False, 20)


def test_registry_unknown_base_is_an_error(tmp_path: Path) -> None:
    settings = load_settings(environ={}, config_file=toml(tmp_path, '[models.x]\nbase = "flux.3"\n'))
    with pytest.raises(ValueError, match=r"models\.x.*flux\.3"):
        configured_specs(settings)


def test_demo_sets_a_small_default_size_everywhere() -> None:
    assert {spec.default_size for spec in configured_specs(load_settings(environ={})).values()} == {
        (1024, 1024)
    }
    demo = configured_specs(load_settings({"demo": True}, {}))
    assert {spec.default_size for spec in demo.values()} == {(256, 256)}
    custom = configured_specs(load_settings(environ={"FLUXD_DEMO": "1", "FLUXD_DEMO_SIZE": "128x96"}))
    assert {spec.default_size for spec in custom.values()} == {(128, 96)}


@pytest.mark.parametrize(
    "config",
    ['demo = true\ndemo_size = "small"\n', '[models.x]\nbase = "flux.1-dev"\ndefault_size = "big"\n'],
)
def test_a_size_that_is_not_w_x_h_is_an_error(tmp_path: Path, config: str) -> None:
    with pytest.raises(ValueError):
        configured_specs(load_settings(environ={}, config_file=toml(tmp_path, config)))


def readme_registry_example(tmp_path: Path) -> Settings:
    """README's ```toml block, loaded as a user would load it."""
    [block] = re.findall(r"^```toml\n(.*?)^```$", README.read_text(), flags=re.MULTILINE | re.DOTALL)
    return load_settings({"weights_dir": tmp_path / "weights"}, {}, toml(tmp_path, block))


def test_readme_registry_example_configures_both_models(tmp_path: Path) -> None:
    settings = readme_registry_example(tmp_path)
    assert settings.default_model == "flux.2-dev-turbo"
    specs = configured_specs(settings)
    assert specs["my-finetune"].checkpoint_path == "/data/my-finetune"
    assert specs["fast"].alias and specs["fast"].default_size == (768, 768)
    assert specs["fast"].adapter == SPECS["flux.2-dev-turbo"].adapter
    modes = registry.requested_modes(settings, specs)
    assert modes["flux.1-dev"] == "offload" and modes["flux.2-dev"] == "auto"


def test_readme_alias_of_turbo_is_served_once_turbo_is(tmp_path: Path) -> None:
    settings = readme_registry_example(tmp_path)
    checkpoint(settings.weights_dir / "flux.2-dev")
    adapter = SPECS["flux.2-dev-turbo"].adapter
    assert adapter is not None
    turbo = settings.weights_dir / "flux.2-dev-turbo"
    turbo.mkdir()
    (turbo / adapter.weight_name).touch()
    served = served_specs(settings)
    assert "flux.2-dev-turbo" in served
    assert "fast" in served


def test_modes_default_to_auto_and_the_toml_sets_one_per_checkpoint(tmp_path: Path) -> None:
    config = toml(tmp_path, 'mode = "offload"\n[models."flux.2-dev"]\nmode = "fast"\n')
    settings = load_settings({}, {}, config)
    modes = registry.requested_modes(settings, configured_specs(settings))
    assert modes["flux.2-dev"] == "fast" and modes["flux.1-dev"] == "offload"
    assert set(modes) == {spec.weights_id for spec in SPECS.values()}
    assert set(registry.requested_modes(load_settings(environ={}), SPECS).values()) == {"auto"}
    assert load_settings({}, {"FLUXD_MODE": "lowvram"}).mode == "lowvram"


def test_a_mode_on_an_id_without_its_own_weights_names_the_checkpoint(tmp_path: Path) -> None:
    settings = load_settings(
        environ={}, config_file=toml(tmp_path, '[models."flux.2-dev-turbo"]\nmode = "fast"\n')
    )
    with pytest.raises(ValueError, match=r'models\.flux\.2-dev-turbo\.mode: .*models\."flux\.2-dev"'):
        configured_specs(settings)


@pytest.mark.parametrize("config", ['mode = "turbo"\n', '[models."flux.1-dev"]\nmode = "fp8"\n'])
def test_an_unknown_mode_is_refused(tmp_path: Path, config: str) -> None:
    with pytest.raises(ValidationError, match="mode"):
        load_settings(environ={}, config_file=toml(tmp_path, config))


def test_synthetic_weights_serve_every_built_in_model_without_a_checkpoint(tmp_path: Path) -> None:
    folder = checkpoint(tmp_path / "my-finetune")
    config = toml(tmp_path, f'[models.my-finetune]\nbase = "flux.1-dev"\npath = "{folder}"\n')
    settings = load_settings({"weights_dir": tmp_path / "empty", "weights": "synthetic"}, {}, config)
    assert set(served_specs(settings)) == set(SPECS)  # a user's own folder has no published config to build
    assert not served_specs(load_settings({"weights_dir": tmp_path / "empty"}, {}, None))
