"""Hostile model registrations: key variables that are not the registry's to read, server URLs with credentials or
pointing at link-local and cloud-metadata addresses (literal, disguised, or by a name that resolves there — at
registration or only later), redirects, upstream error bodies, and GGUF paths outside the models directory.

Every class is tried with several payloads, through the Python API, the CLI and the Models page where the path
exists; servers are real HTTP servers on 127.0.0.1."""

from __future__ import annotations

import http.server
import json
import os
import socket
import struct
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core import executions, llm, models, outbound
from core.cli import main
from core.config import SettingsError, load_settings
from core.errors import Forbidden, InvalidInput, kind_of
from core.executions import Origin
from core.llm import GenerationParams
from core.model_files import file_sha256
from tests.conftest import APP_PATH

SECRET = "sk-live-7f3a9c-TOP-SECRET"
PARAMS = GenerationParams(max_tokens=4, seed=1)
HELLO = [{"role": "user", "content": "hi"}]


# ------------------------------------------------------------------------------------------------ local servers


class Recorder(http.server.ThreadingHTTPServer):
    """A real HTTP server on 127.0.0.1 that records each request and answers with `respond(handler)`."""

    daemon_threads = True

    def __init__(self, respond):
        self.requests: list[dict] = []
        self.respond = respond
        super().__init__(("127.0.0.1", 0), _Handler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's naming
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
        self.server.respond(self)

    do_GET = do_POST  # noqa: N815

    def log_message(self, *args):
        pass


def stream_reply(handler) -> None:
    """A minimal OpenAI-compatible streamed answer."""
    events = [{"choices": [{"delta": {"content": "hello"}, "finish_reason": None}]},
              {"choices": [{"delta": {}, "finish_reason": "stop"}]}]
    payload = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    handler.send_response(200)
    handler.send_header("Content-Type", "text/event-stream")
    handler.send_header("Content-Length", str(len(payload)))
    handler.end_headers()
    handler.wfile.write(payload.encode())


@pytest.fixture
def model_server():
    server = Recorder(stream_reply)
    yield server
    server.stop()


def serve(respond):
    return Recorder(respond)


# ------------------------------------------------------------------------------------------------ API key variables

REFUSED_KEY_VARIABLES = ["PROMPTDEV_DATABASE_URL", "HOME", "AWS_SECRET_ACCESS_KEY", "PROMPTDEV_OPENAI_API_KEY",
                         "promptdev_key_lowercase", "PATH", "PROMPTDEV_KEYX", "SSH_AUTH_SOCK"]


@pytest.mark.parametrize("variable", REFUSED_KEY_VARIABLES)
def test_a_key_variable_off_the_allow_list_is_refused_and_nothing_is_written(pool, settings, model_server,
                                                                           monkeypatch, variable):
    monkeypatch.setenv(variable, SECRET)
    with pytest.raises(models.InvalidModel, match="PROMPTDEV_MODEL_KEY_ENV_ALLOW") as info:
        models.register_model(pool, "exfil", backend="openai", base_url=model_server.base_url, remote_model="m",
                              api_key_env=variable, settings=settings)
    assert SECRET not in str(info.value) and kind_of(info.value) is InvalidInput
    assert models.list_models(pool) == [] and model_server.requests == []


def test_an_allowed_key_variable_is_sent_and_only_to_its_server(pool, settings, model_server, monkeypatch):
    monkeypatch.setenv("PROMPTDEV_KEY_LAB", SECRET)
    models.register_model(pool, "lab", backend="openai", base_url=model_server.base_url, remote_model="m",
                          api_key_env="PROMPTDEV_KEY_LAB", settings=settings)
    backend = models.backend_for(pool, settings, "lab")
    assert backend.generate(HELLO, params=PARAMS).read() == "hello"
    assert model_server.requests[-1]["headers"]["Authorization"] == f"Bearer {SECRET}"


def test_the_allow_list_is_the_admins_and_is_checked_again_when_the_key_is_read(pool, settings, model_server,
                                                                               monkeypatch):
    corp = replace(settings, model_key_env_allow="CORP_*, LAB_TOKEN")
    monkeypatch.setenv("CORP_MODEL_KEY", SECRET)
    monkeypatch.setenv("PROMPTDEV_KEY_X", SECRET)
    models.register_model(pool, "corp", backend="openai", base_url=model_server.base_url, remote_model="m",
                          api_key_env="CORP_MODEL_KEY", settings=corp)
    with pytest.raises(models.InvalidModel, match="CORP_\\*, LAB_TOKEN"):
        models.register_model(pool, "x", backend="openai", base_url=model_server.base_url, remote_model="m",
                              api_key_env="PROMPTDEV_KEY_X", settings=corp)
    assert models.backend_for(pool, corp, "corp").generate(HELLO, params=PARAMS).read() == "hello"
    # The admin narrows the list: the registered model may no longer read its key, and no request goes out.
    sent = len(model_server.requests)
    with pytest.raises(models.InvalidModel, match="CORP_MODEL_KEY is not one models may read"):
        models.backend_for(pool, replace(corp, model_key_env_allow=""), "corp")
    assert len(model_server.requests) == sent


@pytest.mark.parametrize("variable", ["PROMPTDEV_DATABASE_URL", "HOME", "GITHUB_TOKEN"])
def test_a_row_written_before_the_checks_cannot_read_any_variable(pool, settings, model_server, monkeypatch,
                                                                  variable):
    monkeypatch.setenv(variable, SECRET)
    with pool.connection() as conn:
        conn.execute("INSERT INTO models (name, backend, base_url, remote_model, api_key_env, chat_format, n_ctx) "
                     "VALUES ('legacy', 'openai', %s, 'm', %s, 'auto', 4096)", (model_server.base_url, variable))
    with pytest.raises(models.InvalidModel, match="is not one models may read"):
        models.backend_for(pool, settings, "legacy")
    assert model_server.requests == []


def test_the_settings_key_goes_to_the_settings_server_only(pool, settings, model_server, monkeypatch):
    admin = replace(settings, backend="openai", openai_base_url=model_server.base_url, openai_model="m",
                    openai_api_key=SECRET)
    monkeypatch.setenv("PROMPTDEV_OPENAI_API_KEY", SECRET)
    default = models.ensure_default_model_registered(pool, admin)
    assert default.api_key_env == "PROMPTDEV_OPENAI_API_KEY"
    assert models.backend_for(pool, admin).generate(HELLO, params=PARAMS).read() == "hello"
    assert model_server.requests[-1]["headers"]["Authorization"] == f"Bearer {SECRET}"
    # the same server under another name may use it; another server may not
    models.register_model(pool, "same", backend="openai", base_url=model_server.base_url + "/", remote_model="m",
                          api_key_env="PROMPTDEV_OPENAI_API_KEY", settings=admin)
    other = serve(stream_reply)
    try:
        with pytest.raises(models.InvalidModel, match="PROMPTDEV_MODEL_KEY_ENV_ALLOW"):
            models.register_model(pool, "other", backend="openai", base_url=other.base_url, remote_model="m",
                                  api_key_env="PROMPTDEV_OPENAI_API_KEY", settings=admin)
        assert other.requests == []
    finally:
        other.stop()
    llm.unload(llm.ModelSpec.from_settings(admin))


@pytest.mark.parametrize("value, ok", [("PROMPTDEV_KEY_*,OPENAI_API_KEY", True), ("A_B C_*", True), ("", True),
                                       ("*", False), ("KEY-1", False), ("$HOME", False), ("A*B", False)])
def test_the_allow_list_setting_is_validated(value, ok):
    env = {"PROMPTDEV_MODEL_KEY_ENV_ALLOW": value}
    if ok:
        load_settings(env=env)
    else:
        with pytest.raises(SettingsError, match="PROMPTDEV_MODEL_KEY_ENV_ALLOW"):
            load_settings(env=env)


# ------------------------------------------------------------------------------------------------ server URLs

CREDENTIAL_URLS = [
    f"http://admin:{SECRET}@127.0.0.1:9/v1",
    f"http://{SECRET}@127.0.0.1:9/v1",
    f"http://:{SECRET}@127.0.0.1:9/v1",
    f"https://user%40corp:{SECRET}@127.0.0.1/v1",
    f"http://127.0.0.1:9\\@{SECRET}.example/v1",
    f"http://127.0.0.1:9@{SECRET}.example/v1",
]

FORBIDDEN_URLS = [
    "http://169.254.169.254/latest/meta-data",
    "http://169.254.169.254:80/v1",
    "http://[::ffff:169.254.169.254]/v1",
    "http://[::ffff:a9fe:a9fe]/v1",
    "http://[::169.254.169.254]/v1",
    "http://[64:ff9b::a9fe:a9fe]/v1",
    "http://[2002:a9fe:a9fe::1]/v1",
    "http://2852039166/v1",
    "http://0xa9fea9fe/v1",
    "http://0251.0376.0251.0376/v1",
    "http://169.254.43518/v1",
    "http://169.254.1.1:8000/v1",
    "http://[fe80::1]/v1",
    "http://[fe80::1%25lo]/v1",
    "http://[fd00:ec2::254]/v1",
    "http://100.100.100.200/latest/meta-data",
    "http://metadata.google.internal/computeMetadata/v1",
    "http://METADATA.google.internal./computeMetadata/v1",
    "https://metadata.goog/v1",
]

MALFORMED_URLS = ["file:///etc/passwd", "ftp://127.0.0.1/v1", "gopher://127.0.0.1:70/_x", "http:/127.0.0.1/v1",
                  "//127.0.0.1/v1", "javascript:alert(1)", "http://127.0.0.1:9/v1?x=1", "http://127.0.0.1:9/v1#f",
                  "http://127.0.0.1:9/v1\r\nX-Injected: 1", "http://127.0.0.1 /v1", "http://127.0.0.1:99999/v1"]


def register_server(pool, settings, url, **kwargs):
    return models.register_model(pool, "srv", backend="openai", base_url=url, remote_model="m", settings=settings,
                                 **kwargs)


@pytest.mark.parametrize("url", CREDENTIAL_URLS)
def test_credentials_in_a_url_are_refused_and_never_printed(pool, settings, url):
    with pytest.raises(models.InvalidModel) as info:
        register_server(pool, settings, url)
    assert SECRET not in str(info.value) and "admin" not in str(info.value)
    assert models.list_models(pool) == []


@pytest.mark.parametrize("url", FORBIDDEN_URLS)
def test_link_local_and_metadata_addresses_are_refused_at_registration(pool, settings, url):
    with pytest.raises(models.InvalidModel, match="link-local|cloud metadata") as info:
        register_server(pool, settings, url)
    assert url not in str(info.value) and url.split("//")[1].split("/")[0] not in str(info.value)  # not repeated
    assert models.list_models(pool) == []


@pytest.mark.parametrize("url", MALFORMED_URLS)
def test_other_schemes_and_malformed_urls_are_refused(pool, settings, url):
    with pytest.raises(models.InvalidModel):
        register_server(pool, settings, url)
    assert models.list_models(pool) == []


@pytest.mark.parametrize("url", FORBIDDEN_URLS + CREDENTIAL_URLS)
def test_the_configured_default_server_is_checked_the_same_way(url):
    env = {"PROMPTDEV_BACKEND": "openai", "PROMPTDEV_OPENAI_BASE_URL": url, "PROMPTDEV_OPENAI_MODEL": "m"}
    with pytest.raises(SettingsError, match="PROMPTDEV_OPENAI_BASE_URL") as info:
        load_settings(env=env)
    assert SECRET not in str(info.value)


@pytest.mark.parametrize("url", FORBIDDEN_URLS[:12] + CREDENTIAL_URLS[:3])
def test_a_backend_for_a_refused_url_sends_nothing(url):
    """Built directly (a row written before the checks, a spec from elsewhere): refused before any request."""
    with pytest.raises(llm.ServerForbidden) as info:
        llm.OpenAIBackend(url, "m", api_key=SECRET).generate(HELLO, params=PARAMS).read()
    assert kind_of(info.value) is Forbidden and SECRET not in str(info.value)
    assert isinstance(info.value, llm.GenerationError)


@pytest.mark.parametrize("url", [FORBIDDEN_URLS[0], FORBIDDEN_URLS[2], CREDENTIAL_URLS[0]])
def test_a_row_written_before_the_checks_is_refused_at_request_time(pool, settings, url):
    with pool.connection() as conn:
        conn.execute("INSERT INTO models (name, backend, base_url, remote_model, chat_format, n_ctx) "
                     "VALUES ('legacy', 'openai', %s, 'm', 'auto', 4096)", (url,))
    with pytest.raises(llm.ServerForbidden) as info:
        models.backend_for(pool, settings, "legacy").generate(HELLO, params=PARAMS).read()
    assert SECRET not in str(info.value)


@pytest.mark.parametrize("url", ["http://localhost:{port}/v1", "http://127.0.0.1:{port}/v1",
                                 "http://LocalHost:{port}/v1", "HTTP://127.0.0.1:{port}/v1/"])
def test_loopback_servers_stay_allowed(pool, settings, model_server, url):
    added = register_server(pool, settings, url.format(port=model_server.port))
    assert models.backend_for(pool, settings, added.name).generate(HELLO, params=PARAMS).read() == "hello"


# ------------------------------------------------------------------------------------------------ name resolution


@pytest.fixture
def dns(monkeypatch):
    """Answers of the system resolver for names under .promptdev.test, set by the test (socket.getaddrinfo is the
    standard library's, not ours: this is the resolver a hostile DNS server would be)."""
    answers: dict[str, list[str]] = {}
    real = socket.getaddrinfo

    def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name.lower().rstrip(".") in answers:
            out = []
            for address in answers[name.lower().rstrip(".")]:
                if ":" in address:
                    out.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port, 0, 0)))
                else:
                    out.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)))
            return out
        return real(host, port, family, type, proto, flags)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return answers


@pytest.mark.parametrize("answer", [["169.254.169.254"], ["127.0.0.1", "169.254.169.254"], ["fe80::1"],
                                    ["::ffff:169.254.169.254"], ["fd00:ec2::254"], ["100.100.100.200"],
                                    ["::1", "169.254.10.10"]])
def test_a_name_resolving_to_a_forbidden_address_is_refused(pool, settings, dns, answer):
    dns["evil.promptdev.test"] = answer
    with pytest.raises(models.InvalidModel, match="resolves to a (link-local|cloud metadata) address"):
        register_server(pool, settings, "http://evil.promptdev.test:8000/v1")
    assert models.list_models(pool) == []


def test_dns_rebinding_after_registration_is_refused_at_request_time(pool, settings, model_server, dns,
                                                                   monkeypatch):
    monkeypatch.setenv("PROMPTDEV_KEY_REBIND", SECRET)
    dns["rebind.promptdev.test"] = ["127.0.0.1"]
    register_server(pool, settings, f"http://rebind.promptdev.test:{model_server.port}/v1",
                    api_key_env="PROMPTDEV_KEY_REBIND")
    backend = models.backend_for(pool, settings, "srv")
    assert backend.generate(HELLO, params=PARAMS).read() == "hello"
    sent = len(model_server.requests)
    for answer in (["169.254.169.254"], ["127.0.0.1", "169.254.169.254"], ["::ffff:169.254.169.254"]):
        dns["rebind.promptdev.test"] = answer
        with pytest.raises(llm.ServerForbidden, match="link-local|cloud metadata"):
            backend.generate(HELLO, params=PARAMS).read()
    assert len(model_server.requests) == sent  # refused before connecting: the key went nowhere
    run = executions.start(pool, backend, origin=Origin("api"), messages=HELLO, params=PARAMS)
    with pytest.raises(llm.ServerForbidden):
        run.read()
    row = executions.get_execution(pool, run.execution_id)
    assert row.status == "error" and SECRET not in (row.error or "")


def test_unresolvable_names_are_refused_at_registration(pool, settings):
    with pytest.raises(models.InvalidModel, match="does not resolve"):
        register_server(pool, settings, "http://no-such-host.invalid/v1")


def test_address_rules():
    refused = ["169.254.169.254", "169.254.0.1", "fe80::1", "febf::1", "fe80::1%lo", "::ffff:169.254.169.254",
               "::169.254.169.254", "64:ff9b::a9fe:a9fe", "2002:a9fe:a9fe::", "fd00:ec2::254", "100.100.100.200",
               "2001:0:4136:e378:8000:63bf:5601:5601"]  # Teredo whose client is 169.254.169.254
    allowed = ["127.0.0.1", "::1", "10.0.0.5", "192.168.1.20", "172.16.0.1", "100.100.100.201", "8.8.8.8",
               "::ffff:127.0.0.1", "fec0::1", "0.0.0.0"]
    assert all(outbound.refused_address(a) for a in refused), [a for a in refused if not outbound.refused_address(a)]
    assert not any(outbound.refused_address(a) for a in allowed)


# ------------------------------------------------------------------------------------------------ redirects, errors


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirects_are_not_followed(status, model_server):
    def redirect(handler):
        handler.send_response(status)
        handler.send_header("Location", f"http://127.0.0.1:{model_server.port}/v1/chat/completions?leak={SECRET}")
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    redirector = serve(redirect)
    try:
        backend = llm.OpenAIBackend(redirector.base_url, "m", api_key=SECRET, max_retries=2, backoff_s=0.01)
        with pytest.raises(llm.BackendUnavailable, match=f"HTTP {status}.*redirects are not followed") as info:
            backend.generate(HELLO, params=PARAMS).read()
        assert len(redirector.requests) == 1  # not retried either
        assert model_server.requests == []  # the redirect target never saw the request (nor the key)
        assert SECRET not in str(info.value) and str(model_server.port) not in str(info.value)
    finally:
        redirector.stop()


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422, 500, 502, 503])
def test_an_upstream_error_shows_its_status_never_its_body_or_reason(status):
    def fail(handler):
        body = json.dumps({"error": {"message": f"internal: db password {SECRET}"}}).encode()
        handler.send_response(status, f"Oops {SECRET}")  # a reason phrase of the server's own
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    upstream = serve(fail)
    try:
        backend = llm.OpenAIBackend(upstream.base_url, "m", max_retries=1, backoff_s=0.01)
        with pytest.raises(llm.GenerationError) as info:
            backend.generate(HELLO, params=PARAMS).read()
        message = str(info.value)
        assert f"HTTP {status}" in message and SECRET not in message and "password" not in message
        assert "Oops" not in message
    finally:
        upstream.stop()


def test_an_upstream_error_recorded_in_the_ledger_keeps_its_body_out(pool, settings):
    def fail(handler):
        body = f"Traceback: secret={SECRET}".encode()
        handler.send_response(500)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    upstream = serve(fail)
    try:
        models.register_model(pool, "broken", backend="openai", base_url=upstream.base_url, remote_model="m",
                              settings=settings)
        backend = models.backend_for(pool, replace(settings, openai_max_retries=0), "broken")
        run = executions.start(pool, backend, origin=Origin("api"), messages=HELLO, params=PARAMS)
        with pytest.raises(llm.GenerationError, match="HTTP 500 Internal Server Error"):
            run.read()
        row = executions.get_execution(pool, run.execution_id)
        assert row.status == "error" and "500" in row.error and SECRET not in row.error
    finally:
        upstream.stop()
        llm.unload(models.model_spec(models.get_model(pool, "broken"), replace(settings, openai_max_retries=0)))


@pytest.mark.parametrize("line", [f"data: {SECRET}", f"data: <html>{SECRET}</html>", "data: {not json " + SECRET])
def test_a_non_json_event_is_not_echoed(line):
    def reply(handler):
        payload = (line + "\n\n").encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    upstream = serve(reply)
    try:
        with pytest.raises(llm.BackendUnavailable) as info:
            llm.OpenAIBackend(upstream.base_url, "m").generate(HELLO, params=PARAMS).read()
        assert SECRET not in str(info.value)
    finally:
        upstream.stop()


# ------------------------------------------------------------------------------------------------ GGUF paths


def fake_gguf(path: Path) -> Path:
    """A file that passes the GGUF checks (magic, version, tensors, size) without being a model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + b"\0" * (1024 * 1024))
    return path


@pytest.fixture
def models_dir(settings) -> Path:
    settings.models_dir.mkdir(parents=True, exist_ok=True)
    return settings.models_dir


@pytest.fixture
def outside(tmp_path) -> Path:
    """A valid-looking GGUF outside the models directory."""
    return fake_gguf(tmp_path / "elsewhere" / "stolen.gguf")


def refusal(pool, settings, path) -> str:
    with pytest.raises(models.InvalidModel) as info:
        models.register_model(pool, "local", path=path, settings=settings)
    assert kind_of(info.value) is InvalidInput
    return str(info.value)


def test_paths_outside_the_models_directory_get_one_message_whether_they_exist_or_not(pool, settings, models_dir,
                                                                                    outside):
    (models_dir / "sub").mkdir()
    pairs = [  # (exists, does not exist)
        ("/etc/passwd", "/etc/no-such-passwd"),
        ("/etc/hostname", "/etc/no-such-hostname"),
        ("../../etc/hostname", "../../etc/no-such-hostname"),
        ("sub/../../../../../../etc/passwd", "sub/../../../../../../etc/no-such"),
        (str(outside), str(outside.with_name("missing.gguf"))),
        (f"{models_dir}/../../elsewhere/stolen.gguf", f"{models_dir}/../../elsewhere/missing.gguf"),
        ("/proc/self/environ", "/proc/self/no-such"),
        (f"/etc/passwd/../../{models_dir}/x.gguf", f"/etc/no-such/../../{models_dir}/x.gguf"),
        (str(Path.home()), str(Path.home() / "no-such.gguf")),
    ]
    messages = set()
    for existing, missing in pairs:
        first, second = refusal(pool, settings, existing), refusal(pool, settings, missing)
        assert first == second, (existing, first, second)
        messages.add(first)
    assert len(messages) == 1 and "must be inside the models directory" in messages.pop()
    assert models.list_models(pool) == []
    assert not outside.with_name(outside.name + ".sha256").exists()


def test_symbolic_links_out_of_the_models_directory_are_refused_alike(pool, settings, models_dir, outside, tmp_path):
    (models_dir / "link.gguf").symlink_to(outside)
    (models_dir / "dangling.gguf").symlink_to(outside.with_name("missing.gguf"))
    (models_dir / "etc").symlink_to("/etc")
    (tmp_path / "elsewhere" / "dir").mkdir()
    (models_dir / "escape").symlink_to(tmp_path / "elsewhere")
    messages = {refusal(pool, settings, p) for p in ("link.gguf", "dangling.gguf", "etc/passwd", "etc/no-such",
                                                      "escape/stolen.gguf", "escape/missing.gguf",
                                                      str(models_dir / "link.gguf"))}
    assert len(messages) == 1 and messages == {refusal(pool, settings, "/etc/passwd")}
    assert not list(outside.parent.glob("*.sha256")) and models.list_models(pool) == []


def test_a_gguf_inside_the_models_directory_registers_with_its_side_car_there(pool, settings, models_dir):
    fake_gguf(models_dir / "mine.gguf")
    fake_gguf(models_dir / "nested" / "deep.gguf")
    (models_dir / "alias.gguf").symlink_to(models_dir / "nested" / "deep.gguf")  # a link inside is fine
    by_name = models.register_model(pool, "by-name", path="mine.gguf", settings=settings)
    by_path = models.register_model(pool, "by-path", path=str(models_dir / "nested" / "deep.gguf"), settings=settings)
    via_link = models.register_model(pool, "via-link", path="alias.gguf", settings=settings)
    assert by_name.path == os.path.realpath(models_dir / "mine.gguf")
    assert via_link.path == by_path.path == os.path.realpath(models_dir / "nested" / "deep.gguf")
    assert (models_dir / "mine.gguf.sha256").exists() and (models_dir / "nested" / "deep.gguf.sha256").exists()
    with pytest.raises(models.InvalidModel, match="model file not found: .*missing.gguf"):  # inside: it may say so
        models.register_model(pool, "missing", path="missing.gguf", settings=settings)


def test_the_configured_model_may_be_anywhere_and_gets_no_side_car_there(pool, settings, models_dir, outside):
    admin = replace(settings, model_path=outside)
    default = models.ensure_default_model_registered(pool, admin)
    assert default.path == str(outside.resolve()) and default.sha256 == file_sha256(outside)
    again = models.register_model(pool, "admin-copy", path=str(outside), n_ctx=1024, settings=admin)
    assert again.sha256 == default.sha256
    assert not outside.with_name(outside.name + ".sha256").exists()
    assert list((models_dir / ".sha256").glob("*.sha256"))  # cached inside the models directory instead
    assert refusal(pool, admin, str(outside.with_name("other.gguf"))) == refusal(pool, admin, "/etc/passwd")


def test_hashing_a_file_never_writes_a_side_car_outside_the_models_directory(tmp_path, models_dir, outside):
    digest = file_sha256(outside, models_dir)
    assert file_sha256(outside) == digest
    assert not outside.with_name(outside.name + ".sha256").exists()
    assert [p.parent for p in (models_dir / ".sha256").glob("*.sha256")] == [models_dir / ".sha256"]


# ------------------------------------------------------------------------------------------------ CLI and page


@pytest.fixture
def cli(app_env, capsys):
    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err
    return run


@pytest.mark.parametrize("argv, shown", [
    (["--base-url", CREDENTIAL_URLS[0], "--remote-model", "m"], "must not contain a user name or password"),
    (["--base-url", "http://[::ffff:169.254.169.254]/v1", "--remote-model", "m"], "cloud metadata"),
    (["--base-url", "http://2852039166/v1", "--remote-model", "m"], "cloud metadata"),
    (["--base-url", "http://127.0.0.1:9/v1", "--remote-model", "m", "--api-key-env", "PROMPTDEV_DATABASE_URL"],
     "PROMPTDEV_MODEL_KEY_ENV_ALLOW"),
    (["--path", "/etc/passwd"], "must be inside the models directory"),
    (["--path", "../../../../etc/shadow"], "must be inside the models directory"),
])
def test_the_cli_refuses_the_same_in_one_line(cli, pool, argv, shown):
    code, out, err = cli("models", "add", "x", *argv)
    assert code == 1 and out == "" and err.startswith("promptdev: ") and err.count("\n") == 1
    assert shown in err and SECRET not in err and models.list_models(pool) == []


def test_the_models_page_refuses_the_same(app_env, pool, backend):
    at = AppTest.from_file(APP_PATH, default_timeout=120)
    at.run()
    at.switch_page("pages/models.py")
    at.run()
    before = [m.name for m in models.list_models(pool)]
    at.radio(key="models.kind").set_value("OpenAI-compatible server")
    at.text_input(key="models.remote_model").input("m")
    for url, key_env in [(CREDENTIAL_URLS[0], ""), ("http://169.254.169.254/v1", ""),
                         ("http://[::ffff:a9fe:a9fe]/v1", ""), ("http://127.0.0.1:9/v1", "HOME")]:
        at.text_input(key="models.name").input("hostile")
        at.text_input(key="models.base_url").input(url)
        at.text_input(key="models.api_key_env").input(key_env)
        at.button(key="FormSubmitter:models.form-Register").click().run()
        shown = " ".join(e.value for e in at.error)
        assert not at.exception and at.error and SECRET not in shown
    at.radio(key="models.kind").set_value("GGUF file (in-process model)")
    for path in ("/etc/passwd", "/etc/no-such-file"):
        at.text_input(key="models.path").input(path)
        at.button(key="FormSubmitter:models.form-Register").click().run()
        assert "must be inside the models directory" in " ".join(e.value for e in at.error)
    assert [m.name for m in models.list_models(pool)] == before
