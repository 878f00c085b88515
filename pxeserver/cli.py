"""The ``pxeserver`` command line (click): serve, profile, host, domu-config, build-pypxeboot
and lab.

Every change goes through :class:`~pxeserver.provisioning.Provisioning`, the same code the API
uses, so the CLI accepts and refuses exactly what the API does. Bad input exits with status 1
and one line on stderr, and changes nothing.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from pxeserver import app, bootfiles, config as config_module, domu
from pxeserver.imports import IMPORT_ERRORS, progress as import_progress, run_import
from pxeserver.imports.layouts import ARCHES
from pxeserver.mac import InvalidMac, MacAddress
from pxeserver.provisioning import InvalidToken
from pxeserver.registry import Conflict, NotFound, Unavailable, ValidationError, describe_database, is_postgresql
from pxeserver.registry.models import XenSettings

USER_ERRORS = (ValidationError, InvalidMac, NotFound, Conflict, InvalidToken, Unavailable,
               config_module.ConfigError, *IMPORT_ERRORS)


def _fail(message: str) -> None:
    click.echo(f"pxeserver: error: {message}", err=True)
    sys.exit(1)


def _load_config(ctx: click.Context) -> config_module.Config:
    options = ctx.find_root().params
    try:
        cfg = config_module.load(options.get("config_file"))
    except config_module.ConfigError as exc:
        _fail(str(exc))
    if options.get("data_dir"):
        cfg.server.data_dir = str(Path(options["data_dir"]).resolve())
    return cfg


@contextmanager
def _context(ctx: click.Context) -> Iterator[app.Context]:
    try:
        context = app.build(_load_config(ctx))
    except (Unavailable, RuntimeError) as exc:  # unreachable database, or a newer schema
        _fail(str(exc))
    try:
        yield context
    except USER_ERRORS as exc:
        _fail(str(exc.args[0]) if isinstance(exc, NotFound) and exc.args else str(exc))
    finally:
        context.close()


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))


def _print_table(rows: list[list[str]], headers: list[str]) -> None:
    widths = [max(len(str(v)) for v in column) for column in zip(headers, *rows, strict=True)]
    for row in [headers, *rows]:
        click.echo("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _parse_vars(values: tuple[str, ...]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--var")
        result[key] = value
    return result


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML configuration file.")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Directory of the registry database.")
def cli(config_file: str | None, data_dir: str | None) -> None:
    """Network provisioning server for Xen domUs."""


@cli.command()
@click.option("--address", help="Address clients are told (next-server, URLs).")
@click.option("--tftp-port", type=int)
@click.option("--http-port", type=int)
@click.option("--dns-port", type=int)
@click.option("--tftp/--no-tftp", "tftp_enabled", default=None)
@click.option("--http/--no-http", "http_enabled", default=None)
@click.option("--dhcp/--no-dhcp", "dhcp_enabled", default=None)
@click.option("--dns/--no-dns", "dns_enabled", default=None)
@click.option("--log-level", type=click.Choice(config_module.LOG_LEVELS, case_sensitive=False),
              help="Overrides [server] log_level (default info).")
@click.pass_context
def serve(ctx: click.Context, address: str | None, tftp_port: int | None, http_port: int | None,
          dns_port: int | None, log_level: str | None, **enabled: bool | None) -> None:
    """Run every enabled service until SIGINT or SIGTERM, or until one of them fails (exit 1)."""
    from pxeserver import serve as serve_module

    cfg = _load_config(ctx)
    if address:
        cfg.server.address = address
    if log_level:
        cfg.server.log_level = log_level.lower()
    for section, port in (("tftp", tftp_port), ("http", http_port), ("dns", dns_port)):
        if port is not None:
            getattr(cfg, section).port = port
    for key, value in enabled.items():
        if value is not None:
            getattr(cfg, key.removesuffix("_enabled")).enabled = value
    try:
        config_module.validate(cfg)
    except config_module.ConfigError as exc:
        _fail(str(exc))
    sys.exit(serve_module.run(cfg))


# -- profiles -------------------------------------------------------------------------------

@cli.group()
def profile() -> None:
    """Installer profiles: kernel, initrd, arguments, autoinstall template."""


@profile.command("add")
@click.argument("name")
@click.option("--kernel", required=True, help="Kernel path relative to the TFTP root.")
@click.option("--initrd", required=True, help="Initrd path relative to the TFTP root.")
@click.option("--append", default="", help="Extra kernel arguments (key=value words).")
@click.option("--autoinstall", default="", help="Template file name from kickstarts/ or preseeds/.")
@click.option("--var", "variables", multiple=True, help="Template variable KEY=VALUE (repeatable).")
@click.pass_context
def profile_add(ctx: click.Context, name: str, kernel: str, initrd: str, append: str,
                autoinstall: str, variables: tuple[str, ...]) -> None:
    """Add a profile."""
    with _context(ctx) as context:
        added = context.provisioning.add_profile({
            "name": name, "kernel": kernel, "initrd": initrd, "append": append,
            "autoinstall": autoinstall, "vars": _parse_vars(variables),
        })
        click.echo(f"added profile {added.name}")
        for warning in bootfiles.missing_files(context.config.tftp_root, added):
            click.echo(f"pxeserver: warning: {warning}", err=True)


@profile.command("list")
@click.pass_context
def profile_list(ctx: click.Context) -> None:
    """List profiles."""
    with _context(ctx) as context:
        rows = [[p.name, p.kernel, p.initrd, p.autoinstall or "-"] for p in context.store.list_profiles()]
        _print_table(rows, ["NAME", "KERNEL", "INITRD", "AUTOINSTALL"])


@profile.command("show")
@click.argument("name")
@click.pass_context
def profile_show(ctx: click.Context, name: str) -> None:
    """Show one profile as JSON, with each file's size and whether it still matches the
    SHA-256 its import recorded."""
    with _context(ctx) as context:
        found = context.store.get_profile(name)
        _print_json({**found.to_dict(context.config.api.secret_vars),
                     "files": bootfiles.profile_files(context.config.tftp_root, found, context.store)})


@profile.command("rm")
@click.argument("name")
@click.pass_context
def profile_rm(ctx: click.Context, name: str) -> None:
    """Remove a profile no host uses."""
    with _context(ctx) as context:
        context.provisioning.delete_profile(name)
        click.echo(f"removed profile {name}")


@cli.command("import")
@click.argument("name")
@click.argument("source")
@click.option("--arch", type=click.Choice(ARCHES), default="x86_64", show_default=True)
@click.option("--autoinstall", default="", help="Template instead of the one the layout implies.")
@click.pass_context
def import_command(ctx: click.Context, name: str, source: str, arch: str, autoinstall: str) -> None:
    """Copy an installer's kernel and initrd from SOURCE into images/NAME/ and add profile NAME.

    SOURCE is a directory (a mounted DVD, a mirror tree), an ISO image, a netboot tarball or an
    http:// URL of a tree. Checksums the source offers are verified; Ctrl-C leaves nothing
    half-written; importing the same files again changes nothing.
    """
    with _context(ctx) as context:
        try:
            result = run_import(context, name, source, import_progress.for_terminal(sys.stderr),
                                arch=arch, autoinstall=autoinstall)
        except KeyboardInterrupt:
            click.echo(f"pxeserver: import of {name} interrupted: nothing was published", err=True)
            sys.exit(130)
        click.echo(f"{'added' if result.profile_added else 'unchanged'} profile {result.profile.name}: "
                   f"{result.profile.kernel} {result.profile.initrd}")


# -- hosts ----------------------------------------------------------------------------------

@cli.group()
def host() -> None:
    """Hosts: a MAC, a hostname and the profile it installs."""


def _with_mac(action: Callable[..., None]) -> Callable[..., None]:
    return click.argument("mac")(action)


@host.command("add")
@click.option("--mac", help="MAC address; without it a free 00:16:3e address is generated.")
@click.option("--hostname", required=True)
@click.option("--profile", "profile_name", required=True)
@click.option("--ip", help="Reserved IPv4 address.")
@click.option("--var", "variables", multiple=True, help="Template variable KEY=VALUE (repeatable).")
@click.option("--memory", type=int, help="domU memory in MB.")
@click.option("--vcpus", type=int)
@click.option("--bridge")
@click.option("--disk", help="xl disk spec (target, format, vdev, access) under [xen] disk_roots.")
@click.pass_context
def host_add(ctx: click.Context, mac: str | None, hostname: str, profile_name: str, ip: str | None,
             variables: tuple[str, ...], **xen: Any) -> None:
    """Register a host; prints its MAC."""
    data: dict[str, Any] = {"hostname": hostname, "profile": profile_name,
                            "vars": _parse_vars(variables),
                            "xen": {k: v for k, v in xen.items() if v is not None}}
    if mac is not None:
        data["mac"] = mac
    if ip:
        data["ip"] = ip
    with _context(ctx) as context:
        added = context.provisioning.add_host(data)
        click.echo(str(added.mac))


@host.command("list")
@click.pass_context
def host_list(ctx: click.Context) -> None:
    """List hosts."""
    with _context(ctx) as context:
        rows = [[str(h.mac), h.hostname, h.ip or "-", h.profile, "on" if h.netboot else "off",
                 h.status.value] for h in context.store.list_hosts()]
        _print_table(rows, ["MAC", "HOSTNAME", "IP", "PROFILE", "NETBOOT", "STATUS"])


@host.command("show")
@_with_mac
@click.pass_context
def host_show(ctx: click.Context, mac: str) -> None:
    """Show one host as JSON."""
    with _context(ctx) as context:
        _print_json(context.store.get_host(MacAddress.parse(mac)).to_dict(context.config.api.secret_vars))


@host.command("rm")
@_with_mac
@click.pass_context
def host_rm(ctx: click.Context, mac: str) -> None:
    """Remove a host and its boot config."""
    with _context(ctx) as context:
        parsed = MacAddress.parse(mac)
        context.provisioning.delete_host(parsed)
        click.echo(f"removed host {parsed}")


@host.command("netboot")
@_with_mac
@click.argument("state", type=click.Choice(["on", "off"]))
@click.pass_context
def host_netboot(ctx: click.Context, mac: str, state: str) -> None:
    """Turn network booting on (a new install) or off (boot locally)."""
    with _context(ctx) as context:
        updated = context.provisioning.set_netboot(MacAddress.parse(mac), state == "on")
        click.echo(f"{updated.mac}: netboot {state}, status {updated.status.value}")


@cli.command("domu-config")
@_with_mac
@click.option("--bridge")
@click.option("--disk", help="xl disk spec under [xen] disk_roots, e.g. 'phy:/dev/vg_domu/web1,xvda,w'.")
@click.option("--memory", type=int, help="Memory in MB.")
@click.option("--vcpus", type=int)
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write here instead of stdout.")
@click.pass_context
def domu_config(ctx: click.Context, mac: str, output: str | None, **overrides: Any) -> None:
    """Write the xl config that boots this host through pypxeboot."""
    with _context(ctx) as context:
        found = context.store.get_host(MacAddress.parse(mac))
        xen = XenSettings.from_input({k: v for k, v in overrides.items() if v is not None}, found.xen)
        context.provisioning.check_xen(xen)
        text = domu.render_for(context.config, found, xen)
        if output:
            Path(output).write_text(text)
            click.echo(f"wrote {output}")
        else:
            click.echo(text, nl=False)


@cli.command("build-pypxeboot")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The file to write, e.g. /usr/local/bin/pypxeboot on a dom0.")
@click.option("--print-sha256", is_flag=True,
              help="Print only the file's SHA-256, as sha256sum does, to check a copy fetched from "
                   "GET /dom0/pypxeboot against.")
def build_pypxeboot(output: Path, print_sha256: bool) -> None:
    """Write pypxeboot as one executable file that needs only the dom0's python3."""
    from pxeserver.dom0 import INTERPRETER, build_pypxeboot as build

    try:
        archive = build(output)
    except OSError as exc:
        _fail(f"cannot write {output}: {exc.strerror}")
    if print_sha256:
        click.echo(f"{archive.sha256}  {output}")
    else:
        click.echo(f"wrote {output} ({len(archive.data)} bytes): copy it to each dom0, it runs with {INTERPRETER}")


@cli.command()
@click.option("--uefi", is_flag=True, help="OVMF (UEFI) instead of SeaBIOS.")
@click.option("--firmware-pxe", is_flag=True, help="With --uefi: the firmware's own PXE, no iPXE ROM.")
@click.option("--pxelinux", is_flag=True, help="Steer iPXE to pxelinux over TFTP ([boot] ipxe_chain).")
@click.option("--memory", type=int, default=1024, show_default=True, help="Guest memory in MB.")
@click.option("--until", type=click.Choice(["netbooting", "installing"]),
              help="Stop (exit 0) once the host reaches this status; else run until Ctrl-C.")
@click.option("--timeout", type=float, default=3600, show_default=True, help="Seconds before giving up.")
@click.option("--xen", "with_xen", is_flag=True,
              help="Instead: a real Xen dom0 in QEMU whose xl boots domUs through pypxeboot, their "
                   "whole life (install, local boot, two at once); prints consoles and timelines.")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
              help="With --xen: keep the run's logs here (default: a new directory under /var/tmp).")
def lab(with_xen: bool, workdir: Path | None, **options: Any) -> None:
    """Boot a QEMU guest from the network against a throwaway server (root; tears down on exit)."""
    if with_xen:
        from pxeserver.lab import xen as xen_lab

        sys.exit(xen_lab.main(workdir))
    if workdir is not None:
        _fail("--workdir goes with --xen")
    from pxeserver.lab import firmware as lab_module

    sys.exit(lab_module.run(**options))


# -- the registry database ------------------------------------------------------------------

@cli.group()
def db() -> None:
    """The registry database: schema migrations and a health check."""


def _sqlite_version(path: str) -> int:
    import sqlite3

    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])


@db.command("migrate")
@click.pass_context
def db_migrate(ctx: click.Context) -> None:
    """Bring the registry's schema up to date (the server also does it when it starts)."""
    cfg = _load_config(ctx)
    try:
        if is_postgresql(cfg.database):
            from pxeserver.registry import postgres

            before, after = postgres.migrate(cfg.database)
        else:
            from pxeserver.registry.sqlite import MIGRATIONS, SqliteStore

            before = _sqlite_version(cfg.database) if Path(cfg.database).is_file() else 0
            SqliteStore(cfg.database).close()
            after = len(MIGRATIONS)
    except Exception as exc:  # unreachable server, refused login, a newer schema
        _fail(f"{describe_database(cfg.database)}: {str(exc).strip().splitlines()[0]}")
    change = f"from {before} to {after}" if before != after else f"{after}, up to date"
    click.echo(f"{describe_database(cfg.database)}: schema version {change}")


@db.command("check")
@click.pass_context
def db_check(ctx: click.Context) -> None:
    """Exit 0 if the registry database is reachable and its schema is the current one."""
    cfg = _load_config(ctx)
    try:
        if is_postgresql(cfg.database):
            from pxeserver.registry import postgres

            version = postgres.check(cfg.database)
        else:
            from pxeserver.registry.sqlite import MIGRATIONS

            if not Path(cfg.database).is_file():
                raise RuntimeError("does not exist (run 'pxeserver db migrate')")
            version = _sqlite_version(cfg.database)
            if version != len(MIGRATIONS):
                raise RuntimeError(f"schema version {version}; this pxeserver needs "
                                   f"{len(MIGRATIONS)} (run 'pxeserver db migrate')")
    except Exception as exc:
        _fail(f"{describe_database(cfg.database)}: {str(exc).strip().splitlines()[0]}")
    click.echo(f"{describe_database(cfg.database)}: reachable, schema version {version} (current)")


def main() -> None:
    cli(prog_name="pxeserver")
