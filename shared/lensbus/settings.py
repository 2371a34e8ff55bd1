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

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
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
    nats_user: str | None = Field(
        default=None,
        description="NATS user name; with an nkey or creds it is not sent, it names the "
        "user's inbox (_INBOX_<user>; default: the service's name)",
    )
    nats_password: SecretStr | None = Field(default=None, description="NATS password")
    nats_token: SecretStr | None = Field(default=None, description="NATS token")
    nats_creds: Path | None = Field(default=None, description="NATS .creds file (JWT + nkey)")
    nats_nkey_file: Path | None = Field(
        default=None,
        description="file holding this user's NATS nkey seed (SU..., mode 0600); a rotated "
        "seed is used from the next start",
    )
    nats_nkey_seed: SecretStr | None = Field(
        default=None,
        description="the nkey seed itself, for a service whose children run users' code "
        "and could read its files but not its hidden environment (deployer, projects)",
    )
    nats_tls_ca: Path | None = Field(default=None, description="CA bundle to verify NATS TLS")
    nats_tls_cert: Path | None = Field(
        default=None, description="client certificate for NATS TLS (with nats_tls_key)"
    )
    nats_tls_key: Path | None = Field(default=None, description="client certificate's key")
    jetstream_replicas: int | None = Field(
        default=None,
        ge=1,
        le=5,
        description="replicas of the streams, buckets and stores a service creates (3 on a "
        "cluster); a resource found with another count is updated in place; unset: created "
        "at 1, an existing count left alone (so a service left at the default never lowers "
        "what another set)",
    )
    prefix: str = Field(default=DEFAULT_PREFIX, description="subject prefix")
    instance: str = Field(default_factory=default_instance, description="instance id")
    metrics_host: str = Field(default="127.0.0.1", description="address of /metrics, /healthz")
    metrics_port: int = Field(default=0, ge=0, le=65535, description="0 picks a free port")
    heartbeat_s: float = Field(default=2.0, gt=0, le=300, description="heartbeat interval")
    drain_timeout_s: float = Field(default=5.0, gt=0, le=120, description="drain limit at stop")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    nice: int = Field(
        default=0,
        ge=0,
        le=19,
        description="the service's nice value (0-19; higher yields the CPU to the others: "
        "capture's default is 10, see lensbus.placement)",
    )
    cpus: str | None = Field(
        default=None,
        description="CPUs the service runs on, like 0-2,5 (unset: every CPU; see "
        "lensbus.placement)",
    )

    @field_validator("cpus")
    @classmethod
    def _cpus(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        from lensbus.placement import parse_cpus

        parse_cpus(v)
        return v

    @property
    def cpu_set(self) -> frozenset[int] | None:
        from lensbus.placement import parse_cpus

        return parse_cpus(self.cpus) if self.cpus else None

    @field_validator("jetstream_replicas", mode="before")
    @classmethod
    def _replicas(cls, v: object) -> object:
        # compose passes ${LENSBUS_JETSTREAM_REPLICAS:-}: empty is "unset", not an error.
        return None if isinstance(v, str) and not v.strip() else v

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

    @model_validator(mode="after")
    def _one_credential(self) -> ServiceSettings:
        given = [
            name
            for name in ("nats_password", "nats_creds", "nats_nkey_file", "nats_nkey_seed")
            if getattr(self, name) is not None
        ]
        if len(given) > 1:
            raise ValueError(f"give one NATS credential, not {' and '.join(given)}")
        if self.nats_nkey_file is not None:
            from lensbus.bus import read_nkey_file

            read_nkey_file(self.nats_nkey_file)  # names the file, never the seed
        if self.nats_nkey_seed is not None:
            from lensbus.natscallout import public_nkey

            try:
                public_nkey(self.nats_nkey_seed.get_secret_value().strip())
            except ValueError:
                raise ValueError("nats_nkey_seed: not a NATS user nkey seed (SU...)") from None
        if self.nats_tls_key is not None and self.nats_tls_cert is None:
            raise ValueError("nats_tls_key needs nats_tls_cert (the client certificate)")
        return self

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


def _secret(cls: type[ServiceSettings], name: str) -> bool:
    """Whether setting ``name`` holds a secret (its value never goes into a message)."""
    field = cls.model_fields.get(name)
    return field is not None and "SecretStr" in str(field.annotation)


def _describe(cls: type[ServiceSettings], exc: ValidationError) -> str:
    lines = []
    for err in exc.errors(include_url=False):
        field = ".".join(str(p) for p in err["loc"]) or "<settings>"
        env = f"{cls.env_prefix()}{str(err['loc'][0]).upper()}" if err["loc"] else ""
        where = f" (env {env})" if env and err["type"] != "extra_forbidden" else ""
        # A check of the whole (loc empty) would print every input, secrets too.
        quiet = not err["loc"] or _secret(cls, str(err["loc"][0]))
        plain = err["type"] not in ("missing", "extra_forbidden") and not quiet
        got = f", got {err['input']!r}" if plain else ""
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
