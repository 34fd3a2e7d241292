"""Config files and --config.key=value overrides."""
import pytest

from jharm import cli, config

CONFIG = '''
import ml_collections

def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.name = "x" if arg is None else arg
    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-5
    c.optim.use_ema = False
    c.optim.betas = (0.9, 0.999)
    c.path = None
    return c
'''


@pytest.fixture
def cfg_file(tmp_path):
    path = tmp_path / "exp.py"
    path.write_text(CONFIG)
    return str(path)


def test_overrides_parse_to_field_types(cfg_file):
    c = config.get(cfg_file, ["--config.seed=3", "optim.lr=0.5", "--config.optim.use_ema=true",
                              "--config.optim.betas=(0.8,0.9)", "--config.path=/tmp/m"])
    assert c.seed == 3 and c.optim.lr == 0.5 and c.optim.use_ema is True
    assert c.optim.betas == (0.8, 0.9) and c.path == "/tmp/m"


def test_config_arg(cfg_file):
    assert config.get(cfg_file + ":hello").name == "hello"


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.optim.lrr=1", "unknown config key: 'optim.lrr'"),
        ("--config.nope.x=1", "unknown config key: 'nope'"),
        ("--config.seed=abc", "seed: expected an int, found 'abc'"),
        ("--config.optim.use_ema=maybe", "expected a bool"),
        ("--config.optim=1", "group of fields"),
        ("--config.seed", "not of the form"),
    ],
)
def test_bad_overrides_name_the_key(cfg_file, override, message):
    with pytest.raises(config.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config.get(cfg_file, [override])


def test_missing_file_and_missing_get_config(tmp_path):
    with pytest.raises(config.ConfigError, match="not found"):
        config.get(str(tmp_path / "none.py"))
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    with pytest.raises(config.ConfigError, match="no get_config"):
        config.get(str(bad))


def test_locked_config_rejects_new_keys(cfg_file):
    c = config.get(cfg_file)
    with pytest.raises(AttributeError):
        c.new_field = 1


def test_cli_help_lists_only_built_commands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "usage: jharm" in out
    built = [name[len("_cmd_"):] for name in vars(cli) if name.startswith("_cmd_")]
    for name in built:
        assert name in out


def test_cli_override_split():
    overrides, rest = cli._split_config_overrides(["train", "--config=x.py", "--config.a=1", "--config.b", "2", "--workdir=w"])
    assert overrides == ["--config.a=1", "--config.b=2"]
    assert rest == ["train", "--config=x.py", "--workdir=w"]
