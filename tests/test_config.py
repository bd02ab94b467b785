import pytest

from shards.config import ConfigError, load_config


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_unknown_top_level_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match="datta"):
        load_config(write(tmp_path, "datta: {path: x}\n"))


def test_unknown_nested_key_is_named_with_its_section(tmp_path):
    with pytest.raises(ConfigError, match=r"cache\.shard_sise"):
        load_config(write(tmp_path, "cache: {shard_sise: 3}\n"))


def test_wrong_type_names_the_dotted_key(tmp_path):
    with pytest.raises(ConfigError, match=r"cache\.shard_size.*integer"):
        load_config(write(tmp_path, "cache: {shard_size: many}\n"))
    with pytest.raises(ConfigError, match=r"data\.on_bad_record"):
        load_config(write(tmp_path, "data: {on_bad_record: ignore}\n"))


def test_overrides_parse_yaml_values_into_typed_fields(tmp_path):
    cfg = load_config(write(tmp_path, "cache: {shard_size: 3}\n"),
                      ["cache.shard_size=5", "train.lr=1e-4", "anchors=[sam,pidinet]", "data.limit=2",
                       "cache.codecs.depth/features=fp8", "data.on_bad_record=error"])
    assert cfg.cache.shard_size == 5
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.anchors == ["sam", "pidinet"]
    assert cfg.data.limit == 2
    assert cfg.cache.codecs == {"depth/features": "fp8"}
    assert cfg.data.on_bad_record == "error"


def test_override_errors_name_the_key():
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(None, ["cache.shard_size"])
    with pytest.raises(ConfigError, match=r"cache\.shard_size"):
        load_config(None, ["cache.shard_size=[1,2]"])
    with pytest.raises(ConfigError, match=r"cache\.nope"):
        load_config(None, ["cache.nope=1"])
    with pytest.raises(ConfigError, match="unknown anchor 'segment'"):
        load_config(None, ["anchors=[sam,segment]"])


def test_bundled_tiny_config_loads(repo_root):
    cfg = load_config(repo_root / "configs" / "tiny.yaml")
    assert cfg.data.path.endswith("conversations.json")
    assert set(cfg.anchors) <= {"sam", "depth", "dino", "pidinet", "siglip", "metaclip"}
