"""The pxeserver command line, run as a user runs it: a subprocess in a fresh directory."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

PXESERVER = [sys.executable, "-m", "pxeserver"]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "preseeds").mkdir()
    (tmp_path / "kickstarts").mkdir()
    (tmp_path / "preseeds" / "debian-xen.cfg").write_text("d-i debian-installer/locale string en_US\n")
    (tmp_path / "pxeserver.toml").write_text(
        '[server]\naddress = "10.0.0.1"\n[dns]\ndomain = "lab.example"\n'
    )
    return tmp_path


def run(workdir: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*PXESERVER, *args], cwd=workdir, capture_output=True, text=True, timeout=60)
    if ok:
        assert result.returncode == 0, result.stderr
    return result


def state(workdir: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Every row of the registry and every boot config file with its content."""
    with sqlite3.connect(workdir / "var" / "registry.db") as conn:
        rows = [line for line in conn.iterdump() if "INSERT" in line and "meta" not in line]
    files = sorted((p.name, p.read_text()) for p in (workdir / "tftproot" / "pxelinux.cfg").glob("*"))
    return rows, files


def test_profile_and_host_lifecycle(workdir: Path) -> None:
    run(workdir, "profile", "add", "deb", "--kernel", "images/deb/linux", "--initrd",
        "images/deb/initrd.gz", "--append", "console=hvc0", "--autoinstall", "debian-xen.cfg")
    added = run(workdir, "profile", "add", "late", "--kernel", "images/deb/linux", "--initrd",
                "images/deb/initrd.gz")
    assert "warning: kernel images/deb/linux is not served from the TFTP root: file not found" in added.stderr
    shown = json.loads(run(workdir, "profile", "show", "deb").stdout)
    files = shown.pop("files")
    assert shown == {
        "name": "deb", "kernel": "images/deb/linux", "initrd": "images/deb/initrd.gz",
        "append": "console=hvc0", "autoinstall": "debian-xen.cfg", "vars": {}}
    assert (files["kernel"]["served"], files["kernel"]["problem"], files["kernel"]["matches"]) == (
        False, "file not found", None)
    mac = run(workdir, "host", "add", "--hostname", "web1", "--profile", "deb").stdout.strip()
    assert mac.startswith("00:16:3e:")
    run(workdir, "host", "add", "--mac", "00-16-3E-AA-BB-CC", "--hostname", "web2", "--profile", "deb",
        "--ip", "10.0.0.20")
    shown = json.loads(run(workdir, "host", "show", "00163eaabbcc").stdout)
    assert (shown["mac"], shown["ip"], shown["status"]) == ("00:16:3e:aa:bb:cc", "10.0.0.20", "registered")
    config = (workdir / "tftproot" / "pxelinux.cfg" / "01-00-16-3e-aa-bb-cc").read_text()
    assert "url=http://10.0.0.1/preseed/00-16-3e-aa-bb-cc" in config and "domain=lab.example" in config
    listing = run(workdir, "host", "list").stdout
    assert "web1" in listing and "web2" in listing and "10.0.0.20" in listing
    assert "off" in run(workdir, "host", "netboot", "00:16:3e:aa:bb:cc", "off").stdout
    assert "localboot 0" in (workdir / "tftproot" / "pxelinux.cfg" / "01-00-16-3e-aa-bb-cc").read_text()
    run(workdir, "host", "rm", mac)
    run(workdir, "host", "rm", "00:16:3e:aa:bb:cc")
    run(workdir, "profile", "rm", "late")
    run(workdir, "profile", "rm", "deb")
    assert "deb" not in run(workdir, "profile", "list").stdout


def test_domu_config_written_to_a_file(workdir: Path) -> None:
    run(workdir, "profile", "add", "deb", "--kernel", "k", "--initrd", "i")
    run(workdir, "host", "add", "--mac", "00:16:3e:aa:bb:cc", "--hostname", "web1", "--profile", "deb")
    run(workdir, "domu-config", "00:16:3E:AA:BB:CC", "--bridge", "br1", "--memory", "768",
        "--disk", "phy:/dev/vg_domu/web1,xvda,w", "-o", "web1.cfg")
    values: dict[str, object] = {}
    exec((workdir / "web1.cfg").read_text(), {}, values)
    assert values["vif"] == ["mac=00:16:3e:aa:bb:cc,bridge=br1"]
    assert values["memory"] == 768 and values["bootloader"] == "/usr/local/bin/pypxeboot"
    assert values["bootloader_args"] == ["mac=00:16:3e:aa:bb:cc", "interface=br1"]
    assert (values["name"], values["type"], values["vcpus"], values["disk"]) == (
        "web1", "pv", 1, ["format=raw,vdev=xvda,access=rw,target=/dev/vg_domu/web1"])


def test_disk_roots_come_from_the_config_file(workdir: Path) -> None:
    with (workdir / "pxeserver.toml").open("a") as config:
        config.write('[xen]\ndisk_roots = ["/srv/domu/"]\n')
    run(workdir, "profile", "add", "deb", "--kernel", "k", "--initrd", "i")
    run(workdir, "host", "add", "--mac", "00:16:3e:aa:bb:cc", "--hostname", "web1", "--profile", "deb",
        "--disk", "/srv/domu/web1.qcow2,qcow2,xvda,rw")
    refused = run(workdir, "host", "add", "--hostname", "web2", "--profile", "deb",
                  "--disk", "/dev/vg_domu/web2", ok=False)
    assert refused.returncode == 1 and "not under the allowed roots (/srv/domu/" in refused.stderr
    shown = json.loads(run(workdir, "host", "show", "00:16:3e:aa:bb:cc").stdout)
    assert shown["xen"]["disk"] == "format=qcow2,vdev=xvda,access=rw,target=/srv/domu/web1.qcow2"


def test_show_masks_secret_variables(workdir: Path) -> None:
    with (workdir / "pxeserver.toml").open("a") as config:
        config.write('[api]\nsecret_vars = ["luks"]\n')
    run(workdir, "profile", "add", "deb", "--kernel", "k", "--initrd", "i",
        "--var", "Root_Password_Hash=$6$salt$hash", "--var", "suite=bookworm")
    run(workdir, "host", "add", "--mac", "00:16:3e:aa:bb:cc", "--hostname", "web1", "--profile", "deb",
        "--var", "luks=hunter2", "--var", "api_token=t0k", "--var", "ssh_key=ssh-ed25519 AAAA",
        "--var", "timezone=Europe/Berlin")
    profile = run(workdir, "profile", "show", "deb").stdout
    host = run(workdir, "host", "show", "00:16:3e:aa:bb:cc").stdout
    listings = profile + host + run(workdir, "host", "list").stdout + run(workdir, "profile", "list").stdout
    for secret in ("$6$salt$hash", "hunter2", "t0k", "AAAA"):
        assert secret not in listings
    assert json.loads(profile)["vars"] == {"Root_Password_Hash": "********", "suite": "bookworm"}
    assert json.loads(host)["vars"] == {"luks": "********", "api_token": "********",
                                        "ssh_key": "********", "timezone": "Europe/Berlin"}
    # Stored as given, for the templates.
    with sqlite3.connect(workdir / "var" / "registry.db") as conn:
        stored = json.loads(conn.execute("SELECT vars FROM hosts").fetchone()[0])
    assert stored["luks"] == "hunter2" and stored["ssh_key"] == "ssh-ed25519 AAAA"


def test_domu_config_pins_pxeserver_s_dhcp_and_names_the_configured_bootloader(workdir: Path) -> None:
    (workdir / "pxeserver.toml").write_text(
        '[server]\naddress = "10.0.0.1"\n[dhcp]\nenabled = true\n'
        '[xen]\nbootloader = "/usr/lib/xen-4.17/bin/pypxeboot"\n')
    run(workdir, "profile", "add", "deb", "--kernel", "k", "--initrd", "i")
    run(workdir, "host", "add", "--mac", "00:16:3e:aa:bb:cc", "--hostname", "web1", "--profile", "deb")
    values: dict[str, object] = {}
    exec(run(workdir, "domu-config", "00:16:3e:aa:bb:cc").stdout, {}, values)
    assert values["bootloader"] == "/usr/lib/xen-4.17/bin/pypxeboot"
    assert values["bootloader_args"] == ["mac=00:16:3e:aa:bb:cc", "interface=xenbr0", "dhcp_server=10.0.0.1"]


def test_domu_config_gives_pypxeboot_the_dom0_cache_when_configured(workdir: Path) -> None:
    (workdir / "pxeserver.toml").write_text('[xen]\npypxeboot_cache_dir = "/var/cache/pypxeboot"\n')
    run(workdir, "profile", "add", "deb", "--kernel", "k", "--initrd", "i")
    run(workdir, "host", "add", "--mac", "00:16:3e:aa:bb:cc", "--hostname", "web1", "--profile", "deb")
    values: dict[str, object] = {}
    exec(run(workdir, "domu-config", "00:16:3e:aa:bb:cc").stdout, {}, values)
    assert values["bootloader_args"] == ["mac=00:16:3e:aa:bb:cc", "interface=xenbr0", "cache_dir=/var/cache/pypxeboot"]
    (workdir / "pxeserver.toml").write_text('[xen]\npypxeboot_cache_dir = "cache"\n')
    result = run(workdir, "host", "list", ok=False)
    assert result.returncode == 1 and "[xen] pypxeboot_cache_dir must be empty or an absolute path" in result.stderr


@pytest.mark.parametrize("bootloader", ["pypxeboot", '/usr/bin/x"; y="', "/usr/bin/py pxe"])
def test_a_bootloader_that_is_not_a_plain_absolute_path_is_refused(workdir: Path, bootloader: str) -> None:
    (workdir / "pxeserver.toml").write_text(f"[xen]\nbootloader = {json.dumps(bootloader)}\n")
    result = run(workdir, "host", "list", ok=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and "[xen] bootloader must be an absolute path" in lines[0]


BAD = [
    (["host", "add", "--mac", "00:16:3e:zz:00:01", "--hostname", "x", "--profile", "deb"], "invalid MAC"),
    (["host", "add", "--mac", "00:16:3e:aa:bb:cc", "--hostname", "dup", "--profile", "deb"], "already exists"),
    (["host", "add", "--hostname", "web1", "--profile", "deb"], "already taken"),
    (["host", "add", "--hostname", "bad_name!", "--profile", "deb"], "invalid hostname"),
    (["host", "add", "--hostname", "x", "--profile", "ghost"], "unknown profile"),
    (["host", "add", "--hostname", "x", "--profile", "deb", "--ip", "300.1.1.1"], "invalid IPv4"),
    (["host", "add", "--hostname", "x", "--profile", "deb", "--memory", "1"], "xen.memory"),
    (["host", "show", "00:16:3e:00:00:01"], "no host"),
    (["host", "netboot", "nonsense", "on"], "invalid MAC"),
    (["profile", "add", "deb", "--kernel", "k", "--initrd", "i"], "already exists"),
    (["profile", "add", "p2", "--kernel", "../../etc/passwd", "--initrd", "i"], "relative to the TFTP root"),
    (["profile", "add", "p2", "--kernel", "k", "--initrd", "i", "--autoinstall", "../../etc/passwd"], "not a path"),
    (["profile", "add", "p2", "--kernel", "k", "--initrd", "i", "--autoinstall", "missing.cfg"], "neither"),
    (["profile", "add", "p2", "--kernel", "k", "--initrd", "i", "--append", "quiet"], "key=value"),
    (["profile", "rm", "deb"], "used by 1 host"),
    (["profile", "rm", "ghost"], "no profile"),
    (["domu-config", "00:16:3e:aa:bb:cc", "--disk", "x']; evil = ['"], "xen.disk"),
    (["domu-config", "00:16:3e:aa:bb:cc", "--disk", "phy:/dev/sda,xvda,w"], "not under the allowed roots"),
    (["domu-config", "00:16:3e:aa:bb:cc", "--disk", "/dev/vg_domu/x,xvda,w,script=/tmp/x"], "'script' is not allowed"),
    (["domu-config", "00:16:3e:aa:bb:cc", "--bridge", "br0 x"], "xen.bridge"),
    (["host", "add", "--hostname", "x", "--profile", "deb", "--disk", "/dev/vg_domu/../sda"], "'..'"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(a[:2]) + f"-{i}" for i, (a, _) in enumerate(BAD)])
def test_bad_input_exits_nonzero_with_one_line_and_changes_nothing(workdir: Path, args: list[str],
                                                                   message: str) -> None:
    run(workdir, "profile", "add", "deb", "--kernel", "k", "--initrd", "i")
    run(workdir, "host", "add", "--mac", "00:16:3e:aa:bb:cc", "--hostname", "web1", "--profile", "deb")
    before = state(workdir)
    result = run(workdir, *args, ok=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr
    assert state(workdir) == before


def test_broken_config_file_is_one_clear_line(workdir: Path) -> None:
    (workdir / "pxeserver.toml").write_text("[tftp]\nprot = 69\n")
    result = run(workdir, "host", "list", ok=False)
    assert result.returncode == 1 and "unknown key 'prot'" in result.stderr


@pytest.mark.parametrize("text, message", [
    ('[xen]\ndisk_roots = ["dev/vg_domu/"]\n',
     "[xen] disk_roots must be absolute paths without '..', not 'dev/vg_domu/'"),
    ('[xen]\ndisk_roots = ["/dev/vg_domu/../"]\n', "[xen] disk_roots"),
    ('[http]\nautoinstall_trusted_networks = ["10.0.0.0/33"]\n', "[http] autoinstall_trusted_networks"),
    ('[http]\nautoinstall_trusted_networks = [5]\n', "[http] autoinstall_trusted_networks"),
    ('[server]\nevents_per_host = 0\n', "[server] events_per_host must be 1..1000000"),
    ('[api]\nsecret_vars = [1]\n', "[api] secret_vars"),
])
def test_new_security_settings_are_checked(workdir: Path, text: str, message: str) -> None:
    (workdir / "pxeserver.toml").write_text(text)
    result = run(workdir, "host", "list", ok=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and message in lines[0], result.stderr


@pytest.mark.both_stores
def test_db_migrate_and_check(workdir: Path, store_kind: str, request: pytest.FixtureRequest) -> None:
    """``db check`` fails (exit 1, one line saying what to do) until ``db migrate`` has run,
    then passes; the CLI's own commands work on the migrated registry; a PostgreSQL URL is
    shown without its password."""
    if store_kind == "postgresql":
        cluster = request.getfixturevalue("pg_cluster")
        url = cluster.new_database().replace("pxeserver@", "pxeserver:s3cret@")
        (workdir / "pxeserver.toml").write_text(
            f'[server]\naddress = "10.0.0.1"\ndatabase = "{url}"\n[dns]\ndomain = "lab.example"\n')
        shown = f"PostgreSQL 127.0.0.1:{cluster.port}/"
    else:
        shown = f"SQLite {workdir / 'var' / 'registry.db'}"
    before = run(workdir, "db", "check", ok=False)
    assert before.returncode == 1 and before.stderr.startswith(f"pxeserver: error: {shown}")
    assert "run 'pxeserver db migrate'" in before.stderr and before.stderr.count("\n") == 1
    assert "s3cret" not in before.stderr
    from pxeserver.registry import postgres, sqlite

    current = len((postgres if store_kind == "postgresql" else sqlite).MIGRATIONS)
    migrated = run(workdir, "db", "migrate").stdout
    assert migrated.startswith(shown) and f"schema version from 0 to {current}" in migrated
    assert "up to date" in run(workdir, "db", "migrate").stdout
    assert f"reachable, schema version {current} (current)" in run(workdir, "db", "check").stdout
    run(workdir, "profile", "add", "deb", "--kernel", "k/linux", "--initrd", "k/initrd")
    assert "deb" in run(workdir, "profile", "list").stdout


def test_db_check_names_an_unreachable_postgresql(workdir: Path) -> None:
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (workdir / "pxeserver.toml").write_text(
        f'[server]\naddress = "10.0.0.1"\ndatabase = "postgresql://pxe@127.0.0.1:{port}/pxe"\n')
    for command in (["db", "check"], ["profile", "list"]):
        result = run(workdir, *command, ok=False)
        assert result.returncode == 1, result.stderr
        assert result.stderr.startswith("pxeserver: error: ") and "Traceback" not in result.stderr
        assert "Connection refused" in result.stderr or "unreachable" in result.stderr, result.stderr
