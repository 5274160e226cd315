"""Settings: each declared once; flags > FLUXD_ env > TOML > defaults; the TOML file as model registry.
No torch, no server."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError
from pydantic_settings import SettingsError

from pipelines.contract import presence
from pipelines.contract.specs import SPECS
from server.declarations.settings import DEFAULT_CACHE, Settings
from server.declarations.settings_loading import cli_flags, env_name, load_settings, problems
from server.declarations.settings_readme import readme_with_settings_table
from server.front import registry
from server.front.registry import configured_specs, served_specs
from server.tools import cli

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
    monkeypatch.setattr(presence, "_in_hub_cache", lambda repo_id, filename: False)


@pytest.fixture(autouse=True)
def environ(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No FLUXD_ variable of this machine's; a test sets its own with `environ.setenv`."""
    for name in list(os.environ):
        if name.startswith("FLUXD_"):
            monkeypatch.delenv(name)
    return monkeypatch


def with_config(tmp_path: Path, text: str, *flags: str) -> Settings:
    return load_settings(["--config", str(toml(tmp_path, text)), *flags])


def test_defaults_without_any_source() -> None:
    settings = load_settings()
    assert settings == Settings.model_validate({})  # the declared defaults alone
    assert (settings.host, settings.port, settings.devices) == ("127.0.0.1", 8000, ["cpu"])
    assert (settings.demo, settings.no_auth, settings.all_api_keys()) == (False, False, [])
    assert settings.weights_dir == Path("weights")


def test_flags_beat_env_beat_toml_beat_defaults(tmp_path: Path, environ: pytest.MonkeyPatch) -> None:
    config = toml(tmp_path, 'port = 9001\nhost = "10.0.0.1"\ndefault_model = "flux.1-dev"\n')
    environ.setenv("FLUXD_PORT", "9002")
    environ.setenv("FLUXD_HOST", "10.0.0.2")
    environ.setenv("FLUXD_CONFIG", str(config))
    settings = load_settings(["--port", "9003"])
    assert settings.port == 9003  # flag over env and TOML
    assert settings.host == "10.0.0.2"  # env over TOML
    assert settings.default_model == "flux.1-dev"  # TOML over default
    assert settings.queue_size == 64  # default


def test_config_file_from_env_and_the_flag_wins(tmp_path: Path, environ: pytest.MonkeyPatch) -> None:
    environ.setenv("FLUXD_CONFIG", str(toml(tmp_path, "port = 9001\n")))
    explicit = tmp_path / "explicit.toml"
    explicit.write_text("port = 9005\n")
    assert load_settings().port == 9001
    assert load_settings(["--config", str(explicit)]).port == 9005


@pytest.mark.parametrize(
    ("variable", "raw", "field", "expected"),
    [
        ("FLUXD_API_KEYS", " k1, k2,,k3 ,", "api_keys", [SecretStr("k1"), SecretStr("k2"), SecretStr("k3")]),
        (
            "FLUXD_API_KEYS",
            '["k1,still k1", "k2"]',
            "api_keys",
            [SecretStr("k1,still k1"), SecretStr("k2")],
        ),  # JSON too
        ("FLUXD_DEVICES", "cuda:0,cuda:1", "devices", ["cuda:0", "cuda:1"]),
        ("FLUXD_CORS_ORIGINS", "http://a.lan,http://b.lan", "cors_origins", ["http://a.lan", "http://b.lan"]),
        ("FLUXD_PRELOAD", "flux.1-dev", "preload", ["flux.1-dev"]),
        ("FLUXD_DEMO", "true", "demo", True),
        ("FLUXD_NO_AUTH", "1", "no_auth", True),
        ("FLUXD_MAX_BODY_MB", "0.5", "max_body_mb", 0.5),
        ("FLUXD_QUEUE_TIMEOUT_S", "30", "queue_timeout_s", 30.0),
        ("FLUXD_WEIGHTS_DIR", "/data/weights", "weights_dir", Path("/data/weights")),
        ("FLUXD_WORKER_START_TIMEOUT_S", "90", "worker_start_timeout_s", 90.0),
        ("FLUXD_MODELS", '{"fast": {"base": "flux.2-dev"}}', "models", {"fast": {"base": "flux.2-dev"}}),
    ],
)
def test_env_values_are_parsed(
    environ: pytest.MonkeyPatch, variable: str, raw: str, field: str, expected: object
) -> None:
    environ.setenv(variable, raw)
    value = getattr(load_settings(), field)
    assert (
        value if field != "models" else {k: v.model_dump(exclude_unset=True) for k, v in value.items()}
    ) == (expected)


@pytest.mark.parametrize(
    ("flags", "field", "expected"),
    [
        (["--api-key", "k1", "--api-key", "k2"], "api_keys", [SecretStr("k1"), SecretStr("k2")]),
        (["--api-keys", "k1,k2"], "api_keys", [SecretStr("k1"), SecretStr("k2")]),
        (
            ["--cors-origin", "http://a.lan", "--cors-origin", "http://b.lan"],
            "cors_origins",
            ["http://a.lan", "http://b.lan"],
        ),
        (["--devices", "cuda:0,cuda:1"], "devices", ["cuda:0", "cuda:1"]),
        (["--preload", "flux.2-dev,flux.1-dev"], "preload", ["flux.2-dev", "flux.1-dev"]),
        (["--queue-timeout", "30"], "queue_timeout_s", 30.0),
        (["--queue-timeout-s", "30"], "queue_timeout_s", 30.0),
        (["--image-ttl", "3"], "image_ttl_s", 3.0),
        (["--demo"], "demo", True),
        (["--no-auth"], "no_auth", True),
        (["--log-prompts"], "log_prompts", True),
        (["--mode", "offload"], "mode", "offload"),
        (["--worker-start-timeout-s", "90"], "worker_start_timeout_s", 90.0),
        (["--demo-size", "128x96"], "demo_size", "128x96"),
    ],
)
def test_flags_are_parsed(flags: list[str], field: str, expected: object) -> None:
    assert getattr(load_settings(flags), field) == expected


def test_api_keys_from_flags_and_file_are_merged_blank_ones_dropped(tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("f1\n\n  f2  \n")
    settings = load_settings(
        ["--api-key", "k1", "--api-key", "", "--api-key", "  ", "--api-key-file", str(key_file)]
    )
    assert settings.all_api_keys() == ["k1", "f1", "f2"]


def test_demo_serves_the_cached_tiny_weights_unless_a_weights_dir_is_given(
    tmp_path: Path, environ: pytest.MonkeyPatch
) -> None:
    assert load_settings(["--demo"]).weights_dir == DEFAULT_CACHE / "tiny"
    assert load_settings(["--demo", "--weights-dir", "weights"]).weights_dir == Path("weights")
    assert with_config(tmp_path, 'weights_dir = "/data/w"\n', "--demo").weights_dir == Path("/data/w")
    environ.setenv("FLUXD_WEIGHTS_DIR", "/env/w")
    assert load_settings(["--demo"]).weights_dir == Path("/env/w")


@pytest.mark.parametrize(
    ("env", "flags", "config"),
    [
        ({"FLUXD_PORT": "eighty"}, [], ""),
        ({"FLUXD_PORT": "70000"}, [], ""),
        ({"FLUXD_QUEUE_SIZE": "0"}, [], ""),
        ({"FLUXD_DEMO": "maybe"}, [], ""),
        ({}, ["--max-batch-images", "0"], ""),
        ({}, ["--mode", "turbo"], ""),
        ({}, [], "max_body_mb = -1\n"),
        ({}, [], 'devices = "cpu"\n'),  # TOML lists are lists: a bare string is a mistake, not a split
        ({}, [], "[models.x]\ndefault_steps = 'many'\n"),
    ],
)
def test_bad_values_raise(
    tmp_path: Path, environ: pytest.MonkeyPatch, env: dict, flags: list[str], config: str
) -> None:
    for name, value in env.items():
        environ.setenv(name, value)
    with pytest.raises((ValidationError, SystemExit)):
        load_settings([*flags, *(["--config", str(toml(tmp_path, config))] if config else [])])


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("port = \n", "fluxd.toml"),  # a TOML syntax error names the file
        (None, "not found"),
    ],
)
def test_a_broken_or_missing_config_file_raises(tmp_path: Path, config: str | None, message: str) -> None:
    path = toml(tmp_path, config) if config is not None else tmp_path / "missing.toml"
    with pytest.raises(SettingsError, match=message):
        load_settings(["--config", str(path)])


@pytest.mark.parametrize(
    ("config", "unknown"),
    [
        ('defualt_model = "flux.1-dev"\n', "defualt_model"),
        ('[models.fast]\nbsae = "flux.2-dev"\n', "models.fast.bsae"),
    ],
)
def test_unknown_toml_keys_raise_naming_the_key(tmp_path: Path, config: str, unknown: str) -> None:
    with pytest.raises(ValidationError) as caught:
        with_config(tmp_path, config)
    assert f"unknown setting `{unknown}`" in problems(caught.value)


def test_a_removed_setting_is_an_unknown_one(tmp_path: Path) -> None:
    # default_edit_model is gone: --default-model is the default of every route.
    with pytest.raises(ValidationError):
        with_config(tmp_path, 'default_edit_model = "flux.1-kontext-dev"\n')


def test_serve_refuses_a_bad_value_before_starting_naming_where_it_is_set(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["serve", "--port", "eighty"]) == 2
    error = capsys.readouterr().err
    assert "port" in error and "--port" in error and "FLUXD_PORT" in error and "eighty" in error


@pytest.mark.parametrize("flag", ["--bogus", "--queue-t"])  # unknown, and an abbreviation of a real one
def test_serve_refuses_an_unknown_flag(capsys: pytest.CaptureFixture[str], flag: str) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(["serve", flag, "5"])
    assert caught.value.code == 2
    assert f"unrecognized arguments: {flag}" in capsys.readouterr().err


def serve_help(capsys: pytest.CaptureFixture[str], environ: pytest.MonkeyPatch) -> str:
    environ.setenv("COLUMNS", "2000")  # no wrapping inside a description (argparse breaks at hyphens too)
    with pytest.raises(SystemExit) as caught:
        cli.main(["serve", "--help"])
    assert caught.value.code == 0
    return capsys.readouterr().out


def test_serve_help_lists_every_setting_with_its_flags_env_name_and_description(
    capsys: pytest.CaptureFixture[str], environ: pytest.MonkeyPatch
) -> None:
    text = serve_help(capsys, environ)
    for name, field in Settings.model_fields.items():
        assert field.description, f"{name} has no description"
        for flag in cli_flags(name):
            assert f"{flag} " in text, flag
        assert f"[env: {env_name(name)}]" in text, name
        assert field.description in text, name


def test_every_setting_has_a_row_in_readme() -> None:
    rows = [line for line in README.read_text().splitlines() if line.startswith("| `--")]
    for name in Settings.model_fields:
        assert any(f"| `{cli_flags(name)[-1]}` | `{env_name(name)}` |" in row for row in rows), name


def test_readme_settings_table_is_the_generated_one() -> None:
    text = README.read_text()
    assert readme_with_settings_table(text) == text, (
        "README's Settings table differs from the settings in server/declarations/settings.py: "
        "run `python -m server.declarations.settings_readme README.md`"
    )


def test_registry_adds_a_local_folder_as_a_new_model(tmp_path: Path) -> None:
    folder = checkpoint(tmp_path / "my-finetune")
    config = toml(tmp_path, f'[models.my-finetune]\nbase = "flux.1-dev"\npath = "{folder}"\n')
    settings = load_settings(["--weights-dir", str(tmp_path / "empty"), "--config", str(config)])
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
    settings = load_settings(["--weights-dir", str(weights), "--config", str(config)])
    fast = configured_specs(settings)["fast"]
    assert (fast.alias, fast.weights_id, fast.family) == (True, "flux.2-dev", "flux2")
    assert (fast.default_size, fast.default_steps, fast.default_guidance) == ((768, 512), 12, 3.5)
    assert "fast" not in served_specs(settings)  # its base is not on disk yet
    checkpoint(weights / "flux.2-dev")
    assert {"fast", "flux.2-dev"} <= set(served_specs(settings))


def test_registry_changes_the_defaults_of_a_built_in_id(tmp_path: Path) -> None:
    config = toml(tmp_path, '[models."flux.1-dev"]\ndefault_steps = 20\n')
    spec = configured_specs(load_settings(["--config", str(config)]))["flux.1-dev"]
    assert (spec.id, spec.alias, spec.default_steps) == ("flux.1-dev", False, 20)


def test_registry_unknown_base_is_an_error(tmp_path: Path) -> None:
    settings = with_config(tmp_path, '[models.x]\nbase = "flux.3"\n')
    with pytest.raises(ValueError, match=r"models\.x.*flux\.3"):
        configured_specs(settings)


def test_demo_sets_a_small_default_size_everywhere(environ: pytest.MonkeyPatch) -> None:
    assert {spec.default_size for spec in configured_specs(load_settings()).values()} == {(1024, 1024)}
    demo = configured_specs(load_settings(["--demo"]))
    assert {spec.default_size for spec in demo.values()} == {(256, 256)}
    environ.setenv("FLUXD_DEMO", "1")
    environ.setenv("FLUXD_DEMO_SIZE", "128x96")
    custom = configured_specs(load_settings())
    assert {spec.default_size for spec in custom.values()} == {(128, 96)}


@pytest.mark.parametrize(
    "config",
    ['demo = true\ndemo_size = "small"\n', '[models.x]\nbase = "flux.1-dev"\ndefault_size = "big"\n'],
)
def test_a_size_that_is_not_w_x_h_is_an_error(tmp_path: Path, config: str) -> None:
    with pytest.raises(ValueError):
        configured_specs(with_config(tmp_path, config))


def readme_registry_example(tmp_path: Path) -> Settings:
    """README's ```toml block, loaded as a user would load it."""
    [block] = re.findall(r"^```toml\n(.*?)^```$", README.read_text(), flags=re.MULTILINE | re.DOTALL)
    return with_config(tmp_path, block, "--weights-dir", str(tmp_path / "weights"))


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


def test_modes_default_to_auto_and_the_toml_sets_one_per_checkpoint(
    tmp_path: Path, environ: pytest.MonkeyPatch
) -> None:
    config = toml(tmp_path, 'mode = "offload"\n[models."flux.2-dev"]\nmode = "fast"\n')
    settings = load_settings(["--config", str(config)])
    modes = registry.requested_modes(settings, configured_specs(settings))
    assert modes["flux.2-dev"] == "fast" and modes["flux.1-dev"] == "offload"
    assert set(modes) == {spec.weights_id for spec in SPECS.values()}
    assert set(registry.requested_modes(load_settings(), SPECS).values()) == {"auto"}
    environ.setenv("FLUXD_MODE", "lowvram")
    assert load_settings().mode == "lowvram"


def test_a_mode_on_an_id_without_its_own_weights_names_the_checkpoint(tmp_path: Path) -> None:
    settings = with_config(tmp_path, '[models."flux.2-dev-turbo"]\nmode = "fast"\n')
    with pytest.raises(ValueError, match=r'models\.flux\.2-dev-turbo\.mode: .*models\."flux\.2-dev"'):
        configured_specs(settings)


@pytest.mark.parametrize("config", ['mode = "turbo"\n', '[models."flux.1-dev"]\nmode = "fp8"\n'])
def test_an_unknown_mode_is_refused(tmp_path: Path, config: str) -> None:
    with pytest.raises(ValidationError, match="mode"):
        with_config(tmp_path, config)


def test_synthetic_weights_serve_every_built_in_model_without_a_checkpoint(tmp_path: Path) -> None:
    folder = checkpoint(tmp_path / "my-finetune")
    config = toml(tmp_path, f'[models.my-finetune]\nbase = "flux.1-dev"\npath = "{folder}"\n')
    settings = load_settings(
        ["--weights-dir", str(tmp_path / "empty"), "--weights", "synthetic", "--config", str(config)]
    )
    assert set(served_specs(settings)) == set(SPECS)  # a user's own folder has no published config to build
    assert not served_specs(load_settings(["--weights-dir", str(tmp_path / "empty")]))


@pytest.mark.parametrize(
    "flags",
    [
        ["--webhook-allow", "http://h/x", "--webhook-secret", "whsec_c2hvcnQ="],  # too short
        ["--webhook-allow", "http://h/x", "--webhook-secret", "whsec_sk-key-1!"],  # not base64
        ["--webhook-allow", "http://h/x", "--ray-min-replicas", "2", "--ray-max-replicas", "1"],
        ["--webhook-allow", "http://ops:sk-key-1@h/x"],
        ["--fetch-allow", "http://ops:sk-key-1@h/x"],
    ],
)
def test_a_start_up_error_shows_no_secret(flags: list[str]) -> None:
    secret = "whsec_" + "A" * 43
    with pytest.raises(ValidationError) as caught:
        load_settings(["--api-key", "sk-key-1", "--webhook-secret", secret, *flags])
    shown = problems(caught.value)
    assert shown and "sk-key-1" not in shown and "AAAA" not in shown and "c2hvcnQ" not in shown
