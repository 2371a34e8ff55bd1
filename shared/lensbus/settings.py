"""Settings base for every service: environment, an optional YAML/TOML file, fail fast.

A service subclasses :class:`ServiceSettings`, sets ``service`` and the env prefix
``LENSBUS_<SERVICE>_``, and calls :func:`load_settings` at start. A wrong value, an unknown
key or a misspelt ``LENSBUS_<SERVICE>_*`` variable stops the service with a message that
names the field.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

from lensbus.errors import SettingsError
from lensbus.subjects import DEFAULT_PREFIX, validate_prefix, validate_token

S = TypeVar("S", bound="ServiceSettings")


def default_instance() -> str:
    host = "".join(c if c.isalnum() or c in "_-" else "-" for c in socket.gethostname())
    return f"{host[:40] or 'host'}-{os.getpid()}"


class ServiceSettings(BaseSettings):
    """Settings every service shares. Subclasses add their own fields."""

    model_config = SettingsConfigDict(extra="forbid", validate_default=True)

    service: ClassVar[str] = "service"
    # Where an optional YAML or TOML file is read from (set by load_settings).
    _config_file: ClassVar[Path | None] = None

    nats_url: str = Field(
        default="nats://127.0.0.1:4222", description="NATS server URL(s), comma-separated"
    )
    nats_user: str | None = Field(default=None, description="NATS user name")
    nats_password: SecretStr | None = Field(default=None, description="NATS password")
    nats_token: SecretStr | None = Field(default=None, description="NATS token")
    nats_creds: Path | None = Field(default=None, description="NATS .creds file (JWT + nkey)")
    nats_tls_ca: Path | None = Field(default=None, description="CA bundle to verify NATS TLS")
    prefix: str = Field(default=DEFAULT_PREFIX, description="subject prefix")
    instance: str = Field(default_factory=default_instance, description="instance id")
    metrics_host: str = Field(default="127.0.0.1", description="address of /metrics, /healthz")
    metrics_port: int = Field(default=0, ge=0, le=65535, description="0 picks a free port")
    heartbeat_s: float = Field(default=2.0, gt=0, le=300, description="heartbeat interval")
    drain_timeout_s: float = Field(default=5.0, gt=0, le=120, description="drain limit at stop")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        return validate_prefix(v)

    @field_validator("instance")
    @classmethod
    def _instance(cls, v: str) -> str:
        return validate_token(v, "instance id")

    @field_validator("nats_url")
    @classmethod
    def _urls(cls, v: str) -> str:
        for url in v.split(","):
            if not url.strip().startswith(("nats://", "tls://", "ws://", "wss://")):
                raise ValueError(f"{url.strip()!r} is not a nats://, tls://, ws:// or wss:// URL")
        return v

    @property
    def nats_servers(self) -> list[str]:
        return [u.strip() for u in self.nats_url.split(",") if u.strip()]

    @classmethod
    def env_prefix(cls) -> str:
        return f"LENSBUS_{cls.service.upper()}_"

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        # Every service reads LENSBUS_<SERVICE>_*: derived from ``service`` so a subclass
        # cannot forget it (and silently read unprefixed variables).
        super().__pydantic_init_subclass__(**kwargs)
        cls.model_config["env_prefix"] = cls.env_prefix()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = cls._config_file
        if path is not None:
            if path.suffix in (".yaml", ".yml"):
                sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
            else:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)


def _unknown_env(cls: type[ServiceSettings]) -> list[str]:
    prefix = cls.env_prefix()
    known = {f"{prefix}{name}".upper() for name in cls.model_fields} | {f"{prefix}CONFIG"}
    return sorted(k for k in os.environ if k.upper().startswith(prefix) and k.upper() not in known)


def _describe(cls: type[ServiceSettings], exc: ValidationError) -> str:
    lines = []
    for err in exc.errors(include_url=False):
        field = ".".join(str(p) for p in err["loc"]) or "<settings>"
        env = f"{cls.env_prefix()}{str(err['loc'][0]).upper()}" if err["loc"] else ""
        where = f" (env {env})" if env and err["type"] != "extra_forbidden" else ""
        got = "" if err["type"] in ("missing", "extra_forbidden") else f", got {err['input']!r}"
        msg = "unknown setting" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"  {field}{where}: {msg}{got}")
    return f"invalid {cls.service} settings:\n" + "\n".join(lines)


def load_settings(cls: type[S], config_file: str | Path | None = None, **overrides: Any) -> S:
    """Build settings from overrides, environment and an optional file; fail naming fields.

    The file comes from ``config_file`` or ``LENSBUS_<SERVICE>_CONFIG`` (``.yaml``/``.yml``
    or ``.toml``).
    """
    unknown = _unknown_env(cls)
    if unknown:
        raise SettingsError(
            f"invalid {cls.service} settings:\n"
            + "\n".join(f"  {k}: unknown setting (a typo?)" for k in unknown)
        )
    path = config_file or os.environ.get(f"{cls.env_prefix()}CONFIG")
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise SettingsError(f"invalid {cls.service} settings: config file {path} not found")
        if path.suffix not in (".yaml", ".yml", ".toml"):
            raise SettingsError(
                f"invalid {cls.service} settings: config file {path} must be .yaml, .yml or .toml"
            )
    cls._config_file = path
    try:
        return cls(**overrides)
    except ValidationError as exc:
        raise SettingsError(_describe(cls, exc)) from None
    except Exception as exc:  # a YAML/TOML syntax error, a file that is not a mapping
        raise SettingsError(f"invalid {cls.service} settings: {exc}") from None
    finally:
        cls._config_file = None
