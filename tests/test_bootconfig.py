"""Boot policy and the bootloader-config helper, read back the way the clients read them."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from pxeserver import app, domu
from pxeserver.config import Config
from pxeserver.mac import MacAddress
from pxeserver.policy import LocalBoot, NetBoot
from pxeserver.registry import ValidationError

pytestmark = pytest.mark.both_stores  # registry behaviour: SQLite and PostgreSQL

MAC = "00:16:3e:aa:bb:cc"


def parse_like_original_pypxeboot(text: str) -> dict[str, object]:
    """The original pypxeboot's reading of a config, as PROTOCOLS.md records it.

    It knows only default/label/kernel/append/localboot; it takes the default label's entry,
    splits each append word once on '=' and keeps only words that have one.
    """
    default, labels, current = None, {}, None
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        keyword = words[0].lower()
        if keyword == "default":
            default = words[1]
        elif keyword == "label":
            current = labels.setdefault(words[1], {})
        elif keyword == "kernel" and current is not None:
            current["kernel"] = words[1]
        elif keyword == "localboot" and current is not None:
            current["localboot"] = True
        elif keyword == "append" and current is not None:
            pairs = [w.split("=") for w in words[1:]]
            current["append"] = {p[0]: p[1] for p in pairs if len(p) == 2}
            current["broken"] = [w for w, p in zip(words[1:], pairs, strict=True) if len(p) != 2]
    return labels[default]


@pytest.fixture
def templates(tmp_path: Path, config: Config) -> Config:
    (tmp_path / "ks").mkdir()
    (tmp_path / "ps").mkdir()
    (tmp_path / "ks" / "centos5.ks").write_text("install\n")
    (tmp_path / "ps" / "debian.cfg").write_text("d-i debian-installer/locale string en_US\n")
    config.server.kickstarts = str(tmp_path / "ks")
    config.server.preseeds = str(tmp_path / "ps")
    config.http.port = 8080
    return config


@pytest.fixture
def context(templates: Config):
    context = app.build(templates)
    yield context
    context.close()


def _add(context, template: str, mac: str = MAC, hostname: str = "web1", **extra):
    profile_name = template.replace(".", "-")
    if profile_name not in {p.name for p in context.store.list_profiles()}:
        context.provisioning.add_profile({
            "name": profile_name, "kernel": f"images/{profile_name}/vmlinuz",
            "initrd": f"images/{profile_name}/initrd.img", "append": "console=hvc0",
            "autoinstall": template,
        })
    return context.provisioning.add_host({"mac": mac, "hostname": hostname, "profile": profile_name, **extra})


def test_kickstart_host_config_points_the_installer_at_its_kickstart(context) -> None:
    host = _add(context, "centos5.ks")
    text = (context.config.tftp_root / "pxelinux.cfg" / "01-00-16-3e-aa-bb-cc").read_text()
    entry = parse_like_original_pypxeboot(text)
    url = "http://127.0.0.1:8080/ks/00-16-3e-aa-bb-cc"
    assert entry["kernel"] == "images/centos5-ks/vmlinuz"
    assert entry["append"] == {"initrd": "images/centos5-ks/initrd.img", "ks": url,
                               "inst.ks": url, "console": "hvc0"}
    assert entry["broken"] == []
    assert context.policy.boot_spec(host.mac) == NetBoot(
        "images/centos5-ks/vmlinuz", "images/centos5-ks/initrd.img", f"ks={url} inst.ks={url} console=hvc0")


def test_preseed_host_config_carries_url_auto_priority_hostname_domain(context) -> None:
    _add(context, "debian.cfg", hostname="db1.example.org")
    text = (context.config.tftp_root / "pxelinux.cfg" / "01-00-16-3e-aa-bb-cc").read_text()
    append = parse_like_original_pypxeboot(text)["append"]
    assert append["url"] == "http://127.0.0.1:8080/preseed/00-16-3e-aa-bb-cc"
    assert (append["auto"], append["priority"]) == ("true", "critical")
    assert (append["hostname"], append["domain"]) == ("db1", "domu.example")


def test_netboot_off_writes_localboot_and_never_deletes_the_file(context) -> None:
    host = _add(context, "debian.cfg")
    path = context.config.tftp_root / "pxelinux.cfg" / host.mac.pxelinux_name
    context.provisioning.set_netboot(host.mac, False)
    assert parse_like_original_pypxeboot(path.read_text()) == {"localboot": True}
    assert context.policy.boot_spec(host.mac) == LocalBoot()
    context.provisioning.set_netboot(host.mac, True)
    assert "kernel" in parse_like_original_pypxeboot(path.read_text())


def test_unknown_macs_boot_locally_unless_a_default_profile_is_set(context) -> None:
    unknown = MacAddress.parse("00:16:3e:00:00:99")
    assert context.policy.boot_spec(unknown) == LocalBoot()
    context.writer.write_default()
    default = context.config.tftp_root / "pxelinux.cfg" / "default"
    assert parse_like_original_pypxeboot(default.read_text()) == {"localboot": True}
    _add(context, "debian.cfg")
    context.config.boot.default_profile = "debian-cfg"
    spec = context.policy.boot_spec(unknown)
    assert isinstance(spec, NetBoot) and spec.kernel == "images/debian-cfg/vmlinuz"
    assert "preseed/" not in spec.cmdline, "an unknown host must not get another host's preseed"


def test_a_change_rewrites_only_the_changed_hosts_file(context) -> None:
    hosts = [_add(context, "debian.cfg", mac=f"00:16:3e:00:01:{i:02x}", hostname=f"h{i}") for i in range(20)]
    directory = context.config.tftp_root / "pxelinux.cfg"
    old = 1_000_000_000
    for path in directory.iterdir():
        os.utime(path, (old, old))
    context.provisioning.update_host(hosts[7].mac, {"hostname": "renamed"})
    touched = sorted(p.name for p in directory.iterdir() if p.stat().st_mtime != old)
    assert touched == [hosts[7].mac.pxelinux_name]
    assert "hostname=renamed" in (directory / hosts[7].mac.pxelinux_name).read_text()
    assert not [p for p in directory.iterdir() if p.name.startswith(".tmp")]


def test_deleting_a_host_removes_its_file(context) -> None:
    host = _add(context, "debian.cfg")
    path = context.config.tftp_root / "pxelinux.cfg" / host.mac.pxelinux_name
    context.provisioning.delete_host(host.mac)
    assert not path.exists()


@pytest.mark.parametrize("name, expected", [
    ("01-00-16-3e-aa-bb-cc", "web1"),
    ("01-00-16-3E-AA-BB-CC", "web1"),  # the original pypxeboot keeps the case the user typed
    ("0A000005", "web1"),
    ("0A00000", "web1"),  # a prefix of the asking client's own address
    ("0A", "web1"),
    ("0A000006", None),
    ("01-00-16-3e-aa-bb-cd", None),
    ("01-zz-16-3e-aa-bb-cc", None),
    ("0a000005", None),  # pxelinux asks upper case only
    ("../default", None),
])
def test_pxelinux_names_resolve_as_clients_ask_them(context, name: str, expected: str | None) -> None:
    _add(context, "debian.cfg", ip="10.0.0.5")
    spec = context.policy.pxelinux_config(name, client_ip="10.0.0.5")
    if expected is None:
        assert spec is None
    else:
        assert isinstance(spec, NetBoot) and f"hostname={expected}" in spec.cmdline


def test_hex_prefix_of_another_clients_address_is_not_this_host(context) -> None:
    _add(context, "debian.cfg", ip="10.0.0.5")
    assert context.policy.pxelinux_config("0A00000", client_ip="10.0.0.7") is None


def test_profile_change_rewrites_its_hosts(context) -> None:
    host = _add(context, "debian.cfg")
    context.provisioning.replace_profile("debian-cfg", {
        "kernel": "images/new/vmlinuz", "initrd": "images/new/initrd.img", "autoinstall": "debian.cfg"})
    text = (context.config.tftp_root / "pxelinux.cfg" / host.mac.pxelinux_name).read_text()
    assert parse_like_original_pypxeboot(text)["kernel"] == "images/new/vmlinuz"


def test_profile_naming_a_missing_template_is_refused(context) -> None:
    with pytest.raises(ValidationError, match="neither kickstarts/ nor preseeds/"):
        context.provisioning.add_profile({"name": "x", "kernel": "k", "initrd": "i", "autoinstall": "nope.ks"})


def test_domu_config_boots_through_pypxeboot(context) -> None:
    host = _add(context, "debian.cfg", xen={"memory": 2048, "vcpus": 2, "disk": "phy:/dev/vg_domu/web1,xvda,w"})
    values: dict[str, object] = {}
    exec(domu.render(host), {}, values)  # xl's config syntax is a subset of Python's
    assert values["bootloader"] == "/usr/local/bin/pypxeboot"  # xl finds a bare name only in its own directory
    assert values["bootloader_args"] == [f"mac={MAC}", "interface=xenbr0"]
    assert values["vif"] == [f"mac={MAC},bridge=xenbr0"]
    # xm's deprecated form comes back in xl's keyed form, as parsed and checked.
    assert values["disk"] == ["format=raw,vdev=xvda,access=rw,target=/dev/vg_domu/web1"]
    assert (values["memory"], values["vcpus"], values["name"]) == (2048, 2, "web1")
    assert values["on_reboot"] == "restart"


def test_timeline_records_registration(context) -> None:
    host = _add(context, "debian.cfg")
    events = context.timeline.events(host.mac)
    assert [e.source for e in events] == ["api"]
    assert "registered as web1" in events[0].message
    assert abs(events[0].time - time.time()) < 60


def test_lifecycle_only_moves_forward_and_only_while_netbooting(context) -> None:
    from pxeserver.registry import Status

    host = _add(context, "debian.cfg")
    context.policy.advance(host.mac, Status.INSTALLING)
    assert context.store.get_host(host.mac).status is Status.INSTALLING
    context.policy.advance(host.mac, Status.NETBOOTING)
    assert context.store.get_host(host.mac).status is Status.INSTALLING
    other = _add(context, "debian.cfg", mac="00:16:3e:00:00:02", hostname="web2", netboot=False)
    context.policy.advance(other.mac, Status.NETBOOTING)
    assert context.store.get_host(other.mac).status is Status.REGISTERED
    messages = [e.message for e in context.timeline.events(host.mac)]
    assert messages[-1] == "status registered -> installing"
