"""Access control against real server processes: the admin token on the HTTP face and
CurveZMQ on the ZMQ face, both off unless configured."""

from __future__ import annotations

import random
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from lmcache import protocol as p
from lmcache.client import MPClient, ServerUnavailableError
from lmcache.kv_transfer import register_kv_caches
from lmcache.config import ConfigError, ConnectorConfig, ServerConfig
from lmcache.integration.vllm.adapter import _client
from lmcache.keys import prompt_hashes
from lmcache.security import bearer_matches, is_loopback, is_z85_key, load_public_key
from lmcache.server.process import ServerProcess, lmcache_command
from lmcache.testing.vllm_like import make_kv

TOKEN = "s3cret-admin-token-for-tests-4b1d"
CHUNK = 64  # 4 blocks of 16 tokens: the default KVShape's 32 blocks hold 8 chunks
# Long enough for a handshake on a loaded 2-core machine, short enough to keep refusals quick.
REFUSED_TIMEOUT_S = 1.5


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*lmcache_command(), *args], capture_output=True, text=True, timeout=60)


def _one_error_line(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 2, out
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    return lines[0]


def _keygen(directory: Path, name: str) -> tuple[Path, Path]:
    out = _run("keygen", str(directory), "--name", name)
    assert out.returncode == 0, out
    return directory / f"{name}.key", directory / f"{name}.key_secret"


def _store_chunks(client: MPClient, n_chunks: int) -> None:
    kv = make_kv("LBNHC", "float16")
    reg = register_kv_caches(client, kv, model="security-test")
    hashes = prompt_hashes(random.Random(n_chunks).choices(range(30_000), k=CHUNK * n_chunks), CHUNK)
    assert reg.store(hashes, range(4 * n_chunks)).stored == n_chunks


# --- admin token ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_server() -> Iterator[ServerProcess]:
    with ServerProcess(extra_args=["--admin-token", TOKEN, "--chunk-size", str(CHUNK)]) as proc:
        yield proc


@pytest.fixture
def admin(token_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=token_server.http_url, timeout=5.0) as c:
        yield c


def _l1(http: httpx.Client) -> dict:
    r = http.get("/status")
    assert r.status_code == 200
    return r.json()["l1"]


def test_clear_without_the_right_token_is_401_and_clears_nothing(
    token_server: ServerProcess, admin: httpx.Client
) -> None:
    with MPClient("127.0.0.1", token_server.port) as client:
        _store_chunks(client, 4)
    before = _l1(admin)
    assert before["objects"] >= 4
    refused = [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer t\u00e9st".encode()},  # non-ASCII must be refused, not crash the check
    ]
    for headers in refused:
        r = admin.post("/clear-cache", headers=headers)
        assert r.status_code == 401, headers
        assert r.headers["www-authenticate"].startswith("Bearer"), headers
        body = r.json()
        assert body["status"] == "error" and body["error"], headers
        assert TOKEN not in r.text
    after = _l1(admin)
    assert after["clears"] == before["clears"]
    assert after["objects"] == before["objects"]

    r = admin.post("/clear-cache", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}
    cleared = _l1(admin)
    assert cleared["clears"] == before["clears"] + 1
    assert cleared["objects"] == 0


def test_the_bearer_scheme_is_case_insensitive(admin: httpx.Client) -> None:
    before = _l1(admin)["clears"]
    r = admin.post("/clear-cache", headers={"Authorization": f"bearer {TOKEN}"})
    assert r.status_code == 200
    assert _l1(admin)["clears"] == before + 1


def test_reads_stay_open_with_a_token(admin: httpx.Client) -> None:
    assert admin.get("/healthcheck").json() == {"status": "healthy"}
    assert admin.get("/status").status_code == 200
    assert admin.get("/metrics").status_code == 200
    assert admin.get("/clear-cache").status_code == 405  # a read method is never asked for the token


def test_unknown_write_routes_answer_401_without_the_token(admin: httpx.Client) -> None:
    # An unauthenticated writer learns nothing about which routes exist...
    for method, path in (("POST", "/no-such-route"), ("POST", "/status"), ("DELETE", "/clear-cache")):
        r = admin.request(method, path)
        assert r.status_code == 401, (method, path)
    # ...and one with the token gets the usual answers.
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert admin.post("/no-such-route", headers=auth).status_code == 404
    assert admin.post("/status", headers=auth).status_code == 405
    metrics = admin.get("/metrics").text
    assert "no-such-route" not in metrics  # unmatched paths share the label "other"


def test_refusals_are_counted_in_metrics(admin: httpx.Client) -> None:
    def refused() -> float:
        for line in admin.get("/metrics").text.splitlines():
            if line.startswith('lmcache_http_requests_total{route="/clear-cache",status="401"}'):
                return float(line.split()[-1])
        return 0.0

    before = refused()
    admin.post("/clear-cache")
    assert refused() == before + 1


def test_refused_quota_writes_share_one_label_and_never_show_a_salt(admin: httpx.Client) -> None:
    # Salts are request data: one series per salt would grow /metrics without bound, and show them.
    for i in range(20):
        assert admin.put(f"/quota/salt-{i}", json={"limit_gb": 1}).status_code == 401
        assert admin.delete(f"/quota/other-{i}").status_code == 401
    metrics = admin.get("/metrics").text
    assert "salt-" not in metrics and "other-" not in metrics
    refused = [line for line in metrics.splitlines() if line.startswith("lmcache_http_requests_total{") and '"401"' in line]
    assert any('route="/quota"' in line and float(line.split()[-1]) >= 40 for line in refused), refused


def test_the_token_is_shown_nowhere(token_server: ServerProcess, admin: httpx.Client) -> None:
    status = admin.get("/status")
    assert status.json()["config"]["admin_token"] == "***"
    assert TOKEN not in status.text
    assert TOKEN not in admin.get("/metrics").text
    with MPClient("127.0.0.1", token_server.port) as client:
        zmq_status = client.status()
    assert zmq_status["config"]["admin_token"] == "***"
    assert TOKEN not in repr(zmq_status)
    assert "access control: on" in token_server.wait_for_line("Starting LMCache server")
    assert TOKEN not in token_server.output()


def test_the_token_can_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    token = "from-the-env-9f2c"
    monkeypatch.setenv("LMCACHE_ADMIN_TOKEN", token)
    with ServerProcess() as server, httpx.Client(base_url=server.http_url, timeout=5.0) as http:
        clears = _l1(http)["clears"]
        assert http.post("/clear-cache").status_code == 401
        assert _l1(http)["clears"] == clears
        assert http.post("/clear-cache", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        assert _l1(http)["clears"] == clears + 1
        assert token not in http.get("/status").text
        assert token not in server.output()


def test_without_a_token_clear_stays_open(http: httpx.Client) -> None:
    before = _l1(http)["clears"]
    assert http.post("/clear-cache").status_code == 200
    assert _l1(http)["clears"] == before + 1
    assert http.get("/status").json()["config"]["admin_token"] == ""


def test_the_config_masks_the_token_and_checks_it() -> None:
    config = ServerConfig(l1_size_gb=1, admin_token=TOKEN)
    assert config.as_dict()["admin_token"] == "***"
    assert TOKEN not in repr(config)
    assert ServerConfig(l1_size_gb=1).as_dict()["admin_token"] == ""
    with pytest.raises(ConfigError) as e:
        ServerConfig(l1_size_gb=1, admin_token="has a space")
    assert e.value.field == "admin_token"
    assert "has a space" not in e.value.message


def test_bearer_matching() -> None:
    assert bearer_matches(f"Bearer {TOKEN}", TOKEN)
    assert bearer_matches(f"BEARER  {TOKEN} ", TOKEN)
    for header in (None, "", TOKEN, f"Bearer {TOKEN[:-1]}", f"Token {TOKEN}", "Bearer t\udcc3st"):
        assert not bearer_matches(header, TOKEN), header


# --- CurveZMQ ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    server_public: Path
    server_secret: Path
    authorized_dir: Path
    client_secret: Path  # its public half is in authorized_dir
    stranger_secret: Path  # a valid pair that is not authorized


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    root = tmp_path_factory.mktemp("curve")
    server_public, server_secret = _keygen(root / "server", "server")
    _, client_secret = _keygen(root / "clients", "vllm")
    _, stranger_secret = _keygen(root / "strangers", "stranger")
    return Keys(server_public, server_secret, root / "clients", client_secret, stranger_secret)


@pytest.fixture(scope="module")
def curve_server(keys: Keys) -> Iterator[ServerProcess]:
    args = ["--curve-secret-key", str(keys.server_secret), "--curve-authorized-keys", str(keys.authorized_dir)]
    with ServerProcess(extra_args=args) as proc:
        yield proc


def _authorized(server: ServerProcess, keys: Keys, timeout_s: float = 10.0) -> MPClient:
    return MPClient("127.0.0.1", server.port, timeout_s=timeout_s,
                    curve_server_key=str(keys.server_public), curve_client_secret_file=str(keys.client_secret))


def _refused(client: MPClient) -> None:
    """The client gets no answer, and gives up within its own timeout."""
    start = time.monotonic()
    with client, pytest.raises(ServerUnavailableError):
        client.ping()
    assert time.monotonic() - start < REFUSED_TIMEOUT_S + 1.0


def test_keygen_writes_a_private_secret_and_a_public_key(tmp_path: Path) -> None:
    out = _run("keygen", str(tmp_path / "new"), "--name", "node1")
    assert out.returncode == 0, out
    public, secret = tmp_path / "new" / "node1.key", tmp_path / "new" / "node1.key_secret"
    assert secret.stat().st_mode & 0o077 == 0
    assert public.stat().st_mode & 0o044 == 0o044
    assert "secret-key" not in public.read_text()
    z85 = load_public_key(public)
    assert is_z85_key(z85)
    assert z85.decode() in out.stdout
    assert load_public_key(secret) == z85
    again = _run("keygen", str(tmp_path / "new"), "--name", "node1")
    assert "already exists" in _one_error_line(again)
    assert load_public_key(public) == z85  # never overwritten


def test_an_authorized_client_is_served(curve_server: ServerProcess, keys: Keys) -> None:
    with _authorized(curve_server, keys) as client:
        assert client.ping() == p.Pong()
        assert client.status()["config"]["curve_secret_key"] == str(keys.server_secret)


def test_the_server_key_may_be_given_as_z85_text(curve_server: ServerProcess, keys: Keys) -> None:
    z85 = load_public_key(keys.server_public).decode()
    with MPClient("127.0.0.1", curve_server.port, timeout_s=10.0,
                  curve_server_key=z85, curve_client_secret_file=str(keys.client_secret)) as client:
        assert client.ping() == p.Pong()


def test_an_unauthorized_client_key_gets_no_reply(curve_server: ServerProcess, keys: Keys) -> None:
    _refused(MPClient("127.0.0.1", curve_server.port, timeout_s=REFUSED_TIMEOUT_S,
                      curve_server_key=str(keys.server_public), curve_client_secret_file=str(keys.stranger_secret)))
    with _authorized(curve_server, keys) as client:
        assert client.ping() == p.Pong()


def test_a_throwaway_client_key_is_not_authorized(curve_server: ServerProcess, keys: Keys) -> None:
    _refused(MPClient("127.0.0.1", curve_server.port, timeout_s=REFUSED_TIMEOUT_S,
                      curve_server_key=str(keys.server_public)))
    with _authorized(curve_server, keys) as client:
        assert client.ping() == p.Pong()


def test_a_plain_client_gets_no_reply(curve_server: ServerProcess, keys: Keys) -> None:
    _refused(MPClient("127.0.0.1", curve_server.port, timeout_s=REFUSED_TIMEOUT_S))
    with _authorized(curve_server, keys) as client:
        assert client.ping() == p.Pong()


def test_a_client_with_the_wrong_server_key_gets_no_reply(curve_server: ServerProcess, keys: Keys) -> None:
    stranger_public = load_public_key(keys.stranger_secret)
    _refused(MPClient("127.0.0.1", curve_server.port, timeout_s=REFUSED_TIMEOUT_S,
                      curve_server_key=stranger_public, curve_client_secret_file=str(keys.client_secret)))


def test_lmcache_ping_takes_the_curve_keys(curve_server: ServerProcess, keys: Keys) -> None:
    base = ["ping", "--host", "127.0.0.1", "--port", str(curve_server.port), "--timeout", "10"]
    ok = _run(*base, "--curve-server-key", str(keys.server_public), "--curve-client-secret-file", str(keys.client_secret))
    assert ok.returncode == 0, ok
    assert "round trip" in ok.stdout
    plain = _run(*base[:-1], str(REFUSED_TIMEOUT_S))
    assert plain.returncode == 1
    bad = _run(*base, "--curve-server-key", "not-a-key")
    assert "--curve-server-key" in _one_error_line(bad)


def test_without_authorized_keys_any_client_with_the_server_key_is_served(keys: Keys) -> None:
    with ServerProcess(extra_args=["--curve-secret-key", str(keys.server_secret)]) as server:
        with MPClient("127.0.0.1", server.port, timeout_s=10.0, curve_server_key=str(keys.server_public)) as c:
            assert c.ping() == p.Pong()
        _refused(MPClient("127.0.0.1", server.port, timeout_s=REFUSED_TIMEOUT_S))


def test_a_curve_server_with_an_authenticator_stops_cleanly(keys: Keys) -> None:
    server = ServerProcess(extra_args=[
        "--curve-secret-key", str(keys.server_secret), "--curve-authorized-keys", str(keys.authorized_dir),
    ]).start()
    with _authorized(server, keys) as client:
        assert client.ping() == p.Pong()
        start = time.monotonic()
        assert server.stop(timeout_s=10.0) == 0  # the ZAP thread must not hold the context open
    assert time.monotonic() - start < 5.0
    assert "Traceback" not in server.output()


def test_the_connector_config_builds_a_curve_client(curve_server: ServerProcess, keys: Keys) -> None:
    config = ConnectorConfig.from_extra_config({
        "lmcache.mp.host": "tcp://127.0.0.1",
        "lmcache.mp.port": curve_server.port,
        "lmcache.mp.timeout_s": 10,
        "lmcache.mp.curve_server_key": str(keys.server_public),
        "lmcache.mp.curve_client_secret_file": str(keys.client_secret),
    })
    assert config.curve_client_secret_file == str(keys.client_secret)
    with _client(config) as client:
        assert client.ping() == p.Pong()
    unauthorized = ConnectorConfig.from_extra_config({
        "lmcache.mp.host": "tcp://127.0.0.1",
        "lmcache.mp.port": curve_server.port,
        "lmcache.mp.timeout_s": REFUSED_TIMEOUT_S,
        "lmcache.mp.curve_server_key": str(keys.server_public),
    })
    _refused(_client(unauthorized))


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"lmcache.mp.curve_server_key": "not-a-key-nor-a-file"}, "curve_server_key"),
        ({"lmcache.mp.curve_client_secret_file": "/nowhere"}, "curve_client_secret_file"),
        ({"lmcache.mp.curve_server_key": "SERVER_PUBLIC", "lmcache.mp.curve_client_secret_file": "SERVER_PUBLIC"},
         "curve_client_secret_file"),  # a public key file holds no secret key
    ],
)
def test_the_connector_config_refuses_bad_curve_keys(keys: Keys, extra: dict[str, str], field: str) -> None:
    extra = {k: str(keys.server_public) if v == "SERVER_PUBLIC" else v for k, v in extra.items()}
    with pytest.raises(ConfigError) as e:
        ConnectorConfig.from_extra_config(extra)
    assert e.value.field == field


def _bad_key_cases(root: Path, keys: Keys) -> list[tuple[list[str], str]]:
    garbage = root / "garbage.key_secret"
    garbage.write_text("this is not a certificate\n")
    malformed = root / "malformed.key_secret"
    malformed.write_text('curve\n    public-key = "short"\n    secret-key = "short"\n')
    empty_dir = root / "empty"
    empty_dir.mkdir()
    bad_dir = root / "bad-clients"
    bad_dir.mkdir()
    (bad_dir / "broken.key").write_text('curve\n    public-key = "0123456789"\n')
    secret = ["--curve-secret-key", str(keys.server_secret)]
    return [
        (["--curve-secret-key", str(root / "missing.key_secret")], "--curve-secret-key"),
        (["--curve-secret-key", str(garbage)], "--curve-secret-key"),
        (["--curve-secret-key", str(malformed)], "--curve-secret-key"),
        (["--curve-secret-key", str(keys.server_public)], "--curve-secret-key"),  # public half only
        (["--curve-authorized-keys", str(keys.authorized_dir)], "--curve-authorized-keys"),  # no secret key
        ([*secret, "--curve-authorized-keys", str(root / "missing-dir")], "--curve-authorized-keys"),
        ([*secret, "--curve-authorized-keys", str(empty_dir)], "--curve-authorized-keys"),
        ([*secret, "--curve-authorized-keys", str(bad_dir)], "--curve-authorized-keys"),
    ]


def test_bad_key_files_exit_2_with_one_line(tmp_path: Path, keys: Keys) -> None:
    for args, flag in _bad_key_cases(tmp_path, keys):
        out = _run("server", "--l1-size-gb", "0.1", *args)
        line = _one_error_line(out)
        assert flag in line, (args, line)


# --- the unauthenticated-port warning -----------------------------------------------------


def _warnings(server: ServerProcess) -> list[str]:
    server.wait_for_line("cache server is running")
    return [line for line in server.lines if line.startswith("LMCache WARNING:") and "unauthenticated" in line]


def test_a_non_loopback_port_without_curve_warns_once() -> None:
    with ServerProcess(extra_args=["--host", "0.0.0.0"]) as server:
        warnings = _warnings(server)
    assert len(warnings) == 1, warnings
    assert "--curve-secret-key" in warnings[0] and "Security" in warnings[0] and "README" in warnings[0]


def test_no_warning_on_loopback_or_with_curve(keys: Keys, token_server: ServerProcess) -> None:
    assert _warnings(token_server) == []  # 127.0.0.1
    with ServerProcess(extra_args=["--host", "0.0.0.0", "--curve-secret-key", str(keys.server_secret)]) as server:
        assert _warnings(server) == []


def test_loopback_hosts() -> None:
    for host in ("localhost", "127.0.0.1", "127.3.2.1", "::1", "[::1]"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "*", "10.0.0.1", "::", "example.com", "eth0"):
        assert not is_loopback(host), host
