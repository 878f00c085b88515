"""The dashboard in a real browser: Debian's chromium, driven by Selenium through Debian's
chromium-driver (nothing is downloaded: both paths are given, Selenium Manager is offline).

It logs in with the API token, turns a host's netboot off and on from the host page, and
watches the hosts table while a real client boots the host: tftp-hpa fetches its pxelinux
config (netbooting), curl fetches its kickstart from the host's address (installing) and the
kickstart's own callback line runs (installed). Each change must reach the row without a
reload. A form posted without the CSRF token is refused. Screenshots of every page go to
test-artifacts/dashboard/ (git-ignored).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest
from conftest import REPO, started
from http_support import MAC, PROFILE, curl

from pxeserver.app import Context
from pxeserver.mac import MacAddress
from pxeserver.registry import Status
from pxeserver.tftp import TftpService
from pxeserver.web.server import HttpService

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
TOKEN = "browser-test-token"
ARTIFACTS = REPO / "test-artifacts" / "dashboard"
DASHED = MAC.replace(":", "-")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)),
                       reason="needs Debian's chromium and chromium-driver"),
]
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture
def server(ctx: Context) -> Iterator[tuple[str, int]]:
    """HTTP and TFTP on loopback, a profile with its files and one host at 127.0.0.1."""
    ctx.config.api.token = TOKEN
    ctx.config.dashboard.stream_seconds = 5  # reconnects happen during the test, too
    images = ctx.config.tftp_root / "images" / "centos5"
    images.mkdir(parents=True)
    (images / "vmlinuz").write_bytes(b"k" * 4096)
    (images / "initrd.img").write_bytes(b"i" * 8192)
    ctx.provisioning.add_profile(PROFILE | {"vars": {"root_password_hash": "$6$hunter2-secret"}})
    ctx.provisioning.add_host({"mac": MAC, "hostname": "web1", "profile": "centos5",
                               "ip": "127.0.0.1", "vars": {"api_key": "k-e-y-secret"}})
    for number in range(12):
        ctx.provisioning.add_host({"hostname": f"db{number}", "profile": "centos5"})
    with started(HttpService(ctx)), started(TftpService(ctx)) as tftp:
        yield ctx.config.http_base_url, tftp.port


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never fetch anything
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,900", "--no-first-run", "--disable-extensions"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(DRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def shoot(driver: object, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def wait(driver: object, condition: object, what: str, seconds: float = 15) -> object:
    return WebDriverWait(driver, seconds, poll_frequency=0.1).until(condition, message=what)


def row_status(driver: object) -> str:
    return driver.find_element(By.CSS_SELECTOR, f'tr[data-mac="{MAC}"] td.status').text


def live(driver: object) -> None:
    """Wait until the page's event stream is open (the header's dot turns on)."""
    wait(driver, lambda d: "on" in d.find_element(By.ID, "live").get_attribute("class"),
         "the live-update stream to open")


def test_browser_logs_in_acts_and_sees_a_boot_live(
        ctx: Context, server: tuple[str, int], browser: object) -> None:
    base, tftp_port = server
    driver = browser

    # Every page asks for the token first.
    driver.get(f"{base}/")
    assert "/login" in driver.current_url
    shoot(driver, "login")
    driver.find_element(By.ID, "token").send_keys("wrong")
    driver.find_element(By.ID, "login").click()
    wait(driver, lambda d: "wrong token" in d.page_source, "the wrong token to be refused")
    assert "/login" in driver.current_url
    driver.find_element(By.ID, "token").send_keys(TOKEN)
    driver.find_element(By.ID, "login").click()
    wait(driver, lambda d: d.find_elements(By.ID, "hosts"), "the hosts page after login")
    counts = driver.find_element(By.ID, "counts").text
    assert "all 13" in counts and "registered 13" in counts
    assert row_status(driver) == "registered"
    shoot(driver, "hosts")

    # Filter and sort: the table narrows to web1, then db11 sorts first descending.
    driver.find_element(By.ID, "q").send_keys("web")
    driver.find_element(By.ID, "q").submit()
    wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#hosts tbody tr[data-mac]")) == 1,
         "the filter to leave one row")
    driver.get(f"{base}/?sort=hostname&order=desc")
    first = driver.find_element(By.CSS_SELECTOR, "#hosts tbody tr td a").text
    assert first == "web1"

    # Host page: secrets masked, boot config, xl config, and netboot off then on.
    driver.get(f"{base}/hosts/{MAC}")
    page = driver.page_source
    assert "hunter2-secret" not in page and "k-e-y-secret" not in page
    install_token = ctx.store.get_host(_mac()).install_token
    assert install_token and install_token not in page
    autoinstall = driver.find_element(By.ID, "autoinstall").text
    assert "rootpw --iscrypted '********'" in autoinstall
    assert f"/api/hosts/{DASHED}/installed?token=********" in autoinstall
    assert "kernel images/centos5/vmlinuz" in driver.find_element(By.ID, "boot-config").text
    assert 'bootloader = "/usr/local/bin/pypxeboot"' in driver.find_element(By.ID, "xl-config").text
    shoot(driver, "host-registered")
    driver.find_element(By.ID, "netboot-off").click()
    wait(driver, lambda d: d.find_elements(By.ID, "netboot-on"), "the netboot-on button")
    assert "netboot off" in driver.find_element(By.CSS_SELECTOR, ".flash.ok").text
    assert "localboot 0" in driver.find_element(By.ID, "boot-config").text
    assert ctx.store.get_host(_mac()).netboot is False
    driver.find_element(By.ID, "netboot-on").click()
    wait(driver, lambda d: d.find_elements(By.ID, "netboot-off"), "the netboot-off button")
    assert ctx.store.get_host(_mac()).netboot is True

    # A form posted from a page without the CSRF token is refused and changes nothing.
    driver.execute_script(f"""
        const form = document.createElement('form');
        form.method = 'post'; form.action = '/hosts/{MAC}/netboot';
        const field = document.createElement('input');
        field.name = 'netboot'; field.value = 'off'; form.append(field);
        document.body.append(form); form.submit();""")
    wait(driver, lambda d: d.find_elements(By.ID, "error"), "the refusal page")
    assert "CSRF" in driver.find_element(By.ID, "error").text
    assert ctx.store.get_host(_mac()).netboot is True

    # The hosts table, live: a real client boots web1; the row changes without a reload.
    driver.get(f"{base}/?q=web")
    live(driver)
    driver.execute_script("window.notReloaded = true;")
    assert row_status(driver) == "registered"
    fetched = ctx.config.tftp_root.parent / "fetched.cfg"
    subprocess.run(["tftp", "127.0.0.1", str(tftp_port), "-m", "binary", "-c", "get",
                    f"pxelinux.cfg/01-{DASHED}", str(fetched)], check=True, timeout=30,
                   capture_output=True)
    assert "kernel images/centos5/vmlinuz" in fetched.read_text()
    wait(driver, lambda d: row_status(d).startswith("netbooting"), "the row to show netbooting")
    assert "s ago" in driver.find_element(By.CSS_SELECTOR, f'tr[data-mac="{MAC}"] td.age').text
    kickstart = curl(f"{base}/ks/{DASHED}", "--interface", "127.0.0.1")
    assert kickstart.status == 200
    wait(driver, lambda d: row_status(d).startswith("installing"), "the row to show installing")
    shoot(driver, "hosts-live")
    callback = next(line for line in kickstart.text.split("\n%post\n", 1)[1].splitlines()
                    if "/installed?token=" in line)
    subprocess.run(["sh", "-c", callback], check=True, timeout=30, capture_output=True)
    wait(driver, lambda d: row_status(d).startswith("installed"), "the row to show installed")
    assert driver.execute_script("return window.notReloaded === true;")
    wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, '[data-count="installed"]').text == "1",
         "the installed count to update")

    # The host page shows the timeline with durations.
    driver.get(f"{base}/hosts/{MAC}")
    timeline = driver.find_element(By.ID, "timeline").text.lower()
    for step in ("tftp", "pxelinux.cfg/01-", "served kickstart", "install complete", "+0.", " s"):
        assert step in timeline
    shoot(driver, "host")

    # Profiles: list with file sizes and users; add one through the form.
    driver.get(f"{base}/profiles")
    listing = driver.find_element(By.ID, "profiles").text
    assert "centos5" in listing and "4.0 KiB" in listing and "13" in listing
    form = driver.find_element(By.ID, "profile-form")
    for name, value in (("name", "debian12"), ("kernel", "images/debian12/linux"),
                        ("initrd", "images/debian12/initrd.gz"), ("autoinstall", "debian-xen.cfg")):
        form.find_element(By.NAME, name).send_keys(value)
    driver.find_element(By.ID, "add-profile").click()
    wait(driver, lambda d: "added profile debian12" in d.page_source, "the profile to be added")
    assert "debian12" in driver.find_element(By.ID, "profiles").text
    assert ctx.store.get_profile("debian12").autoinstall == "debian-xen.cfg"
    shoot(driver, "profiles")
    driver.get(f"{base}/profiles/centos5")
    shoot(driver, "profile")

    # Activity: the feed has the boot, the chart is drawn by the shipped uPlot, and a new
    # event arrives live.
    driver.get(f"{base}/activity")
    live(driver)
    assert "served kickstart" in driver.find_element(By.ID, "feed").text
    assert driver.find_elements(By.CSS_SELECTOR, "#chart .uplot canvas")
    db10 = next(mac for mac in ctx.store.macs() if ctx.store.get_host(mac).hostname == "db10")
    ctx.provisioning.set_netboot(db10, False)

    def newest(d: object) -> str:
        return d.find_element(By.CSS_SELECTOR, "#feed tbody tr:first-child").text

    wait(driver, lambda d: "db10" in newest(d) and newest(d).endswith("changed netboot"),
         "the new event at the top of the live feed")
    shoot(driver, "activity")

    # Other hosts boot as the services move them (policy.advance): the counts follow live.
    driver.get(f"{base}/?sort=status&order=desc")
    live(driver)
    others = sorted(mac for mac in ctx.store.macs() if mac not in (_mac(), db10))
    for mac in others[:6]:
        ctx.policy.advance(mac, Status.NETBOOTING)
    for mac in others[:2]:
        ctx.policy.advance(mac, Status.INSTALLING)
    wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, '[data-count="netbooting"]').text == "4"
         and d.find_element(By.CSS_SELECTOR, '[data-count="installed"]').text == "1"
         and d.find_element(By.CSS_SELECTOR, '[data-count="installing"]').text == "2",
         "the counts to follow the boots")
    shoot(driver, "hosts-after")

    # A host that stays netbooting past [dashboard] stalled_after turns stalled on the open page.
    ctx.config.dashboard.stalled_after = 5
    fresh = others[-1]
    ctx.policy.advance(fresh, Status.NETBOOTING)
    driver.get(f"{base}/?q={fresh}")
    row = f'tr[data-mac="{fresh}"]'
    assert "stalled" not in driver.find_element(By.CSS_SELECTOR, row).get_attribute("class")
    wait(driver, lambda d: "stalled" in d.find_element(By.CSS_SELECTOR, row).get_attribute("class")
         and "stalled" in d.find_element(By.CSS_SELECTOR, f"{row} td.status").text,
         "the row to be marked stalled", seconds=20)


def _mac() -> MacAddress:
    return MacAddress.parse(MAC)
