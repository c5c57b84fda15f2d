"""One config file: farm.toml (FARM_CONFIG, else the user's XDG file above /etc/farm/farm.toml),
read by every command through pydantic-settings, below the environment and the options; written by
./bootstrap; shown by `farm config show`; hostile content is a one-line usage error naming the file."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from farm import config
from farm.config import Loaded
from farm.errors import UsageError
from tests.helpers import REPO, farm


def clean_env(tmp_path: Path, **extra: str) -> dict:
    """An environment without any FARM_* setting: only what a new login shell has."""
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path / "home"), "LANG": "C.UTF-8"}
    env.update(extra)
    return env


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_a_command_in_a_clean_environment_uses_the_cache_and_state_bootstrap_wrote(tmp_path):
    cfg = write(tmp_path / "farm.toml", '# mine\nbroker_url = ""\nnightly_cron = "0 3 * * *"\ncache_dir = "/old"\n')
    cache, state = tmp_path / "cache", tmp_path / "state"
    done = subprocess.run(
        ["sh", str(REPO / "bootstrap"), "config"], capture_output=True, text=True, timeout=60,
        env=clean_env(tmp_path, FARM_CONFIG=str(cfg), FARM_CACHE_DIR=str(cache), FARM_STATE_DIR=str(state)),
    )
    assert done.returncode == 0, done.stderr
    text = cfg.read_text()
    assert "# mine" in text and 'nightly_cron = "0 3 * * *"' in text, "bootstrap lost the user's keys"
    assert "/old" not in text

    env = clean_env(tmp_path, FARM_CONFIG=str(cfg))
    code, hosts, err = farm(env, "hosts", "check", "--json")
    assert code == 0, err
    assert hosts[0]["facts"]["cache_dir"] == f"{cache}/agent"  # the local agent works in the configured cache
    assert (state / "ledger.sqlite").is_file()  # the ledger is where the config says

    code, shown, err = farm(env, "config", "show", "--json")
    assert code == 0, err
    assert shown["files"] == [str(cfg)]
    assert shown["settings"]["cache_dir"] == {"value": str(cache), "source": f"file {cfg}"}
    assert shown["settings"]["nightly_cron"] == {"value": "0 3 * * *", "source": f"file {cfg}"}
    assert shown["settings"]["max_retries"] == {"value": "3", "source": "default"}

    again = subprocess.run(["sh", str(REPO / "bootstrap"), "config"], capture_output=True, text=True, timeout=60,
                           env=clean_env(tmp_path, FARM_CONFIG=str(cfg), FARM_CACHE_DIR=str(cache)))
    assert again.returncode == 0, again.stderr
    assert cfg.read_text().count("cache_dir") == 1, "a second bootstrap duplicated its key"


def test_the_users_xdg_config_file_is_read_without_farm_config(tmp_path):
    xdg = tmp_path / "xdg"
    write(xdg / "farm" / "farm.toml", f'state_dir = "{tmp_path / "s"}"\nmax_retries = 7\n')
    code, shown, err = farm(clean_env(tmp_path, XDG_CONFIG_HOME=str(xdg)), "config", "show", "--json")
    assert code == 0, err
    assert shown["settings"]["max_retries"] == {"value": "7", "source": f"file {xdg / 'farm' / 'farm.toml'}"}


def test_environment_is_above_the_file_and_options_above_the_environment(tmp_path):
    cfg = write(tmp_path / "farm.toml", 'job_time_limit = 600\nbroker_url = "redis://:filepass@file:6379/0"\n'
                'inventory = "/from/file.yaml"\n')
    env = clean_env(tmp_path, FARM_CONFIG=str(cfg), FARM_JOB_TIME_LIMIT="900", FARM_BROKER_URL="redis://env:6379/0")
    code, shown, err = farm(env, "config", "show", "--json", "--broker", "redis://:optpass@option:6379/1")
    assert code == 0, err
    s = shown["settings"]
    assert s["job_time_limit"] == {"value": "900", "source": "env FARM_JOB_TIME_LIMIT"}
    assert s["broker_url"] == {"value": "redis://:***@option:6379/1", "source": "option --broker"}
    assert s["inventory"] == {"value": "/from/file.yaml", "source": f"file {cfg}"}


def test_config_show_masks_secrets_from_the_file_in_text_and_json(tmp_path):
    cfg = write(tmp_path / "farm.toml", 'gitlab_token = "glpat-sekrit"\ndashboard_token = "dash-sekrit"\n'
                'broker_url = "redis://:hunter2@coordinator:6379/0"\n')
    env = clean_env(tmp_path, FARM_CONFIG=str(cfg), COLUMNS="200")
    for args in (("config", "show"), ("config", "show", "--json")):
        done = subprocess.run([sys.executable, "-m", "farm", *args], env=env, capture_output=True, text=True,
                              cwd=REPO, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "sekrit" not in done.stdout + done.stderr and "hunter2" not in done.stdout + done.stderr
        assert "redis://:***@coordinator:6379/0" in done.stdout
        assert f"file {cfg}" in done.stdout


def test_the_user_file_is_above_the_system_file(tmp_path, monkeypatch):
    system = write(tmp_path / "etc" / "farm.toml", 'max_retries = 5\nworker_grace = 9\n')
    xdg = tmp_path / "xdg"
    user = write(xdg / "farm" / "farm.toml", "max_retries = 1\n")
    monkeypatch.setattr(config, "SYSTEM_CONFIG", system)
    for name in [k for k in os.environ if k.startswith("FARM_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    loaded = Loaded()
    assert (loaded.settings.max_retries, loaded.settings.worker_grace) == (1, 9)
    assert loaded.origins()["max_retries"] == f"file {user}"
    assert loaded.origins()["worker_grace"] == f"file {system}"


HOSTILE = {
    "malformed TOML": ("cache_dir = \n", "not TOML"),
    "an unknown key": ("cache_dri = '/x'\n", "'cache_dri' is not a farm setting"),
    "an upper-case key": ("CACHE_DIR = '/x'\n", "(keys are in lower case: cache_dir)"),
    "a table": ("[farm]\ncache_dir = '/x'\n", "'farm' is not a farm setting"),
    "a wrong type": ("job_time_limit = 'soon'\n", "job_time_limit: Input should be a valid integer"),
    "a value out of range": ("job_time_limit = 5\n", "job_time_limit: Input should be greater than or equal to 60"),
    "a list for a path": ("cache_dir = [1, 2]\n", "cache_dir:"),
    "a choice not offered": ("mr_method = 'email'\n", "mr_method:"),
    "not UTF-8": (b"cache_dir = '\xff'\n", "not UTF-8"),
    "huge": ("# " + "x" * (2 << 20) + "\n", "larger than 1 MiB"),
    "deeply nested": ("inventory = " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_config_file_is_a_one_line_usage_error_naming_the_file(tmp_path, case):
    content, message = HOSTILE[case]
    cfg = tmp_path / "farm.toml"
    if isinstance(content, bytes):
        cfg.write_bytes(content)
    else:
        cfg.write_text(content)
    code, _, err = farm(clean_env(tmp_path, FARM_CONFIG=str(cfg)), "runs", "list", "--json")
    assert code == 2, err
    assert err.startswith(f"farm: {cfg}: ") and err.count("\n") == 1, err
    assert message in err
    assert "Traceback" not in err


@pytest.mark.parametrize("kind", ["a FIFO", "a directory", "a dangling symlink", "missing"])
def test_a_config_file_that_is_not_a_regular_file_is_refused_without_blocking(tmp_path, kind):
    cfg = tmp_path / "farm.toml"
    if kind == "a FIFO":
        os.mkfifo(cfg)
    elif kind == "a directory":
        cfg.mkdir()
    elif kind == "a dangling symlink":
        cfg.symlink_to(tmp_path / "nowhere")
    started = time.monotonic()
    code, _, err = farm(clean_env(tmp_path, FARM_CONFIG=str(cfg)), "config", "show")
    assert time.monotonic() - started < 30
    assert code == 2 and err.startswith(f"farm: {cfg}: ") and err.count("\n") == 1, err


def test_every_command_reads_the_file_a_worker_too(tmp_path):
    cfg = write(tmp_path / "farm.toml", "job_time_limit = 'soon'\n")
    for args in (("worker", "--hosts", "local-x86_64", "--broker", "redis://127.0.0.1:1/0"),
                 ("beat", "--broker", "redis://127.0.0.1:1/0"), ("nightly", "--dry-run"),
                 ("dashboard", "--port", "1"), ("probe", "--qemu", "9.2.0")):
        code, _, err = farm(clean_env(tmp_path, FARM_CONFIG=str(cfg)), *args)
        assert (code, err.startswith(f"farm: {cfg}: job_time_limit: ")) == (2, True), (args, err)


def test_a_secret_of_the_wrong_type_is_refused_without_being_shown(tmp_path):
    cfg = write(tmp_path / "farm.toml", "gitlab_token = 123456789\n")
    code, _, err = farm(clean_env(tmp_path, FARM_CONFIG=str(cfg)), "config", "show")
    assert code == 2 and err.startswith(f"farm: {cfg}: gitlab_token: ") and "123456789" not in err, err


def test_a_wrong_environment_value_still_names_its_variable(tmp_path):
    code, _, err = farm(clean_env(tmp_path, FARM_MAX_RETRIES="many"), "runs", "list")
    assert code == 2 and err.startswith("farm: FARM_MAX_RETRIES: "), err


def test_settings_built_directly_read_the_file_too(tmp_path, monkeypatch):
    cfg = write(tmp_path / "farm.toml", "quarantine_after = 8\n")
    monkeypatch.delenv("FARM_QUARANTINE_AFTER", raising=False)
    monkeypatch.setenv("FARM_CONFIG", str(cfg))
    assert config.Settings().quarantine_after == 8
    monkeypatch.setenv("FARM_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(UsageError, match="no such config file"):
        config.settings.cache_clear()
        config.settings()
    config.settings.cache_clear()
