"""``make install DESTDIR=...``: the unit starts an installed ``vmferryd``, the config is kept.

Needs no systemd running: the unit is checked by ``systemd-analyze verify`` (when
present) against the staged files, and parsed here.
"""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from vmferry.daemon.config import load_config

REPO = Path(__file__).resolve().parents[2]
PREFIX = "/opt/vmferry"


def _unit(path: Path) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    unit.read_string(path.read_text())
    return unit


def test_make_install_stages_a_working_unit(tmp_path: Path) -> None:
    stage = tmp_path / "root"
    mine = stage / "etc/vmferry/vmferryd.toml"
    mine.parent.mkdir(parents=True)
    mine.write_text('[host]\nhostname = "kept"\n')  # the admin's: never overwritten
    # --no-deps: the test needs the entry points, not a second copy of every dependency.
    run = subprocess.run(
        ["make", "-C", str(REPO), "install", f"DESTDIR={stage}", "PIP_OPTS=--no-deps"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if run.returncode and ("NewConnectionError" in run.stderr or "No matching" in run.stderr):
        pytest.skip("pip cannot reach a package index for the build backend")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]

    service = stage / "etc/systemd/system/vmferryd.service"
    unit = _unit(service)
    argv = shlex.split(unit["Service"]["ExecStart"])
    assert argv[0] == f"{PREFIX}/bin/vmferryd"
    staged = stage / argv[0].lstrip("/")
    assert staged.is_file() and staged.stat().st_mode & 0o111
    # The staged script runs the installed package from where it will live.
    assert staged.read_text().splitlines()[0] == f"#!{PREFIX}/bin/python"
    entry = subprocess.run(
        [
            str(stage / PREFIX.lstrip("/") / "bin/python"),
            "-c",
            "import importlib.metadata as m;"
            "print(m.entry_points(group='console_scripts')['vmferryd'].value)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert entry.stdout.strip() == "vmferry.daemon.main:main"
    assert (stage / "usr/local/bin/vmferryd").readlink() == Path(argv[0])

    # The options the daemon's parser knows, and the files they name.
    from vmferry.daemon.main import parse_args

    args = parse_args(argv[1:])
    assert str(args.config) == "/etc/vmferry/vmferryd.toml"
    assert (stage / str(args.state_dir).lstrip("/")).stat().st_mode & 0o777 == 0o700
    assert [u.split("?")[0] for u in args.listen] == [
        "unix:///run/vmferry/vmferryd.sock",
        "unix:///run/vmferry/vmferryd-ro.sock",
    ]
    assert unit["Service"]["KillMode"] == "process"  # guests outlive a daemon restart
    assert unit["Service"]["RuntimeDirectory"] == "vmferry"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    assert mine.read_text() == '[host]\nhostname = "kept"\n'
    # The default config the target installs where none is: valid as it ships.
    assert load_config(REPO / "dist/vmferryd.toml").paths.roots

    if shutil.which("systemd-analyze"):
        # Verified against the staged binary (no systemd runs here, so no --root).
        copy = tmp_path / "vmferryd.service"
        copy.write_text(service.read_text().replace(PREFIX, str(stage / PREFIX.lstrip("/"))))
        check = subprocess.run(
            ["systemd-analyze", "verify", "--man=no", str(copy)], capture_output=True, text=True
        )
        assert check.returncode == 0, check.stderr
