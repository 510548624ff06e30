"""Settings: defaults < workspace config file < environment < explicit arguments."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import SecretStr

from tests.reliability_report import case
from loop.config import CONFIG_FILE, Settings, load_settings
from loop.errors import ConfigError

SECRET = "sk-test-DO-NOT-LEAK-4f9a2c"


def write_config(ws: Path, text: str | bytes) -> Path:
    ws.mkdir(parents=True, exist_ok=True)
    cfg = ws / CONFIG_FILE
    cfg.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return cfg


def test_defaults(tmp_path):
    s = load_settings(tmp_path / "ws")
    assert s.workspace == tmp_path / "ws"
    assert (s.base_model, s.chroma_url, s.device) == ("", "", "auto")
    assert (s.max_file_mb, s.chunk_tokens, s.chunk_overlap, s.encode_batch_size) == (200.0, 0, 32, 64)
    assert (s.llm_base_url, s.llm_model, s.llm_api_key, s.llm_configured) == ("", "gpt-4o-mini", None, False)
    assert s.db_path == tmp_path / "ws" / "embedloop.duckdb"
    assert s.chroma_path == tmp_path / "ws" / "chroma"
    assert s.base_model_path.is_dir()  # the bundled MiniLM
    assert not (tmp_path / "ws").exists()  # loading settings creates nothing


def test_workspace_from_environment_or_default(tmp_path, monkeypatch):
    assert load_settings().workspace == Path("workspace")  # relative to the cwd (tmp_path here)
    monkeypatch.setenv("EMBEDLOOP_WORKSPACE", str(tmp_path / "envws"))
    assert load_settings().workspace == tmp_path / "envws"
    assert load_settings(tmp_path / "explicit").workspace == tmp_path / "explicit"


def test_config_file_values(tmp_path):
    ws = tmp_path / "ws"
    write_config(ws, """
base_model = "/models/mine"
chroma_url = "http://127.0.0.1:8000/"
max_file_mb = 5
chunk_tokens = 128
chunk_overlap = 16
device = "cpu"
llm_base_url = "http://127.0.0.1:8080/v1"
llm_model = "local-llm"
""")
    s = load_settings(ws)
    assert s.base_model == "/models/mine" and s.base_model_path == Path("/models/mine")
    assert s.chroma_url == "http://127.0.0.1:8000"  # trailing slash dropped
    assert (s.max_file_mb, s.chunk_tokens, s.chunk_overlap, s.device) == (5.0, 128, 16, "cpu")
    assert (s.llm_base_url, s.llm_model, s.llm_configured) == ("http://127.0.0.1:8080/v1", "local-llm", True)


def test_the_template_written_by_a_new_workspace_loads_as_defaults(tmp_path):
    from loop.workspace import _CONFIG_TEMPLATE

    ws = tmp_path / "ws"
    write_config(ws, _CONFIG_TEMPLATE)
    assert load_settings(ws).model_dump() == load_settings(tmp_path / "other").model_dump() | {"workspace": ws}


def test_environment_overrides_the_file_and_arguments_override_both(tmp_path, monkeypatch):
    ws = tmp_path / "ws"
    write_config(ws, 'chunk_overlap = 10\nchunk_tokens = 100\nllm_base_url = "http://file/v1"\n')
    monkeypatch.setenv("EMBEDLOOP_CHUNK_OVERLAP", "5")
    monkeypatch.setenv("EMBEDLOOP_DEVICE", "cpu")  # not in the file
    monkeypatch.setenv("EMBEDLOOP_LLM_BASE_URL", "http://env/v1")
    s = load_settings(ws)
    assert (s.chunk_overlap, s.chunk_tokens, s.device, s.llm_base_url) == (5, 100, "cpu", "http://env/v1")
    s = load_settings(ws, chunk_overlap=7, chunk_tokens=None, max_file_mb=1)
    assert (s.chunk_overlap, s.chunk_tokens, s.max_file_mb) == (7, 100, 1.0)


def test_unknown_key_is_an_error_naming_it(tmp_path):
    cfg = write_config(tmp_path / "ws", "chunk_size = 256\n")
    with pytest.raises(ConfigError) as ei:
        load_settings(tmp_path / "ws")
    assert "chunk_size" in str(ei.value) and "not permitted" in str(ei.value)
    assert str(cfg) in str(ei.value)


def test_unknown_table_is_an_error_naming_it(tmp_path):
    write_config(tmp_path / "ws", "[llm]\nmodel = 'x'\n")
    with pytest.raises(ConfigError, match="llm"):
        load_settings(tmp_path / "ws")


@pytest.mark.parametrize("line, key", [
    pytest.param('chunk_tokens = "many"', "chunk_tokens", id="str-for-int"),
    pytest.param("max_file_mb = 0", "max_file_mb", id="not-positive"),
    pytest.param("chunk_overlap = -1", "chunk_overlap", id="negative"),
    pytest.param('device = "tpu"', "device", id="bad-device"),
    pytest.param('chroma_url = "localhost:8000"', "chroma_url", id="url-without-scheme"),
    pytest.param("llm_model = 3", "llm_model", id="int-for-str"),
    pytest.param("encode_batch_size = [64]", "encode_batch_size", id="list-for-int"),
])
def test_wrong_type_or_value_is_a_config_error(tmp_path, line, key):
    write_config(tmp_path / "ws", line + "\n")
    with pytest.raises(ConfigError) as ei:
        load_settings(tmp_path / "ws")
    assert key in str(ei.value)


def test_wrong_type_in_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDLOOP_CHUNK_TOKENS", "lots")
    with pytest.raises(ConfigError, match="chunk_tokens"):
        load_settings(tmp_path / "ws")


@pytest.mark.parametrize("content", [
    pytest.param("chunk_tokens = \n", id="missing-value"),
    pytest.param("[unclosed\n", id="unclosed-table"),
    pytest.param('device = "cpu"\ndevice = "cuda"\n', id="duplicate-key"),
    pytest.param(b"device = \"\xff\xfe\"\n", id="not-utf8"),
])
def test_invalid_toml_is_a_config_error(tmp_path, content):
    cfg = write_config(tmp_path / "ws", content)
    with pytest.raises(ConfigError) as ei:
        load_settings(tmp_path / "ws")
    assert str(cfg) in str(ei.value) and "not valid TOML" in str(ei.value)


def test_workspace_cannot_be_set_in_its_own_config(tmp_path):
    write_config(tmp_path / "ws", 'workspace = "/elsewhere"\n')
    with pytest.raises(ConfigError, match="workspace"):
        load_settings(tmp_path / "ws")


def _assert_hidden(s: Settings) -> None:
    assert isinstance(s.llm_api_key, SecretStr)
    assert s.llm_api_key.get_secret_value() == SECRET
    assert s.llm_configured
    dumped = s.model_dump()
    assert "llm_api_key" not in dumped and SECRET not in str(dumped)
    assert SECRET not in s.model_dump_json()
    assert SECRET not in json.dumps(s.model_dump(mode="json"))
    assert SECRET not in repr(s) and SECRET not in str(s) and SECRET not in f"{s!r} {s}"
    assert SECRET not in repr(s.llm_api_key) and SECRET not in str(s.llm_api_key)


def test_openai_api_key_is_a_secret_never_dumped(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    _assert_hidden(load_settings(tmp_path / "ws"))


def test_embedloop_llm_api_key_alias_is_a_secret_too(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDLOOP_LLM_API_KEY", SECRET)
    _assert_hidden(load_settings(tmp_path / "ws"))


def test_config_errors_do_not_echo_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    write_config(tmp_path / "ws", 'chunk_tokens = "many"\n')
    with pytest.raises(ConfigError) as ei:
        load_settings(tmp_path / "ws")
    assert SECRET not in str(ei.value) and SECRET not in repr(ei.value.__cause__)


def test_a_misspelt_environment_variable_is_warned_about_with_the_closest_setting(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("EMBEDLOOP_CHUNK_TOKEN", "128")        # chunk_tokens, without the s
    monkeypatch.setenv("EMBEDLOOP_LLM_BASEURL", "http://x/v1")  # llm_base_url
    monkeypatch.setenv("EMBEDLOOP_CHUNK_OVERLAP", "8")        # right: no warning
    monkeypatch.setenv("EMBEDLOOP_ONNX_CACHE", str(tmp_path))  # not a setting, but read elsewhere: no warning
    with caplog.at_level("WARNING", logger="embedloop"):
        s = load_settings(tmp_path / "ws")
    assert (s.chunk_tokens, s.chunk_overlap) == (0, 8)  # the misspelt one is still ignored, not guessed
    warned = [r.getMessage() for r in caplog.records if r.name.startswith("embedloop")]
    assert len(warned) == 2, warned
    assert "EMBEDLOOP_CHUNK_TOKEN " in warned[0] and "EMBEDLOOP_CHUNK_TOKENS" in warned[0]
    assert "EMBEDLOOP_LLM_BASEURL" in warned[1] and "EMBEDLOOP_LLM_BASE_URL" in warned[1]


def test_the_cli_shows_the_misspelt_variable_on_stderr(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "EMBEDLOOP_DEVCE": "cpu"}
    r = subprocess.run([sys.executable, "-m", "loop.cli", "--workspace", str(tmp_path / "ws"), "status", "--json"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "EMBEDLOOP_DEVCE" in r.stderr and "EMBEDLOOP_DEVICE" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("name", ["llm_api_key", "OPENAI_API_KEY", "EMBEDLOOP_LLM_API_KEY"])
def test_an_api_key_in_the_config_file_is_refused_with_where_keys_go(tmp_path, name):
    cfg = write_config(tmp_path / "ws", f'{name} = "{SECRET}"\n')
    with pytest.raises(ConfigError) as ei:
        load_settings(tmp_path / "ws")
    msg = str(ei.value)
    assert str(cfg) in msg and name in msg
    assert "OPENAI_API_KEY" in msg and "EMBEDLOOP_LLM_API_KEY" in msg and "Streamlit secrets" in msg
    assert SECRET not in msg and SECRET not in repr(ei.value.__cause__)


def test_the_key_is_read_from_the_two_documented_variables_only(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_API_KEY", SECRET)  # were read as well (field-name aliases, case-insensitive)
    monkeypatch.setenv("LLM_BASE_URL", "http://bare/v1")
    s = load_settings(tmp_path / "ws")
    assert (s.llm_api_key, s.llm_base_url) == (None, "")
    monkeypatch.setenv("EMBEDLOOP_LLM_API_KEY", SECRET)
    assert load_settings(tmp_path / "ws").llm_api_key.get_secret_value() == SECRET
    write_config(tmp_path / "ws", 'llm_base_url = "http://file/v1"\n')  # the file still uses field names
    assert load_settings(tmp_path / "ws").llm_base_url == "http://file/v1"


def test_save_settings_keeps_the_rest_of_the_file_and_never_writes_a_key(tmp_path):
    import tomllib

    from loop.config import save_settings

    cfg = write_config(tmp_path / "ws", '# top\ndevice = "cpu"   # why\n[loop]\ndomain = "law"\n')
    save_settings(tmp_path / "ws", {"device": "auto", "llm_model": 'say "hi"\n', "llm_concurrency": 3})
    text = cfg.read_text(encoding="utf-8")
    assert text.startswith("# top\n") and text.index("llm_model") < text.index("[loop]")
    assert tomllib.loads(text) == {"device": "auto", "llm_model": 'say "hi"\n', "llm_concurrency": 3,
                                   "loop": {"domain": "law"}}
    for bad, match in [({"llm_api_key": SECRET}, "never written"), ({"chunk_size": 1}, "chunk_size"),
                       ({"llm_concurrency": 0}, "llm_concurrency"), ({"loop": {}}, "loop")]:
        with pytest.raises(ConfigError, match=match) as ei:
            save_settings(tmp_path / "ws", bad)
        assert SECRET not in str(ei.value)
    assert cfg.read_text(encoding="utf-8") == text  # a refused save changes nothing


@pytest.mark.parametrize("table, problem", [
    ("[loop.train]\nepochz = 3\n", "loop.train.epochz: Extra inputs are not permitted"),
    ("[loop.train]\nepochs = 0\n", "loop.train.epochs: Input should be greater than or equal to 1"),
    ('[loop.train]\nbatch_size = "big"\n', "loop.train.batch_size: Input should be a valid integer"),
    ('[loop.train]\nloss = "triplet"\n', "loop.train.loss: Input should be 'mnrl', 'cached_mnrl' or 'gist'"),
    ("[loop.train]\nmatryoshka_dims = [0]\n", "loop.train.matryoshka_dims: Value error, matryoshka_dims must be"),
    ("[loop.train]\nwise_grid = [0.5, 1.5]\n", "loop.train.wise_grid: Value error, every WiSE-FT weight must lie in 0..1"),
    ("[loop.train]\nevals_per_epoch = 0\n", "loop.train.evals_per_epoch: Input should be greater than or equal to 1"),
], ids=["unknown key", "out of range", "wrong type", "not a choice", "refused by a validator", "wise grid",
        "evals per epoch"])
def test_bad_loop_train_settings_fail_when_the_round_settings_load(tmp_path, table, problem):
    from loop.rounds import Rounds, loop_config
    from loop.workspace import Workspace

    write_config(tmp_path / "ws", table)
    with pytest.raises(ConfigError) as info:
        loop_config(load_settings(tmp_path / "ws").loop)
    assert problem in str(info.value)
    with Workspace.open(tmp_path / "ws") as ws, pytest.raises(ConfigError, match=r"loop\.train\."):
        Rounds(ws)  # what `embedloop round` and the app's round pages start with
    assert loop_config({"train": {"epochs": 1, "matryoshka_dims": [64, 384]}}).train.model_dump(
        exclude_unset=True) == {"epochs": 1, "matryoshka_dims": [384, 64]}


@pytest.mark.parametrize("table, problem", [
    ("[loop]\neval_min = 0\n", "loop.eval_min: Input should be greater than or equal to 1"),
    ("[loop]\neval_max = 0\n", "loop.eval_max: Input should be greater than or equal to 1"),
    ("[loop]\ndev_share = 1.0\n", "loop.dev_share: Input should be less than 1"),
    ("[loop]\npromote_confidence = 1.2\n", "loop.promote_confidence: Input should be less than 1"),
    ("[loop]\npromote_sign_flip = 0\n", "loop.promote_sign_flip: Input should be greater than 0"),
    ("[loop]\neval_min = 50\neval_max = 20\n", "eval_min (50) is larger than eval_max (20)"),
])
@case("What a user hits", "a [loop] held-out or gate setting out of range (e.g. eval_min 0, eval_min above eval_max)",
      "ConfigError naming the key when the round settings load, before any work starts")
def test_bad_held_out_and_gate_settings_fail_when_the_round_settings_load(tmp_path, table, problem):
    from loop.rounds import loop_config

    write_config(tmp_path / "ws", table)
    with pytest.raises(ConfigError) as info:
        loop_config(load_settings(tmp_path / "ws").loop)
    assert problem in str(info.value)


def test_loop_train_settings_reach_the_manifest_as_written(tmp_path):
    from loop.rounds import loop_config

    write_config(tmp_path / "ws", "[loop]\nreview_budget = 5\n[loop.train]\nepochs = 2\n")
    cfg = loop_config(load_settings(tmp_path / "ws").loop)
    assert cfg.model_dump(mode="json")["train"] == {"epochs": 2}  # only what was set, not every default
