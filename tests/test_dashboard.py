"""The dashboard's pages without a browser: access, CSRF, masking, stalled hosts, the hosts
table's filter, sort and pages, the live stream's limits, and a flood of streams against the
real HTTP service while a good client is served."""

from __future__ import annotations

import hashlib
import html
import json
import re
import subprocess
import time
from collections.abc import Iterator

import pytest
from flask.testing import FlaskClient
from http_support import MAC, PROFILE, curl, running

from pxeserver import domu
from pxeserver.app import Context
from pxeserver.mac import MacAddress
from pxeserver.registry import BootFile, Status
from pxeserver.web import create_app

TOKEN = "dash-token"
HOST = MacAddress.parse(MAC)


def _setup(ctx: Context, hosts: int = 0) -> None:
    ctx.provisioning.add_profile(PROFILE | {"vars": {"root_password_hash": "$6$profile-secret",
                                                     "mirror": "http://mirror.example/c5"}})
    ctx.provisioning.add_host({"mac": MAC, "hostname": "web1", "profile": "centos5",
                               "ip": "127.0.0.1", "vars": {"db_password": "host-secret",
                                                           "rack": "r12"}})
    for number in range(hosts):
        ctx.provisioning.add_host({"hostname": f"node{number:03d}", "profile": "centos5"})


@pytest.fixture
def client(ctx: Context) -> FlaskClient:
    _setup(ctx, hosts=0)
    return create_app(ctx).test_client()


def csrf_of(page: bytes) -> str:
    return re.search(rb'name="csrf" value="([^"]+)"', page).group(1).decode()


def login(client: FlaskClient) -> str:
    token = csrf_of(client.get("/login").data)
    reply = client.post("/login", data={"csrf": token, "token": TOKEN, "next": "/activity"})
    assert reply.status_code == 302 and reply.headers["Location"] == "/activity"
    return csrf_of(client.get(f"/hosts/{MAC}").data)


def test_without_a_token_every_page_warns_and_works(client: FlaskClient) -> None:
    for url in ("/", f"/hosts/{MAC}", "/profiles", "/profiles/centos5", "/activity"):
        reply = client.get(url)
        assert reply.status_code == 200, url
        assert b'id="no-token"' in reply.data and b"[api] token" in reply.data


def test_with_a_token_pages_ask_for_it_once(ctx: Context, client: FlaskClient) -> None:
    ctx.config.api.token = TOKEN
    client = create_app(ctx).test_client()  # the session key comes from the token
    for url in ("/", f"/hosts/{MAC}", "/profiles", "/activity"):
        reply = client.get(url)
        assert reply.status_code == 302 and reply.headers["Location"].startswith("/login"), url
    assert client.get("/stream").status_code == 401
    token = csrf_of(client.get("/login").data)
    wrong = client.post("/login", data={"csrf": token, "token": "nope"})
    assert wrong.status_code == 401 and b"wrong token" in wrong.data
    assert client.get("/").status_code == 302
    for elsewhere in ("//evil.example/", "/\\evil.example", "https://evil.example/"):
        token = csrf_of(client.get("/login").data)  # each login starts a new session
        reply = client.post("/login", data={"csrf": token, "token": TOKEN, "next": elsewhere})
        assert reply.status_code == 302 and reply.headers["Location"] == "/", elsewhere
    login(client)
    page = client.get("/")
    assert page.status_code == 200 and b"web1" in page.data and b'id="no-token"' not in page.data
    cookie = next(c for c in client._cookies.values() if c.key == "pxeserver_session")
    assert cookie.http_only and cookie.same_site == "Strict"

    # Another token (a restarted server with a new one) does not accept the old cookie.
    ctx.config.api.token = "another-token"
    other = create_app(ctx).test_client()
    other.set_cookie("pxeserver_session", cookie.value)
    assert other.get("/").status_code == 302


def test_posts_without_the_csrf_token_or_from_another_origin_are_refused(
        ctx: Context, client: FlaskClient) -> None:
    ctx.config.api.token = TOKEN
    client = create_app(ctx).test_client()
    csrf = login(client)
    attempts = [
        {"data": {"netboot": "off"}},
        {"data": {"netboot": "off", "csrf": "forged"}},
        {"data": {"netboot": "off", "csrf": csrf}, "headers": {"Origin": "http://evil.example"}},
    ]
    for attempt in attempts:
        reply = client.post(f"/hosts/{MAC}/netboot", **attempt)
        assert reply.status_code == 403 and b"CSRF" in reply.data, attempt
        assert ctx.store.get_host(HOST).netboot is True
    done = client.post(f"/hosts/{MAC}/netboot", data={"netboot": "off", "csrf": csrf},
                       headers={"Origin": "http://localhost"})
    assert done.status_code == 302 and ctx.store.get_host(HOST).netboot is False
    # The delete and edit forms are guarded alike.
    assert client.post(f"/hosts/{MAC}/delete").status_code == 403
    assert client.post(f"/hosts/{MAC}/edit", data={"hostname": "x"}).status_code == 403
    assert ctx.store.get_host(HOST).hostname == "web1"


def test_host_page_masks_secrets_as_the_api_does(ctx: Context, client: FlaskClient) -> None:
    ctx.config.api.secret_vars.append("rack")
    page = client.get(f"/hosts/{MAC}").data.decode()
    install_token = ctx.store.get_host(HOST).install_token
    for secret in ("profile-secret", "host-secret", "r12", install_token):
        assert secret not in page
    assert "rootpw --iscrypted &#39;********&#39;" in page
    assert "installed?token=********" in page
    assert "http://mirror.example/c5" in page  # not a secret: shown
    assert "kernel images/centos5/vmlinuz" in page and 'bootloader = &#34;/usr/local/bin/pypxeboot&#34;' in page
    # Nothing rendered for the page counted as the host's install.
    assert ctx.store.get_host(HOST).status is Status.REGISTERED


def test_host_page_shows_the_xl_config_domu_config_writes(ctx: Context, client: FlaskClient) -> None:
    ctx.config.xen.bootloader = "/opt/xen/pypxeboot"
    ctx.config.xen.pypxeboot_cache_dir = "/var/cache/pypxeboot"
    ctx.config.dhcp.enabled, ctx.config.dhcp.mode = True, "full"
    page = html.unescape(client.get(f"/hosts/{MAC}").data.decode())
    written = domu.render_for(ctx.config, ctx.store.get_host(HOST))
    assert 'bootloader = "/opt/xen/pypxeboot"' in written and "cache_dir=/var/cache/pypxeboot" in written
    assert f"dhcp_server={ctx.config.advertised_address}" in written
    assert written.strip() in page


def test_editing_keeps_masked_secrets_and_reports_bad_input(ctx: Context, client: FlaskClient) -> None:
    csrf = csrf_of(client.get(f"/hosts/{MAC}").data)
    form = {"csrf": csrf, "hostname": "web2", "ip": "127.0.0.1", "profile": "centos5",
            "memory": "2048", "vcpus": "2", "bridge": "xenbr1", "disk": "",
            "vars": '{"db_password": "********", "rack": "r13"}'}
    assert client.post(f"/hosts/{MAC}/edit", data=form).status_code == 302
    host = ctx.store.get_host(HOST)
    assert host.hostname == "web2" and host.xen.memory == 2048 and host.xen.bridge == "xenbr1"
    assert host.vars == {"db_password": "host-secret", "rack": "r13"}
    bad = client.post(f"/hosts/{MAC}/edit", data=form | {"hostname": "bad_name!"},
                      follow_redirects=True)
    assert b"edit refused: invalid hostname" in bad.data
    assert ctx.store.get_host(HOST).hostname == "web2"
    deep = client.post(f"/hosts/{MAC}/edit", data=form | {"vars": "[" * 50_000},
                       follow_redirects=True)
    assert deep.status_code == 200 and b"edit refused: vars must be a JSON object" in deep.data


def test_profiles_list_files_and_users_and_can_be_added(ctx: Context, client: FlaskClient) -> None:
    images = ctx.config.tftp_root / "images" / "centos5"
    images.mkdir(parents=True)
    (images / "vmlinuz").write_bytes(b"k" * 3 * 1024 * 1024)
    page = client.get("/profiles").data.decode()
    assert "3.0 MiB" in page and "missing" in page  # the initrd is not there
    assert "web1" in page and "profile-secret" not in page
    csrf = csrf_of(page.encode())
    added = client.post("/profiles", data={"csrf": csrf, "name": "deb12", "kernel": "images/d/linux",
                                           "initrd": "images/d/initrd.gz", "append": "quiet"},
                        follow_redirects=True)
    assert b"add profile refused: append word" in added.data  # the API's own check
    client.post("/profiles", data={"csrf": csrf, "name": "deb12", "kernel": "images/d/linux",
                                   "initrd": "images/d/initrd.gz", "autoinstall": "debian-xen.cfg"})
    assert ctx.store.get_profile("deb12").autoinstall == "debian-xen.cfg"
    client.post("/profiles/deb12", data={"csrf": csrf, "kernel": "images/d/vmlinuz",
                                         "initrd": "images/d/initrd.gz"})
    assert ctx.store.get_profile("deb12").kernel == "images/d/vmlinuz"


def test_hosts_table_filters_sorts_pages_and_marks_stalled(ctx: Context) -> None:
    _setup(ctx, hosts=250)
    ctx.config.dashboard.stalled_after = 60
    mac = sorted(ctx.store.macs())[0]
    ctx.policy.advance(mac, Status.NETBOOTING)
    ctx.timeline.flush()
    with ctx.store._write() as conn:  # the host's last step was two minutes ago
        conn.execute("UPDATE events SET time = time - 120 WHERE mac = ?", (str(mac),))
    client = create_app(ctx).test_client()
    page = client.get("/").data.decode()
    assert page.count('<tr data-mac=') == 100 and "page 1 of 3" in page
    assert re.search(r'data-count="all">251<', page) and re.search(r'data-count="stalled">1<', page)
    stalled = client.get("/?status=stalled").data.decode()
    assert stalled.count("<tr data-mac=") == 1 and f'data-mac="{mac}"' in stalled
    assert 'class="stalled"' in stalled
    assert client.get("/?q=node24").data.decode().count("<tr data-mac=") == 10  # node240..249
    last = client.get("/?sort=hostname&order=desc&page=3").data.decode()
    assert last.count("<tr data-mac=") == 51 and ">node000<" in last
    # Bad parameters fall back to defaults instead of failing.
    assert client.get("/?sort=evil&page=abc&status=<x>").status_code == 200


def test_event_text_is_escaped(ctx: Context, client: FlaskClient) -> None:
    ctx.policy.record(HOST, "tftp", "refused <script>alert(1)</script>")
    for url in ("/", f"/hosts/{MAC}", "/activity"):
        page = client.get(url).data.decode()
        assert "<script>alert" not in page and "&lt;script&gt;alert(1)" in page, url


def stream(url: str, seconds: float, *args: str) -> str:
    """What curl reads from an event stream in ``seconds`` (it ends by timing out)."""
    return subprocess.run(["curl", "-sN", "--max-time", str(seconds), *args, url],
                          capture_output=True, text=True, timeout=seconds + 10).stdout


@pytest.fixture
def served(ctx: Context) -> Iterator[str]:
    _setup(ctx)
    ctx.config.dashboard.max_streams = 3
    ctx.config.dashboard.stream_seconds = 8
    with running(ctx):
        yield ctx.config.http_base_url


def test_stream_sends_events_and_resumes_from_last_event_id(ctx: Context, served: str) -> None:
    first = subprocess.Popen(["curl", "-sN", "--max-time", "3", f"{served}/stream"],
                             stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    ctx.policy.record(HOST, "tftp", "sent pxelinux.cfg/01-test")
    ctx.policy.record(MacAddress.parse("00:16:3e:00:00:99"), "tftp", "an unregistered MAC")
    output = first.communicate(timeout=10)[0]
    assert '"message": "sent pxelinux.cfg/01-test"' in output and '"hostname": "web1"' in output
    assert "unregistered MAC" not in output and '"counts"' in output
    seen = int(re.findall(r"^id: (\d+)$", output, re.M)[-1])
    ctx.policy.record(HOST, "http", "missed while away")
    ctx.timeline.flush()
    again = stream(f"{served}/stream", 2, "-H", f"Last-Event-ID: {seen}")
    assert "missed while away" in again and "sent pxelinux.cfg/01-test" not in again


@pytest.mark.slow
def test_a_flood_of_streams_holds_only_max_streams_and_the_api_stays_served(
        ctx: Context, served: str) -> None:
    """Attack: 20 clients open the event stream at once and keep it. Only max_streams (3) are
    held on worker threads; the rest are told to come back later and closed at once, and the
    API answers a good client quickly throughout."""
    flood = [subprocess.Popen(["curl", "-sN", "--max-time", "6", f"{served}/stream"],
                              stdout=subprocess.PIPE, text=True) for _ in range(20)]
    try:
        time.sleep(1.5)
        closed = [p for p in flood if p.poll() is not None]
        assert len(closed) == 17
        assert all(p.stdout.read() == "retry: 5000\n\n" for p in closed)
        for _ in range(5):
            started = time.monotonic()
            reply = curl(f"{served}/api/hosts/{MAC}")
            assert reply.status == 200 and time.monotonic() - started < 1.0
    finally:
        for process in flood:
            process.kill()
            process.wait(timeout=10)
    # The held streams give their slots back once their clients are gone.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if "retry: 1000" in stream(f"{served}/stream", 1):
            break
        time.sleep(0.5)
    else:
        pytest.fail("stream slots were not released after the clients went away")


@pytest.mark.parametrize(("key", "value", "message"), [
    ("stalled_after", 0, "[dashboard] stalled_after must be 1..2592000, not 0"),
    ("page_size", 5000, "[dashboard] page_size must be 10..1000, not 5000"),
    ("max_streams", 32, "[dashboard] max_streams must be less than [http] threads (32), not 32"),
    ("stream_seconds", 0, "[dashboard] stream_seconds must be 1..3600, not 0"),
])
def test_dashboard_settings_are_checked(tmp_path, key: str, value: int, message: str) -> None:
    from pxeserver.config import ConfigError, load

    file = tmp_path / "pxeserver.toml"
    file.write_text(f"[dashboard]\n{key} = {value}\n")
    with pytest.raises(ConfigError) as error:
        load(file)
    assert message in str(error.value)


def test_activity_chart_counts_boots_and_installs(ctx: Context, client: FlaskClient) -> None:
    ctx.policy.advance(HOST, Status.NETBOOTING)
    ctx.policy.advance(HOST, Status.INSTALLING)
    token = ctx.store.get_host(HOST).install_token
    ctx.provisioning.install_done(HOST, token, client_ip="127.0.0.1")
    page = client.get("/activity").data.decode()
    data = json.loads(re.search(r'id="chart-data">(.*?)</script>', page).group(1))
    assert sum(data["boots"]) == 1 and sum(data["installs"]) == 1
    assert len(data["times"]) == len(data["boots"]) == 24 * 6 + 1
    assert data["boots"][-1] == 1  # in the newest bucket
    assert "install complete; next boot is local" in page
    assert "uPlot.iife.min.js" in page
    vendored = client.get("/assets/vendor/uplot/uPlot.iife.min.js")
    assert vendored.status_code == 200 and b"uPlot" in vendored.data


def test_profile_page_says_whether_imported_files_still_match(ctx: Context, client: FlaskClient) -> None:
    images = ctx.config.tftp_root / "images" / "deb"
    images.mkdir(parents=True)
    kernel, initrd = b"k" * 4096, b"i" * 8192
    (images / "linux").write_bytes(kernel)
    (images / "initrd.gz").write_bytes(initrd)
    records = [BootFile(f"images/deb/{name}", len(data), hashlib.sha256(data).hexdigest(), "test")
               for name, data in (("linux", kernel), ("initrd.gz", initrd))]
    ctx.provisioning.add_imported_profile({"name": "deb", "kernel": "images/deb/linux",
                                           "initrd": "images/deb/initrd.gz"}, records)
    page = client.get("/profiles/deb").data.decode()
    assert page.count("matches its import") == 2 and "CHANGED" not in page
    (images / "initrd.gz").write_bytes(b"x" * 8192)  # same size, other bytes
    page = client.get("/profiles/deb").data.decode()
    assert page.count("matches its import") == 1 and page.count("CHANGED since its import") == 1
