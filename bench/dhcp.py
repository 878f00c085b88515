"""DHCP benchmark: N registered MACs do DISCOVER-OFFER-REQUEST-ACK against pxeserver and dnsmasq.

Run as root: ``.venv/bin/python bench/dhcp.py [--hosts 1000] [--window 32]``.

Both servers run as their own process in a server namespace, with the same reservations
(ours from the registry, dnsmasq's from ``--dhcp-hostsfile``), and the same load generator in a
client namespace drives both over one veth pair: it keeps ``window`` handshakes in flight,
each from its own MAC with the broadcast flag set, and checks every ACK names the reserved
address. Nothing touches a real interface; the namespaces are removed afterwards.
"""

from __future__ import annotations

import argparse
import ipaddress
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from dhcp_support import CLIENT_IF, SERVER_IF, SERVER_IP, inside, veth_link  # noqa: E402

from pxeserver import app, config as configuration  # noqa: E402
from pxeserver.dhcp import codec  # noqa: E402
from pxeserver.dhcp.codec import MessageType, Option, Packet  # noqa: E402
from pxeserver.dhcp.server import DhcpService  # noqa: E402
from pxeserver.mac import XEN_OUI, MacAddress  # noqa: E402

PREFIX = 20  # 10.77.0.0/20: room for a few thousand reservations
FIRST_HOST_IP = ipaddress.IPv4Address("10.77.1.0")
RETRY_SECONDS = 1.0
MAX_TRIES = 5


def host_mac(number: int) -> MacAddress:
    return MacAddress(XEN_OUI + number.to_bytes(3, "big"))


def host_ip(number: int) -> str:
    return str(FIRST_HOST_IP + number)


def write_config(workdir: Path) -> Path:
    path = workdir / "pxeserver.toml"
    path.write_text(
        f'[server]\naddress = "{SERVER_IP}"\ndata_dir = "var"\ntftp_root = "tftproot"\n'
        f'[dhcp]\nenabled = true\ninterface = "{SERVER_IF}"\nsubnet = "10.77.0.0/{PREFIX}"\n'
        f'router = "{SERVER_IP}"\n'
    )
    (workdir / "tftproot" / "pxelinux.cfg").mkdir(parents=True)
    return path


def register(config_path: Path, hosts: int) -> Path:
    """Register the hosts in our registry; return a dnsmasq hosts file with the same data."""
    context = app.build(configuration.load(config_path))
    try:
        context.provisioning.add_profile({"name": "bench", "kernel": "k/linux", "initrd": "k/initrd"})
        for number in range(hosts):
            context.provisioning.add_host({"mac": str(host_mac(number)), "ip": host_ip(number),
                                           "hostname": f"bench{number}", "profile": "bench"})
    finally:
        context.close()
    hostsfile = config_path.parent / "dnsmasq.hosts"
    hostsfile.write_text("".join(f"{host_mac(n)},{host_ip(n)},bench{n}\n" for n in range(hosts)))
    return hostsfile


def serve_ours(config_path: str) -> None:
    """The child process: our DHCP service until SIGTERM."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    context = app.build(configuration.load(config_path))
    service = DhcpService(context)
    service.start()
    print("ready", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    service.stop()
    context.close()


def start_ours(server_ns: str, config_path: Path) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        ["ip", "netns", "exec", server_ns, sys.executable, __file__, "--serve-ours", str(config_path)],
        stdout=subprocess.PIPE, text=True)
    if process.stdout is None or process.stdout.readline().strip() != "ready":
        raise RuntimeError("pxeserver's DHCP service did not start")
    return process


def start_dnsmasq(server_ns: str, workdir: Path, hostsfile: Path) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        ["ip", "netns", "exec", server_ns, "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null",
         "--port=0", f"--interface={SERVER_IF}", "--bind-interfaces", "--user=root",
         "--pid-file=", f"--dhcp-range=10.77.0.0,static,{ipaddress.IPv4Network(f'0.0.0.0/{PREFIX}').netmask}",
         f"--dhcp-hostsfile={hostsfile}", f"--dhcp-leasefile={workdir / 'dnsmasq.leases'}",
         f"--dhcp-boot=pxelinux.0,,{SERVER_IP}", "--dhcp-authoritative", "--no-ping",
         "--log-facility=/dev/null"],
        text=True)
    time.sleep(1.0)  # dnsmasq has no readiness signal; it binds within milliseconds
    if process.poll() is not None:
        raise RuntimeError("dnsmasq did not start")
    return process


def client_packet(number: int, xid: int, kind: MessageType, server_id: str = "",
                  requested: str = "") -> bytes:
    options = {Option.MESSAGE_TYPE: bytes((kind,))}
    if server_id:
        options[Option.SERVER_ID] = codec.ip_bytes(server_id)
        options[Option.REQUESTED_IP] = codec.ip_bytes(requested)
    return codec.encode(Packet(op=codec.BOOTREQUEST, xid=xid, chaddr=host_mac(number).packed,
                               flags=codec.BROADCAST_FLAG, options=options))


def load(client_ns: str, hosts: int, window: int, xid_base: int) -> tuple[float, int, int]:
    """Drive every handshake to its ACK; (seconds, completed, wrong or failed)."""
    with inside(client_ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, CLIENT_IF.encode())
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind(("0.0.0.0", 68))
        sock.setblocking(False)
        target = ("255.255.255.255", 67)
        # xid -> [host number, wire packet in flight, time sent, tries]
        pending: dict[int, list] = {}
        started = time.perf_counter()
        next_host, completed, failed = 0, 0, 0
        while completed + failed < hosts:
            while len(pending) < window and next_host < hosts:
                xid = xid_base + next_host
                wire = client_packet(next_host, xid, MessageType.DISCOVER)
                sock.sendto(wire, target)
                pending[xid] = [next_host, wire, time.perf_counter(), 1]
                next_host += 1
            if select.select([sock], [], [], 0.05)[0]:
                for _ in range(window * 2):
                    try:
                        data = sock.recv(2048)
                    except BlockingIOError:
                        break
                    reply = codec.parse(data)
                    entry = pending.get(reply.xid)
                    if entry is None:
                        continue
                    if reply.message_type == MessageType.OFFER and entry[3] < 100:
                        server_id = reply.ip_option(Option.SERVER_ID) or SERVER_IP
                        wire = client_packet(entry[0], reply.xid, MessageType.REQUEST, server_id,
                                             reply.yiaddr)
                        sock.sendto(wire, target)
                        entry[1:] = [wire, time.perf_counter(), 100]  # 100+: REQUEST stage
                    elif reply.message_type == MessageType.ACK and entry[3] >= 100:
                        del pending[reply.xid]
                        if reply.yiaddr == host_ip(entry[0]):
                            completed += 1
                        else:
                            failed += 1
            now = time.perf_counter()
            for xid, entry in list(pending.items()):
                if now - entry[2] > RETRY_SECONDS:
                    if entry[3] % 100 >= MAX_TRIES:
                        del pending[xid]
                        failed += 1
                    else:
                        sock.sendto(entry[1], target)
                        entry[2], entry[3] = now, entry[3] + 1
        return time.perf_counter() - started, completed, failed


def stop(process: subprocess.Popen[str]) -> None:
    process.terminate()
    process.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--window", type=int, default=32, help="handshakes in flight")
    parser.add_argument("--serve-ours", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_ours:
        serve_ours(args.serve_ours)
        return
    with tempfile.TemporaryDirectory(prefix="dhcp-bench-") as tmp, veth_link("pxb", PREFIX) as link:
        workdir = Path(tmp)
        config_path = write_config(workdir)
        hostsfile = register(config_path, args.hosts)
        results = {}
        for name, starter in (
            ("dnsmasq", lambda: start_dnsmasq(link.server_ns, workdir, hostsfile)),
            ("pxeserver", lambda: start_ours(link.server_ns, config_path)),
        ):
            process = starter()
            try:
                results[name] = load(link.client_ns, args.hosts, args.window,
                                     xid_base=0x10000000 * (len(results) + 1))
            finally:
                stop(process)
        context = app.build(configuration.load(config_path))
        netbooting = sum(h.status.value == "netbooting" for h in context.store.list_hosts())
        context.close()
    base = results["dnsmasq"][0]
    print(f"\n{args.hosts} registered MACs, DISCOVER-OFFER-REQUEST-ACK, {args.window} in flight\n")
    print(f"{'server':<10} {'ok':>6} {'failed':>6} {'seconds':>8} {'handshakes/s':>13} {'time ratio':>11}")
    for name, (seconds, completed, failed) in results.items():
        print(f"{name:<10} {completed:>6} {failed:>6} {seconds:>8.3f} {completed / seconds:>13.0f} "
              f"{seconds / base:>11.2f}")
    print("\ntime ratio = seconds / dnsmasq's seconds (target for pxeserver: <= 1.5)")
    print(f"pxeserver also moved {netbooting} of {args.hosts} hosts to 'netbooting' and kept "
          "their timelines")


if __name__ == "__main__":
    main()
