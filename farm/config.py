"""Settings (the inventory says which hosts; this says the rest), from, highest first: command-line
options, ``FARM_*`` environment variables, the config file, the defaults.

The config file is TOML, its keys the settings' names in lower case (``cache_dir = "/var/cache/farm"``):
the file ``$FARM_CONFIG`` names, else ``$XDG_CONFIG_HOME/farm/farm.toml`` (default
``~/.config/farm/farm.toml``) above ``/etc/farm/farm.toml``, each when it exists. A config file that
is not a regular file, too large, not TOML, with a key that is no setting or a value of the wrong
type is a one-line UsageError naming the file and the key.
"""

from __future__ import annotations

import contextvars
import functools
import os
import secrets
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from farm.caps import textfile
from farm.errors import OperationalError, UsageError

CONFIG_VARIABLE = "FARM_CONFIG"
SYSTEM_CONFIG = Path("/etc/farm/farm.toml")
CONFIG_LIMIT = 1 << 20  # bytes: a config file is a few lines
# The command-line options that set a setting (above the environment), by setting.
OPTIONS = {"broker_url": "--broker", "inventory": "--inventory", "libvirt_checkout": "--libvirt"}


def _xdg(variable: str, fallback: str) -> Path:
    return Path(os.environ.get(variable) or os.path.expanduser(fallback)) / "farm"


def config_files() -> list[Path]:
    """The config files read, highest first: ``$FARM_CONFIG`` alone when set (it must exist), else
    the user's and the system's, those that exist (a dangling symlink counts: it is refused)."""
    named = os.environ.get(CONFIG_VARIABLE)
    if named:
        path = Path(os.path.expanduser(named))
        if not os.path.lexists(path):
            raise UsageError(f"{path}: no such config file ({CONFIG_VARIABLE})")
        return [path]
    return [p for p in (user_config(), SYSTEM_CONFIG) if os.path.lexists(p)]


def user_config() -> Path:
    return _xdg("XDG_CONFIG_HOME", "~/.config") / "farm.toml"


class ConfigFile(TomlConfigSettingsSource):
    """pydantic-settings' TOML source over one config file, read as a hostile file: a regular file of
    at most CONFIG_LIMIT bytes, TOML, whose keys are all settings."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path):
        self.path = path
        super().__init__(settings_cls, toml_file=path)

    def _read_files(self, files: Any, deep_merge: bool = False) -> dict[str, Any]:
        return self._read_file(self.path)

    def _read_file(self, path: Any) -> dict[str, Any]:
        text = textfile.read(path, CONFIG_LIMIT, "config file")
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise UsageError(f"{path}: not TOML: {str(e).splitlines()[0]}") from None
        except RecursionError:
            raise UsageError(f"{path}: not TOML farm reads: nested too deeply") from None
        for key in data:
            if key not in Settings.model_fields:
                hint = f" (keys are in lower case: {key.lower()})" if key.lower() in Settings.model_fields else ""
                raise UsageError(f"{path}: {key[:80]!r} is not a farm setting{hint}")
        return data


# The config files the settings being built were read from (for saying where each value came from).
_read: contextvars.ContextVar[list[ConfigFile] | None] = contextvars.ContextVar("farm_config_read", default=None)


def _secret(value: SecretStr | None, file: Path | None, what: str) -> str | None:
    """A secret from the environment, else from its file (None if neither is set)."""
    if value and value.get_secret_value().strip():
        return value.get_secret_value().strip()
    if file is None:
        return None
    try:
        secret = file.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise UsageError(f"{file}: cannot read the {what} token: {e.strerror}") from None
    if not secret:
        raise UsageError(f"{file}: the {what} token file is empty")
    return secret


class Settings(BaseSettings):
    """farm's settings; each field ``x`` is read from the environment variable ``FARM_X``."""

    model_config = SettingsConfigDict(env_prefix="FARM_", extra="ignore")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Options (init arguments) above the environment above the config files."""
        files = [ConfigFile(settings_cls, path) for path in config_files()]
        read = _read.get()
        if read is not None:
            read.extend(files)
        return (init_settings, env_settings, *files)

    state_dir: Path = Field(
        default_factory=lambda: _xdg("XDG_DATA_HOME", "~/.local/share"),
        description="The ledger (SQLite) and the artifact store: dumps and their provenance.",
    )
    cache_dir: Path = Field(
        default_factory=lambda: _xdg("XDG_CACHE_HOME", "~/.cache"),
        description="Downloaded sources and builds on this machine (local hosts build here).",
    )
    inventory: Path | None = Field(
        None, description="The inventory file, when --inventory is not given (default: the built-in local one)."
    )
    broker_url: SecretStr | None = Field(
        None,
        description="Celery broker, e.g. redis://coordinator:6379/0; unset: jobs run embedded, in threads.",
    )
    job_time_limit: int = Field(
        4 * 3600,
        ge=60,
        description="Seconds a distributed job may take, toolchain builds included (Celery's hard time limit).",
    )
    visibility_timeout: int | None = Field(
        None,
        description="Seconds before Redis redelivers a job whose worker vanished "
        "(default: the job time limit plus 10 minutes; must be above it).",
    )
    max_retries: int = Field(
        3, ge=0, description="Times a job is handed to another host of its arch after an infrastructure failure."
    )
    worker_grace: int = Field(
        60, ge=0, description="Seconds a farm worker told to stop (SIGTERM) gives its running jobs to finish; "
        "then it stops them on their hosts and hands them back to the queue, for another worker.",
    )
    quarantine_after: int = Field(
        3, ge=1, description="Consecutive infrastructure failures after which a host is quarantined "
        "(until farm hosts release NAME).",
    )
    libvirt_checkout: Path | None = Field(
        None, description="The libvirt git checkout that dumps are published into."
    )
    libvirt_build_dir: Path | None = Field(
        None, description="meson build directory of the libvirt checkout, outside it "
        "(default: <cache_dir>/build/libvirt-publish).",
    )
    upstream_remote: str = Field("origin", description="Remote of the libvirt checkout that branches start from.")
    upstream_branch: str | None = Field(
        None, description="Branch of the upstream remote to start from (default: the remote's HEAD)."
    )
    fork_remote: str = Field("fork", description="Remote of the libvirt checkout that --mr pushes branches to.")
    mr_method: Literal["api", "push-options"] = Field(
        "api", description="How --mr opens merge requests: the GitLab API (python-gitlab), or git push options "
        "(-o merge_request.create)."
    )
    gitlab_url: str = Field("https://gitlab.com", description="The GitLab server merge requests are opened on.")
    gitlab_project: str | None = Field(
        None, description="The GitLab project (path, e.g. you/libvirt) that merge requests are pushed to."
    )
    gitlab_token: SecretStr | None = Field(
        None, description="GitLab access token (scope api); prefer FARM_GITLAB_TOKEN_FILE."
    )
    gitlab_token_file: Path | None = Field(None, description="A file holding the GitLab access token.")
    result_key_file: Path | None = Field(
        None, description="The farm's result key: workers seal their results with it, the coordinator checks "
        "them (default: <state_dir>/result.key, made when first needed; copy it to every worker's machine).",
    )
    dashboard_token: SecretStr | None = Field(
        None, description="Bearer token for the dashboard's actions (release a host); prefer the token file."
    )
    dashboard_token_file: Path | None = Field(
        None, description="A file holding the dashboard's bearer token; unset (and no token): actions disabled."
    )
    git_name: str | None = Field(None, description="Author name of publish commits (default: git config user.name).")
    git_email: str | None = Field(
        None, description="Author email of publish commits and Signed-off-by (default: git config user.email)."
    )
    qemu_git_url: str = Field(
        "https://gitlab.com/qemu-project/qemu.git",
        description="QEMU's git repository; farm nightly reads its release tags (git ls-remote --tags).",
    )
    nightly_min_qemu: str = Field("9.0.0", description="Oldest QEMU release farm nightly probes.")
    nightly_head: bool = Field(
        True, description="Whether farm nightly probes QEMU's development head (as the next release)."
    )
    nightly_publish: bool = Field(
        False, description="Whether the passes farm beat sends publish what changed (as farm nightly --publish), "
        "into FARM_LIBVIRT_CHECKOUT.",
    )
    nightly_cron: str = Field(
        "0 2 * * *", description="When farm nightly without --once runs a pass (cron expression, local time)."
    )

    @field_validator("state_dir", "cache_dir", "inventory", "libvirt_checkout", "libvirt_build_dir",
                     "gitlab_token_file", "dashboard_token_file", "result_key_file", mode="before")
    @classmethod
    def _expand(cls, value: object) -> object:
        if value == "":
            return None
        return Path(os.path.expanduser(value)) if isinstance(value, (str, Path)) else value

    @property
    def redelivery_after(self) -> int:
        """Redis' visibility timeout: above the job time limit, or a job still running would run twice."""
        if self.visibility_timeout is None:
            return self.job_time_limit + 600
        if self.visibility_timeout <= self.job_time_limit:
            raise UsageError(
                f"FARM_VISIBILITY_TIMEOUT ({self.visibility_timeout}) must be above FARM_JOB_TIME_LIMIT "
                f"({self.job_time_limit})"
            )
        return self.visibility_timeout

    @property
    def broker(self) -> str | None:
        """The broker URL in clear, for connecting."""
        return self.broker_url.get_secret_value() if self.broker_url else None

    def token(self) -> str:
        """The GitLab token: $FARM_GITLAB_TOKEN, else the content of the token file."""
        token = _secret(self.gitlab_token, self.gitlab_token_file, "GitLab")
        if token is None:
            raise UsageError("no GitLab token: set FARM_GITLAB_TOKEN_FILE (or FARM_GITLAB_TOKEN)")
        return token

    def result_key(self) -> bytes:
        """The farm's result key (FARM_RESULT_KEY_FILE; default <state_dir>/result.key, made with
        32 random bytes, mode 0600, when it does not exist)."""
        path = self.result_key_file or self.state_dir / "result.key"
        if self.result_key_file is None and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(secrets.token_hex(32) + "\n")
            except FileExistsError:  # another process made it meanwhile
                pass
            except OSError as e:
                raise OperationalError(f"{path}: cannot create the result key: {e.strerror}") from None
        try:
            key = path.read_bytes().strip()
        except OSError as e:
            raise UsageError(f"{path}: cannot read the result key (FARM_RESULT_KEY_FILE): {e.strerror}") from None
        if len(key) < 16:
            raise UsageError(f"{path}: the result key is too short (at least 16 characters)")
        return key

    def dashboard_secret(self) -> str | None:
        """The dashboard's action token: $FARM_DASHBOARD_TOKEN, else the token file's content; None: no actions."""
        return _secret(self.dashboard_token, self.dashboard_token_file, "dashboard")

    def public(self) -> dict[str, str | None]:
        """Every setting as text for showing to a user; secrets masked, the broker URL without password."""
        shown: dict[str, str | None] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if name == "broker_url" and value is not None:
                shown[name] = without_password(value.get_secret_value())
            elif isinstance(value, SecretStr):
                shown[name] = "**********"
            else:
                shown[name] = None if value is None else str(value)
        return shown


def origin(name: str, options: dict[str, object], files: list[ConfigFile]) -> str:
    """Where setting ``name`` comes from: ``option --X``, ``env FARM_X``, ``file PATH`` or ``default``."""
    if options.get(name) is not None:
        return f"option {OPTIONS.get(name, name)}"
    variable = f"FARM_{name.upper()}"
    if any(key.upper() == variable for key in os.environ):
        return f"env {variable}"
    for f in files:
        if name in f.toml_data:
            return f"file {f.path}"
    return "default"


class Loaded:
    """Settings together with where each of them came from."""

    def __init__(self, options: dict[str, object] | None = None):
        self.options = {k: v for k, v in (options or {}).items() if v is not None}
        read: list[ConfigFile] = []
        token = _read.set(read)
        try:
            self.settings = Settings(**self.options)  # type: ignore[arg-type]  # validated by pydantic
        except ValidationError as e:
            first = e.errors()[0]
            name = str(first["loc"][0]) if first["loc"] else "?"
            where = origin(name, self.options, read)
            secret = Settings.model_fields[name].annotation in (SecretStr, SecretStr | None) \
                if name in Settings.model_fields else True
            got = "(the value is not shown: a secret)" if secret else f"(got {str(first.get('input'))[:80]!r})"
            if where.startswith("file "):
                raise UsageError(f"{where[5:]}: {name}: {first['msg']} {got}") from None
            label = where.split(" ", 1)[1] if " " in where else f"FARM_{name.upper()}"
            raise UsageError(f"{label}: {first['msg']} {got}") from None
        finally:
            _read.reset(token)
        self.files = read

    def origins(self) -> dict[str, str]:
        return {name: origin(name, self.options, self.files) for name in Settings.model_fields}


def without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = f"{parts.username}:" if parts.username else ":"
    return parts._replace(netloc=f"{user}***@{netloc}").geturl()


@functools.cache
def settings() -> Settings:
    """The settings of this process, read once (``settings.cache_clear()`` re-reads them). A bad
    value is a UsageError naming its variable, or its config file and key."""
    return Loaded().settings
