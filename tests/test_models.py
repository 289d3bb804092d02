"""The model registry: registering, listing and removing models, the default model, backends per model."""

from __future__ import annotations

from dataclasses import replace

import pytest

from core import executions, llm, models
from core.errors import Conflict, InvalidInput, NotFound, kind_of
from core.executions import Origin
from core.llm import GenerationParams
from core.model_files import file_sha256


def test_default_model_is_registered_once_with_its_hash(pool, settings, default_model_path):
    first = models.ensure_default_model_registered(pool, settings)
    again = models.ensure_default_model_registered(pool, settings)
    assert first == again and first.is_default
    assert first.name == default_model_path.stem and first.backend == "llama_cpp"
    assert first.path == str(default_model_path.resolve()) and first.sha256 == file_sha256(default_model_path)
    assert first.n_ctx == settings.n_ctx and first.chat_format == "auto"
    assert [m.name for m in models.list_models(pool)] == [first.name]
    assert models.default_model(pool) == first


def test_register_gguf_and_openai_models(pool, settings, default_model_path):
    default = models.ensure_default_model_registered(pool, settings)
    local = models.register_model(pool, "gemma-small-ctx", path=default_model_path, n_ctx=1024, chat_format="gemma")
    assert local.sha256 == default.sha256 and local.n_ctx == 1024 and not local.is_default
    remote = models.register_model(pool, "remote-gemma", backend="openai", base_url="http://127.0.0.1:9/v1/",
                                   remote_model="gemma-3-270m", api_key_env="PROMPTDEV_KEY_MINE")
    assert remote.base_url == "http://127.0.0.1:9/v1" and remote.api_key_env == "PROMPTDEV_KEY_MINE"
    assert remote.sha256 is None
    assert [m.name for m in models.list_models(pool)] == [default.name, "gemma-small-ctx", "remote-gemma"]
    assert models.get_model(pool, "remote-gemma") == remote
    assert models.get_model_by_id(pool, local.id) == local


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "x", "path": "/nowhere/model.gguf"}, "must be inside the models directory"),
    ({"name": "x", "path": "nowhere.gguf"}, "model file not found"),
    ({"name": "bad name!", "path": "/x.gguf"}, "model name"),
    ({"name": "x", "backend": "torch", "path": "/x.gguf"}, "backend must be one of"),
    ({"name": "x", "backend": "openai", "base_url": "ftp://h", "remote_model": "m"}, "http:// or https://"),
    ({"name": "x", "backend": "openai", "base_url": "http://h/v1"}, "remote model"),
    ({"name": "x", "backend": "openai", "base_url": "http://h/v1", "remote_model": "m", "api_key_env": "sk-123abc!"},
     "never give the key"),
    ({"name": "x", "backend": "openai", "base_url": "http://127.0.0.1:9/v1", "remote_model": "m",
      "api_key_env": "PROMPTDEV_DATABASE_URL"}, "PROMPTDEV_MODEL_KEY_ENV_ALLOW"),
    ({"name": "x", "backend": "openai", "base_url": "http://h.invalid/v1", "remote_model": "m"}, "does not resolve"),
    ({"name": "x", "path": "/x.gguf", "chat_format": "llama9"}, "unknown chat format"),
    ({"name": "x", "path": "/x.gguf", "n_ctx": 10}, "context size"),
    ({"name": "x"}, "needs the path"),
])
def test_bad_registrations_are_one_clear_error_and_write_nothing(pool, kwargs, message):
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=message):
        models.register_model(pool, name, **kwargs)
    assert models.list_models(pool) == []


def test_duplicate_names_and_removal_rules(pool, settings, default_model_path):
    default = models.ensure_default_model_registered(pool, settings)
    models.register_model(pool, "spare", path=default_model_path)
    with pytest.raises(ValueError, match="already registered"):
        models.register_model(pool, "spare", path=default_model_path)
    with pytest.raises(ValueError, match="default model"):
        models.delete_model(pool, default.name)
    used = models.register_model(pool, "used", backend="openai", base_url="http://127.0.0.1:9/v1", remote_model="m")
    executions.record(pool, origin=Origin("api", model_id=used.id), status="error", error="x",
                      model={"model_name": "used", "backend": "openai", "model_sha256": None,
                             "base_url": used.base_url})
    with pytest.raises(ValueError, match="1 recorded execution"):
        models.delete_model(pool, "used")
    models.delete_model(pool, "spare")
    with pytest.raises(LookupError, match="no model named 'spare'"):
        models.get_model(pool, "spare")
    with pytest.raises(LookupError):
        models.delete_model(pool, "spare")


def test_backend_for_default_is_the_process_backend_and_ledger_links_model_id(pool, settings, backend):
    default = models.ensure_default_model_registered(pool, settings)
    assert models.backend_for(pool, settings) is backend
    assert models.backend_for(pool, settings, default.name) is backend
    assert models.model_for_backend(pool, backend) == default
    run = executions.start(pool, backend, origin=Origin("api"), params=GenerationParams(max_tokens=2, seed=1),
                           prompt="Hello")
    run.read()
    assert executions.get_execution(pool, run.execution_id).model_id == default.id
    with pytest.raises(LookupError, match="no model named 'ghost'"):
        models.backend_for(pool, settings, "ghost")


def test_a_registered_model_gets_its_own_cached_backend(pool, settings, default_model_path, backend):
    models.ensure_default_model_registered(pool, settings)
    small = models.register_model(pool, "gemma-1k", path=default_model_path, n_ctx=1024)
    other = models.backend_for(pool, settings, "gemma-1k")
    assert other is not backend and other.n_ctx == 1024 and other.name == "gemma-1k"
    assert models.backend_for(pool, settings, "gemma-1k") is other  # loaded once per process
    run = executions.start(pool, other, origin=Origin("api"), params=GenerationParams(max_tokens=2, seed=1),
                           prompt="Hello")
    run.read()
    row = executions.get_execution(pool, run.execution_id)
    assert row.model_name == "gemma-1k" and row.model_id == small.id and row.model_sha256 == small.sha256


def test_openai_model_key_comes_from_the_named_variable(pool, settings, monkeypatch):
    models.register_model(pool, "keyed", backend="openai", base_url="http://127.0.0.1:9/v1", remote_model="m",
                          api_key_env="PROMPTDEV_KEY_TEST_X")
    monkeypatch.delenv("PROMPTDEV_KEY_TEST_X", raising=False)
    with pytest.raises(ValueError, match=r"\$PROMPTDEV_KEY_TEST_X, which is not set"):
        models.backend_for(pool, settings, "keyed")
    monkeypatch.setenv("PROMPTDEV_KEY_TEST_X", "secret")
    remote = models.backend_for(pool, settings, "keyed")
    assert isinstance(remote, llm.OpenAIBackend) and remote.model == "m" and "secret" not in str(remote.describe())


def test_openai_default_from_settings(pool, settings):
    s = replace(settings, backend="openai", openai_base_url="http://127.0.0.1:9/v1", openai_model="served")
    m = models.ensure_default_model_registered(pool, s)
    assert (m.name, m.backend, m.base_url, m.remote_model, m.is_default) == ("served", "openai",
                                                                            "http://127.0.0.1:9/v1", "served", True)
    local = models.ensure_default_model_registered(pool, settings)  # the settings changed back: default follows
    assert local.is_default and not models.get_model(pool, "served").is_default


def test_backend_for_execution_finds_the_same_file(pool, settings, backend):
    default = models.ensure_default_model_registered(pool, settings)
    eid = executions.record(pool, origin=Origin("api"), status="ok", output="x",
                            model={"model_name": "renamed", "backend": "llama_cpp", "model_sha256": default.sha256,
                                   "base_url": None})
    row = executions.get_execution(pool, eid)
    assert row.model_id == default.id  # linked by file hash
    assert models.backend_for_execution(pool, settings, row) is backend
    eid = executions.record(pool, origin=Origin("api"), status="ok", output="x",
                            model={"model_name": "elsewhere", "backend": "llama_cpp", "model_sha256": "0" * 64,
                                   "base_url": None})
    with pytest.raises(LookupError, match="not in the model registry"):
        models.backend_for_execution(pool, settings, executions.get_execution(pool, eid))


def test_served_model_name_of_an_execution(pool, settings, backend):
    remote = models.register_model(pool, "remote", backend="openai", base_url="http://127.0.0.1:9/v1",
                                   remote_model="served-name")
    on_server = executions.record(pool, origin=Origin("api", model_id=remote.id), status="error", error="down",
                                  model={"model_name": "remote", "backend": "openai", "model_sha256": None,
                                         "base_url": remote.base_url})
    local = executions.record(pool, origin=Origin("api"), status="ok", output="x", backend=backend)
    assert models.served_model_name(pool, executions.get_execution(pool, on_server)) == "served-name"
    assert models.served_model_name(pool, executions.get_execution(pool, local)) is None


def test_removing_a_model_unloads_its_backend(pool, settings, default_model_path, backend):
    models.ensure_default_model_registered(pool, settings)
    spare = models.register_model(pool, "spare-512", path=default_model_path, n_ctx=512)
    loaded = models.backend_for(pool, settings, "spare-512")
    spec = models.model_spec(spare, settings)
    assert loaded.resident and spec in llm.cached_specs() and models.is_spec_of(spec, spare)
    assert models.backend_for_model(spare, settings) is loaded
    models.delete_model(pool, "spare-512")
    assert loaded.closed and not loaded.resident and spec not in llm.cached_specs()
    with pytest.raises(llm.BackendUnavailable, match="was unloaded"):
        loaded.generate(prompt="Hello", params=GenerationParams(max_tokens=2)).read()
    assert backend.generate(prompt="Hello", params=GenerationParams(max_tokens=2, seed=1)).read()  # others stay


def test_registry_errors_are_of_the_contract_kinds(pool, settings, default_model_path):
    default = models.ensure_default_model_registered(pool, settings)
    models.register_model(pool, "spare", path=default_model_path)
    failures = [
        lambda: models.get_model(pool, "ghost"),
        lambda: models.delete_model(pool, "ghost"),
        lambda: models.register_model(pool, "spare", path=default_model_path),
        lambda: models.delete_model(pool, default.name),
        lambda: models.register_model(pool, "bad name!", path=default_model_path),
        lambda: models.register_model(pool, "x", path="/nowhere/model.gguf"),
    ]
    kinds = []
    for fail in failures:
        with pytest.raises(Exception) as info:
            fail()
        kinds.append(kind_of(info.value))
    assert kinds == [NotFound, NotFound, Conflict, Conflict, InvalidInput, InvalidInput]
