import pytest

from bus.config import Settings, load_settings
from wire.errors import ErrorCode, LamaError


def test_defaults_when_nothing_is_set(tmp_path):
    s = load_settings({}, environ={})
    assert s.nats_url is None and s.prefix == "lama" and s.max_concurrent_topics == 8


def test_flags_beat_environment_beat_file_beat_defaults(tmp_path):
    cfg = tmp_path / "lamabus.toml"
    cfg.write_text('[lamabus]\nprefix = "fromfile"\nnats_url = "nats://file:4222"\ndata_dir = "/file"\nack_wait = 5\n')
    env = {"LAMABUS_NATS_URL": "nats://env:4222", "LAMABUS_PREFIX": "fromenv"}
    s = load_settings({"prefix": "fromflag", "nats_url": None}, environ=env, config_file=cfg)
    assert s.prefix == "fromflag"          # flag
    assert s.nats_url == "nats://env:4222"  # env over file (flag unset)
    assert s.data_dir == "/file"            # file over default
    assert s.ack_wait == 5.0


def test_config_file_from_environment_and_model_dirs_list(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[lamabus]\nmax_queue_per_model = 3\n")
    s = load_settings({}, environ={"LAMABUS_CONFIG": str(cfg), "LAMABUS_MODEL_DIRS": "/a:/b"})
    assert s.max_queue_per_model == 3 and s.model_dirs == ["/a", "/b"]


@pytest.mark.parametrize("content, field", [
    ("[lamabus]\nprefix = 'has space'\n", "$.prefix"),
    ("[lamabus]\nmax_concurrent_topics = 0\n", "$.max_concurrent_topics"),
    ("[lamabus]\nno_such_setting = 1\n", None),
])
def test_bad_configuration_is_a_clear_bad_request(tmp_path, content, field):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(content)
    with pytest.raises(LamaError) as info:
        load_settings({}, environ={}, config_file=cfg)
    assert info.value.code == ErrorCode.BAD_REQUEST
    if field:
        assert info.value.details["field"] == field
    else:
        assert "no_such_setting" in info.value.message


def test_missing_config_file(tmp_path):
    with pytest.raises(LamaError) as info:
        load_settings({}, environ={}, config_file=tmp_path / "nope.toml")
    assert info.value.code == ErrorCode.BAD_REQUEST


def test_paths_derive_from_data_dir():
    s = Settings(data_dir="/d")
    assert str(s.registry_path) == "/d/registry.sqlite3" and str(s.jetstream_dir) == "/d/jetstream"


def test_every_setting_comes_from_the_environment_by_one_rule():
    env = {"LAMABUS_ACK_WAIT": "10", "LAMABUS_BUNDLED_MODEL": "false", "LAMABUS_INTAKE_WINDOW": "7",
           "LAMABUS_ON_NEW_MESSAGE": "interrupt", "LAMABUS_TOPICS_MAX_AGE": "3600"}
    s = load_settings({}, environ=env)
    assert (s.ack_wait, s.bundled_model, s.intake_window, s.on_new_message, s.topics_max_age) == (
        10.0, False, 7, "interrupt", 3600.0)


def test_a_bad_environment_value_is_a_clear_bad_request():
    with pytest.raises(LamaError) as info:
        load_settings({}, environ={"LAMABUS_MAX_CONCURRENT_TOPICS": "many"})
    assert info.value.code == ErrorCode.BAD_REQUEST and info.value.details["field"] == "$.max_concurrent_topics"
