"""The JSON API through Flask's client: the contract's routes, errors and token."""

from __future__ import annotations

import pytest

from pxeserver.mac import MacAddress
from pxeserver.web import create_app

pytestmark = pytest.mark.both_stores  # registry behaviour: SQLite and PostgreSQL

PROFILE = {"name": "deb", "kernel": "images/deb/linux", "initrd": "images/deb/initrd.gz",
           "append": "console=hvc0", "vars": {"suite": "bookworm"}}


@pytest.fixture
def client(ctx):
    app = create_app(ctx)
    client = app.test_client()
    assert client.post("/api/profiles", json=PROFILE).status_code == 201
    return client


def snapshot(client) -> tuple[list, list]:
    return client.get("/api/profiles").get_json(), client.get("/api/hosts").get_json()


def test_profile_round_trip(client) -> None:
    assert client.get("/api/profiles/deb").get_json() == {**PROFILE, "autoinstall": ""}
    changed = {**PROFILE, "append": "console=xvc0", "kernel": "images/deb2/linux",
               "initrd": "images/deb2/initrd.gz", "vars": {"suite": "trixie", "mirror": "m"}}
    assert client.put("/api/profiles/deb", json=changed).get_json() == {**changed, "autoinstall": ""}
    assert client.get("/api/profiles/deb").get_json() == {**changed, "autoinstall": ""}
    assert client.delete("/api/profiles/deb").status_code == 204
    assert client.get("/api/profiles/deb").status_code == 404


def test_host_mac_in_any_spelling_reaches_one_host(client) -> None:
    created = client.post("/api/hosts", json={"mac": "00-16-3E-AA-BB-CC", "hostname": "web1", "profile": "deb"})
    assert created.status_code == 201
    body = created.get_json()
    assert body["mac"] == "00:16:3e:aa:bb:cc"
    assert body["status"] == "registered" and body["netboot"] is True
    for spelling in ("00:16:3e:aa:bb:cc", "00-16-3e-AA-BB-CC", "00163eaabbcc"):
        assert client.get(f"/api/hosts/{spelling}").get_json()["hostname"] == "web1"
    duplicate = client.post("/api/hosts", json={"mac": "00163EAABBCC", "hostname": "web2", "profile": "deb"})
    assert duplicate.status_code == 409 and "already exists" in duplicate.get_json()["error"]


def test_post_without_mac_generates_a_xen_mac(client) -> None:
    body = client.post("/api/hosts", json={"hostname": "web1", "profile": "deb"}).get_json()
    assert body["mac"].startswith("00:16:3e:")


def test_patch_and_delete_host(client) -> None:
    client.post("/api/hosts", json={"mac": "00:16:3e:aa:bb:cc", "hostname": "web1", "profile": "deb"})
    patched = client.patch("/api/hosts/00:16:3e:aa:bb:cc", json={"ip": "10.0.0.9", "xen": {"memory": 512}})
    assert patched.status_code == 200
    expected = {"mac": "00:16:3e:aa:bb:cc", "hostname": "web1", "ip": "10.0.0.9", "profile": "deb",
                "netboot": True, "status": "registered", "vars": {},
                "xen": {"memory": 512, "vcpus": 1, "bridge": "xenbr0", "disk": ""}}
    assert patched.get_json() == expected
    assert client.get("/api/hosts/00:16:3e:aa:bb:cc").get_json() == expected
    assert client.delete("/api/profiles/deb").status_code == 409
    assert client.delete("/api/hosts/00-16-3e-aa-bb-cc").status_code == 204
    assert client.get("/api/hosts/00:16:3e:aa:bb:cc").status_code == 404


BAD_REQUESTS = [
    ("post", "/api/hosts", {"mac": "00:16:3e:aa:bb", "hostname": "x", "profile": "deb"}, 400, "MAC"),
    ("post", "/api/hosts", {"mac": "00:16:3e:aa:bb:cc", "hostname": "a b", "profile": "deb"}, 400, "hostname"),
    ("post", "/api/hosts", {"mac": "00:16:3e:aa:bb:cc", "hostname": "x\ny", "profile": "deb"}, 400, "line break"),
    ("post", "/api/hosts", {"mac": "00:16:3e:aa:bb:cc", "hostname": "x", "profile": "nope"}, 400, "unknown profile"),
    ("post", "/api/hosts", {"mac": "00:16:3e:aa:bb:cc", "hostname": "x", "profile": "deb", "ip": "1.2.3"}, 400, "IPv4"),
    ("post", "/api/hosts", {"mac": 12, "hostname": "x", "profile": "deb"}, 400, "string"),
    ("post", "/api/hosts", {"mac": "00:16:3e:aa:bb:cc", "hostname": ["x"], "profile": "deb"}, 400, "string"),
    ("post", "/api/hosts", {"mac": "00:16:3e:aa:bb:cc", "hostname": "x", "profile": "deb", "netboot": 1}, 400,
     "true or false"),
    ("post", "/api/hosts", {"mac": "00:16:3e:aa:bb:cc", "hostname": "x", "profile": "deb", "status": "installed"}, 400,
     "unknown host field"),
    ("post", "/api/hosts", ["not", "an", "object"], 400, "object"),
    ("post", "/api/hosts", None, 400, "JSON"),
    ("post", "/api/profiles", {**PROFILE, "name": "x", "autoinstall": "../../etc/passwd"}, 400, "not a path"),
    ("post", "/api/profiles", {**PROFILE, "name": "x", "kernel": "../../../etc/shadow"}, 400, "without '..'"),
    ("post", "/api/profiles", {**PROFILE, "name": "x", "append": "url=http://a/?b=c"}, 400, "key=value"),
    ("post", "/api/profiles", {**PROFILE, "name": "x", "vars": "str"}, 400, "object"),
    ("post", "/api/profiles", PROFILE, 409, "already exists"),
    ("put", "/api/profiles/deb", {**PROFILE, "name": "other"}, 400, "differs"),
    ("put", "/api/profiles/ghost", {**PROFILE, "name": "ghost"}, 404, "ghost"),
    ("get", "/api/hosts/00:16:3e:00:00:01", None, 404, "no host"),
    ("get", "/api/hosts/zz:zz", None, 400, "MAC"),
    ("patch", "/api/hosts/00:16:3e:00:00:01", {"hostname": "x"}, 404, "no host"),
    ("delete", "/api/profiles/ghost", None, 404, "ghost"),
    ("post", "/api/hosts/00:16:3e:00:00:01/installed?token=x", None, 404, "no host"),
]


@pytest.mark.parametrize("method, url, body, status, message", BAD_REQUESTS)
def test_bad_requests_get_a_clear_error_and_change_nothing(client, method, url, body, status, message) -> None:
    before = snapshot(client)
    if body is not None:
        kwargs = {"json": body}
    else:
        kwargs = {"data": "{not json", "content_type": "application/json"} if method == "post" else {}
    response = getattr(client, method)(url, **kwargs)
    assert response.status_code == status
    assert message in response.get_json()["error"]
    assert snapshot(client) == before


def test_oversized_body_is_refused(client) -> None:
    response = client.post("/api/hosts", data="{" + " " * 300_000 + "}", content_type="application/json")
    assert response.status_code == 413
    assert client.get("/api/hosts").get_json() == []


def test_reads_and_writes_need_the_bearer_token_when_one_is_set(ctx) -> None:
    ctx.config.api.token = "s3cret"
    client = create_app(ctx).test_client()
    admin = {"Authorization": "Bearer s3cret"}
    assert client.post("/api/profiles", json=PROFILE).status_code == 401
    assert client.post("/api/profiles", json=PROFILE, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.post("/api/profiles", json=PROFILE, headers={"Authorization": "Bearer d\xe9j\xe0"}).status_code == 401
    assert client.get("/api/profiles", headers=admin).get_json() == []
    ok = client.post("/api/profiles", json=PROFILE, headers=admin)
    assert ok.status_code == 201
    for path in ("/api/profiles", "/api/profiles/deb", "/api/hosts", "/api/hosts/00:16:3e:00:00:01",
                 "/api/hosts/00:16:3e:00:00:01/events"):
        refused = client.get(path)
        assert refused.status_code == 401 and "Bearer" in refused.get_json()["error"]
    assert client.get("/api/profiles/deb", headers=admin).get_json()["name"] == "deb"


def test_install_callback_needs_the_hosts_token_once(client, ctx) -> None:
    # Flask's test client calls from 127.0.0.1: the host's address here.
    client.post("/api/hosts", json={"mac": "00:16:3e:aa:bb:cc", "hostname": "web1", "profile": "deb",
                                    "ip": "127.0.0.1"})
    token = ctx.store.find_host(MacAddress.parse("00:16:3e:aa:bb:cc")).install_token
    assert len(token) >= 24
    assert client.post("/api/hosts/00:16:3e:aa:bb:cc/installed").status_code == 403
    assert client.post("/api/hosts/00:16:3e:aa:bb:cc/installed?token=guess").status_code == 403
    assert client.post("/api/hosts/00:16:3e:aa:bb:cc/installed?token=%C3%A9t%C3%A9").status_code == 403
    assert client.get("/api/hosts/00:16:3e:aa:bb:cc").get_json()["status"] == "registered"
    done = client.post(f"/api/hosts/00-16-3e-aa-bb-cc/installed?token={token}")
    assert done.status_code == 200
    assert done.get_json()["status"] == "installed" and done.get_json()["netboot"] is False
    assert client.post(f"/api/hosts/00:16:3e:aa:bb:cc/installed?token={token}").status_code == 403
    events = client.get("/api/hosts/00:16:3e:aa:bb:cc/events").get_json()
    assert [e["source"] for e in events] == ["api", "callback", "callback", "callback", "callback"]
    assert events[-3]["message"] == "refused install-complete call: wrong token"
    assert events[-2]["message"] == "install complete; next boot is local"
    # The replay after the install is refused before the token is even compared.
    assert events[-1]["message"].startswith("refused install-complete call from 127.0.0.1: ")
