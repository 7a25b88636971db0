"""The daemon's configuration file (TOML), like libvirt's ``qemu.conf``.

Every key is optional; an absent file means all defaults::

    [host]
    hostname = ""            # override the hostname in host.json
    uuid = ""                # override the host UUID in host.json

    [jobs]
    wait_timeout = 30.0      # seconds a job waits for another to finish

    [migration]
    port_min = 49152         # incoming migration ports of the destination
    port_max = 49215
    listen_address = ""      # "": the address the destination host is reached by
    bandwidth_mib_s = 0      # default bandwidth limit, 0 = unlimited

    [keepalive]
    interval = 5.0           # seconds between keepalive probes, 0 = off
    count = 5                # unanswered probes before the peer is dead

    [tls]
    pki_dir = "/etc/vmferry/pki"   # relative paths are relative to the file

    [qemu]
    emulator = "qemu-system-x86_64"
    emulators = []           # allowed <emulator> values; [] = emulator, resolved in PATH
    user = "vmferry-qemu"    # QEMU runs as this user; "" or "root" = as root (UNSAFE)
    group = "vmferry-qemu"   # and group ("" = the user's primary group)
    sandbox = true           # QEMU's seccomp filter (-sandbox on,...)
    userfaultfd = true       # give the QEMU group /dev/userfaultfd (post-copy needs it)

    [paths]
    roots = ["/var/lib/vmferry/images"]   # kernel, initrd, disk paths must lie below one

Unknown sections or keys and values of the wrong type are errors, so a typo
never goes unnoticed.
"""

from __future__ import annotations

import dataclasses
import tomllib
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmferry.errors import ErrorCode, VmferryError


@dataclass
class HostConfig:
    hostname: str = ""
    uuid: str = ""


@dataclass
class JobsConfig:
    wait_timeout: float = 30.0


@dataclass
class MigrationConfig:
    port_min: int = 49152
    port_max: int = 49215
    listen_address: str = ""
    bandwidth_mib_s: int = 0


@dataclass
class KeepaliveConfig:
    interval: float = 5.0
    count: int = 5


@dataclass
class TlsConfig:
    pki_dir: Path | None = None


@dataclass
class QemuConfig:
    emulator: str = "qemu-system-x86_64"
    emulators: list[str] = field(default_factory=list)
    user: str = "vmferry-qemu"
    group: str = "vmferry-qemu"
    sandbox: bool = True
    userfaultfd: bool = True


@dataclass
class PathsConfig:
    roots: list[str] = field(default_factory=lambda: ["/var/lib/vmferry/images"])


@dataclass
class DaemonConfig:
    """All settings of ``vmferryd``, one attribute per TOML section."""

    host: HostConfig = field(default_factory=HostConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    migration: MigrationConfig = field(default_factory=MigrationConfig)
    keepalive: KeepaliveConfig = field(default_factory=KeepaliveConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    qemu: QemuConfig = field(default_factory=QemuConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


# A key accepts the type of its default; these (default None) take a path instead.
_PATH_FIELDS = {("tls", "pki_dir")}


def _convert(where: str, key: str, expected: type, value: Any, base: Path) -> Any:
    def wrong(kind: str) -> VmferryError:
        return VmferryError(
            ErrorCode.INVALID_ARG,
            f"{where}: {key} must be {kind}, not {type(value).__name__} {value!r}",
        )

    # bool is an int subclass in Python, but `port_min = true` is a mistake.
    if expected is Path:
        if not isinstance(value, str) or not value:
            raise wrong("a non-empty path string")
        path = Path(value).expanduser()
        return path if path.is_absolute() else base / path
    if expected is bool:
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if expected is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise wrong("a number")
        return float(value)
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
        return value
    if expected is str:
        if not isinstance(value, str):
            raise wrong("a string")
        return value
    if expected is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise wrong("a list of strings")
        return list(value)
    raise AssertionError(f"no converter for {expected}")


def _check(where: str, config: DaemonConfig) -> None:
    def bad(message: str) -> VmferryError:
        return VmferryError(ErrorCode.INVALID_ARG, f"{where}: {message}")

    if config.host.uuid:
        try:
            config.host.uuid = str(uuid.UUID(config.host.uuid))
        except ValueError:
            raise bad(f"host.uuid {config.host.uuid!r} is not a UUID") from None
    if config.jobs.wait_timeout <= 0:
        raise bad("jobs.wait_timeout must be > 0")
    mig = config.migration
    for key in ("port_min", "port_max"):
        if not 1 <= getattr(mig, key) <= 65535:
            raise bad(f"migration.{key} must be between 1 and 65535")
    if mig.port_min > mig.port_max:
        raise bad("migration.port_min must not be greater than migration.port_max")
    if mig.bandwidth_mib_s < 0:
        raise bad("migration.bandwidth_mib_s must be >= 0 (0 = unlimited)")
    if config.keepalive.interval < 0:
        raise bad("keepalive.interval must be >= 0 (0 = off)")
    if config.keepalive.count < 1:
        raise bad("keepalive.count must be >= 1")
    if not config.qemu.emulator:
        raise bad("qemu.emulator must not be empty")
    for key, values in (
        ("qemu.emulators", config.qemu.emulators),
        ("paths.roots", config.paths.roots),
    ):
        for value in values:
            if not value.startswith("/"):
                raise bad(f"{key}: {value!r} is not an absolute path")


def load_config(path: Path | None) -> DaemonConfig:
    """
    Read the daemon's configuration file.

    :param path: The TOML file, or None for all defaults.
    :raise VmferryError: ``INVALID_ARG`` naming the file and key on any
        unreadable file, syntax error, unknown key or wrong value.
    """
    config = DaemonConfig()
    if path is None:
        return config
    path = Path(path)
    where = str(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise VmferryError(ErrorCode.INVALID_ARG, f"config file {path} does not exist") from None
    except OSError as exc:
        raise VmferryError(
            ErrorCode.INVALID_ARG, f"cannot read config file {path}: {exc.strerror}"
        ) from exc
    except tomllib.TOMLDecodeError as exc:
        raise VmferryError(ErrorCode.INVALID_ARG, f"{where}: invalid TOML: {exc}") from exc

    base = path.absolute().parent
    sections = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    for section_name, table in data.items():
        if section_name not in sections:
            raise VmferryError(
                ErrorCode.INVALID_ARG,
                f"{where}: unknown section [{section_name}] (known: {', '.join(sorted(sections))})",
            )
        if not isinstance(table, dict):
            raise VmferryError(
                ErrorCode.INVALID_ARG, f"{where}: {section_name} must be a [{section_name}] table"
            )
        section = sections[section_name]
        defaults = {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}
        for key, value in table.items():
            full_key = f"{section_name}.{key}"
            if key not in defaults:
                raise VmferryError(
                    ErrorCode.INVALID_ARG,
                    f"{where}: unknown key {full_key} (known in [{section_name}]: "
                    f"{', '.join(sorted(defaults))})",
                )
            expected = Path if (section_name, key) in _PATH_FIELDS else type(defaults[key])
            setattr(section, key, _convert(where, full_key, expected, value, base))
    _check(where, config)
    return config
