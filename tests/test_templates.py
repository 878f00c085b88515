"""Every shipped template, served over HTTP and checked by the real validators.

Kickstarts go through pykickstart's ksvalidator for their release (a deprecated or unknown
command fails it); preseeds through ``debconf-set-selections --checkonly`` (its warnings, such
as an unknown type, count as failures too). Then the hostile-template and hostile-value cases.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from http_support import MAC, curl, running

from pxeserver.app import Context
from pxeserver.registry.models import HostChanges

KSVALIDATOR = str(Path(sys.executable).parent / "ksvalidator")
FULL_VARS = {
    "mirror": "http://mirror.example/os/",
    "root_password_hash": "$6$salt$abcdefghijklmnopqrstuv",
    "ssh_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJx admin@dom0",
    "timezone": "Europe/Berlin",
    "selinux": "permissive",
    "mirror_host": "ftp.de.debian.org",
    "mirror_dir": "/debian",
    "suite": "bookworm",
}
# template -> (path prefix, validator command, what the chapter's Xen setup needs in the file)
TEMPLATES = {
    "centos5-xen-pv.ks": ("ks", [KSVALIDATOR, "-v", "RHEL5"], [
        "--ondisk=xvda", "--drives=xvda", 'console=xvc0',
        "/sbin/agetty xvc0 9600 vt100-nav\" >> /etc/inittab", 'echo "xvc0" >> /etc/securetty',
        "alias scsi_hostadapter xenblk\nalias eth0 xennet\n", "selinux --disabled", "\nkernel-xen\n",
    ]),
    "fedora-xen-pvh.ks": ("ks", [KSVALIDATOR, "-v", "F40"], [
        "--drives=xvda", 'console=hvc0', "systemctl enable serial-getty@hvc0.service",
    ]),
    "debian-xen.cfg": ("preseed", ["debconf-set-selections", "--checkonly"], [
        "partman-auto/disk string /dev/xvda", "grub-installer/bootdev string /dev/xvda",
        "pkgsel/include string udev openssh-server", "ssh-server",
        "rm -f /etc/udev/rules.d/70-persistent-net.rules", "console=hvc0 net.ifnames=0",
        "serial-getty@hvc0",
    ]),
    "ubuntu-xen.cfg": ("preseed", ["debconf-set-selections", "--checkonly"], [
        "partman-auto/disk string /dev/xvda", "pkgsel/include string udev openssh-server",
        "rm -f /etc/udev/rules.d/70-persistent-net.rules", "console=hvc0 net.ifnames=0",
        "serial-getty@hvc0",
    ]),
}


def serve_template(ctx: Context, template: str, host_vars: dict, profile_vars: dict | None = None) -> str:
    ctx.provisioning.add_profile({"name": "p", "kernel": "k", "initrd": "i", "autoinstall": template,
                                  "vars": profile_vars or {}})
    # At 127.0.0.1, where curl fetches its file from.
    host = ctx.provisioning.add_host({"mac": MAC, "hostname": "web1.domu.example", "profile": "p",
                                      "ip": "127.0.0.1", "vars": host_vars})
    prefix = TEMPLATES[template][0] if template in TEMPLATES else "ks"
    with running(ctx):
        reply = curl(f"{ctx.config.http_base_url}/{prefix}/{host.mac.dashed}")
    assert reply.status == 200, reply.text
    return reply.text


def validate(command: list[str], text: str, tmp_path: Path) -> None:
    rendered = tmp_path / "rendered"
    rendered.write_text(text)
    done = subprocess.run([*command, str(rendered)], capture_output=True, text=True, timeout=60)
    complaints = done.stderr.strip() + re.sub(r"\s*Checking kickstart file \S+\s*", "", done.stdout)
    assert done.returncode == 0 and not complaints.strip(), f"{command[0]}: {complaints}\n{text}"


@pytest.mark.parametrize("variables", [{}, FULL_VARS], ids=["defaults", "all-vars"])
@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_shipped_template_passes_its_validator(ctx: Context, tmp_path: Path, template: str,
                                               variables: dict) -> None:
    text = serve_template(ctx, template, variables)
    validate(TEMPLATES[template][1], text, tmp_path)
    for needed in TEMPLATES[template][2]:
        assert needed in text, needed
    assert "web1" in text
    if variables:
        assert "mirror.example" in text or "ftp.de.debian.org" in text


def test_the_current_kickstart_also_passes_for_rhel9(ctx: Context, tmp_path: Path) -> None:
    validate([KSVALIDATOR, "-v", "RHEL9"], serve_template(ctx, "fedora-xen-pvh.ks", FULL_VARS), tmp_path)


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_the_install_calls_back_with_the_hosts_token(ctx: Context, template: str) -> None:
    text = serve_template(ctx, template, {})
    token = ctx.policy.host(ctx.store.list_hosts()[0].mac).install_token
    callback = f"{ctx.config.http_base_url}/api/hosts/00-16-3e-12-34-56/installed?token={token}"
    if template.endswith(".ks"):
        post = text.split("%post", 1)[1]
        assert f"'{callback}'" in post and "curl" in post
    else:
        late = next(line for line in text.splitlines() if line.startswith("d-i preseed/late_command"))
        assert f"in-target curl -fsS -X POST '{callback}'" in late


@pytest.fixture
def own_templates(ctx: Context, tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "kickstarts"
    directory.mkdir()
    ctx.config.server.kickstarts = str(directory)
    yield directory


@pytest.mark.parametrize("source, cause", [
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "SecurityError"),
    ("{{ cycler.__init__.__globals__.os.popen('id').read() }}", "SecurityError"),
    ("{% if %}broken", "TemplateSyntaxError"),
    ("url --url {{ vars.nowhere }}", "UndefinedError"),
    ("network --hostname={{ vars.injected }}", "UnsafeValue"),
])
def test_template_failures_are_500_with_the_cause_only_in_the_log(
        ctx: Context, own_templates: Path, caplog: pytest.LogCaptureFixture, source: str, cause: str) -> None:
    (own_templates / "bad.ks").write_text(source)
    caplog.set_level(logging.ERROR, logger="pxeserver.web.files")
    ctx.provisioning.add_profile({"name": "p", "kernel": "k", "initrd": "i", "autoinstall": "bad.ks"})
    host = ctx.provisioning.add_host({"mac": MAC, "hostname": "web1", "profile": "p", "ip": "127.0.0.1"})
    # The API refuses such a value (400); written straight into the store, as by an older
    # release, it must still never reach the rendered file.
    ctx.store.update_host(host.mac, HostChanges(fields={"vars": {"injected": "x\n%post\nrm -rf /\n%end"}}))
    with running(ctx):
        reply = curl(f"{ctx.config.http_base_url}/ks/{host.mac}")
    assert reply.status == 500
    assert "Traceback" not in reply.text and "__class__" not in reply.text and "rm -rf" not in reply.text
    assert cause in caplog.text and "bad.ks" in caplog.text
    assert ctx.policy.host(host.mac).status.value == "registered"  # a failed render is no install


def test_host_and_profile_values_are_data_not_templates(ctx: Context, own_templates: Path) -> None:
    (own_templates / "echo.ks").write_text(
        "{{ host.hostname }}|{{ vars.a }}|{{ profile.vars.b }}|{{ host.vars.c }}|{{ vars.c | shquote }}\n")
    payload = "{{ 7*7 }}{% for x in range(3) %}X{% endfor %}{{ config }}"
    host_text = serve_template(ctx, "echo.ks", {"a": payload, "c": "'; reboot; '"}, {"b": payload})
    assert host_text == (
        f"web1.domu.example|{payload}|{payload}|'; reboot; '|''\"'\"'; reboot; '\"'\"''\n"
    )


HOSTILE_VARS = {
    "timezone": "UTC --isUtc --nontp; reboot #",
    "mirror": "http://mirror.example/os/ --proxy=http://evil.example/",
    "root_password_hash": "x' --plaintext 'y",
    "ssh_key": 'ssh-ed25519 AAAA x" --username=attacker "$(reboot)',
}


@pytest.mark.parametrize("template, version", [("centos5-xen-pv.ks", "RHEL5"), ("fedora-xen-pvh.ks", "F40")])
def test_hostile_vars_stay_one_value_each(ctx: Context, tmp_path: Path, template: str, version: str) -> None:
    """Each var is one argument of its command, as pykickstart (anaconda's parser) reads it."""
    from pykickstart.parser import KickstartParser
    from pykickstart.version import makeVersion

    text = serve_template(ctx, template, HOSTILE_VARS)
    validate([KSVALIDATOR, "-v", version], text, tmp_path)
    handler = makeVersion(version)
    KickstartParser(handler).readKickstartFromString(text)
    assert handler.timezone.timezone == HOSTILE_VARS["timezone"] and handler.timezone.isUtc
    assert not getattr(handler.timezone, "nontp", False)
    assert handler.url.url == HOSTILE_VARS["mirror"] and not getattr(handler.url, "proxy", None)
    assert handler.rootpw.password == HOSTILE_VARS["root_password_hash"] and handler.rootpw.isCrypted
    if template.startswith("fedora"):
        (key,) = handler.sshkey.sshUserList
        assert (key.username, key.key) == ("root", HOSTILE_VARS["ssh_key"])
    post = text.split("%post", 1)[1]
    assert "reboot #" not in post and "evil.example" not in post and "$(reboot)" not in post


@pytest.mark.parametrize("selinux", [
    "permissive/' /etc/selinux/config; touch /tmp/pwned; echo '",
    "disabled/e",  # GNU sed's e flag runs the pattern space as a command
    "Permissive",
])
def test_selinux_outside_its_three_modes_is_never_written(
        ctx: Context, caplog: pytest.LogCaptureFixture, selinux: str) -> None:
    caplog.set_level(logging.ERROR, logger="pxeserver.web.files")
    ctx.provisioning.add_profile({"name": "p", "kernel": "k", "initrd": "i", "autoinstall": "centos5-xen-pv.ks"})
    host = ctx.provisioning.add_host({"mac": MAC, "hostname": "web1", "profile": "p", "ip": "127.0.0.1",
                                      "vars": {"selinux": selinux}})
    with running(ctx):
        reply = curl(f"{ctx.config.http_base_url}/ks/{host.mac}")
    assert reply.status == 500 and selinux not in reply.text and "%post" not in reply.text
    assert "UnsafeValue" in caplog.text and "enforcing, permissive, disabled" in caplog.text


def test_the_preseeds_take_values_as_data(ctx: Context, tmp_path: Path) -> None:
    """debconf reads a value to the end of its line: no quoting, and no line can be added."""
    hostile = {"mirror_host": "deb.example.org; reboot", "timezone": "Etc/UTC --x", "suite": "$(reboot)"}
    text = serve_template(ctx, "debian-xen.cfg", hostile)
    validate(["debconf-set-selections", "--checkonly"], text, tmp_path)
    assert "d-i mirror/http/hostname string deb.example.org; reboot\n" in text
    late = next(line for line in text.splitlines() if line.startswith("d-i preseed/late_command"))
    assert "reboot" not in late
