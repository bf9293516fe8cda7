import dataclasses
import json
import math

import pytest

from handprop.config import (
    ACTIVATION_NAMES,
    DTYPE_NAMES,
    INIT_NAMES,
    LOSS_NAMES,
    SEED_LINES,
    SPLIT_NAMES,
    RunConfig,
    config_from_mapping,
    field_specs,
    load_config,
    parse_seed_config,
    parse_toml_config,
    to_toml,
)
from handprop.errors import ConfigError

# the original system's config, exactly as its author wrote it
SEED = """20000 # total samples to load
18000 # training samples
2000 # test samples
100 # hidden layer size
2.5 # learning rate
1000 # epochs
"""

LINES = SEED.splitlines()


def seed_with(line: int, value: str) -> str:
    """SEED with the value on (1-based) ``line`` replaced."""
    lines = list(LINES)
    lines[line - 1] = f"{value} # changed"
    return "\n".join(lines) + "\n"


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


MINIMAL_TOML = """\
total = 20000
train = 18000
test = 2000
hidden = 100
learning_rate = 2.5
epochs = 1000
"""


# --- the seed format -------------------------------------------------------------------------


def test_seed_text_parses_to_its_six_values():
    cfg = parse_seed_config(SEED, "baseline.cfg")
    assert (cfg.total, cfg.train, cfg.test) == (20000, 18000, 2000)
    assert cfg.hidden == (100,)
    assert cfg.learning_rate == 2.5
    assert cfg.epochs == 1000
    # everything else takes its default
    assert cfg.dataset == "mnist" and cfg.split == "original" and cfg.seed == 0
    assert cfg.activation == ("sigmoid",)
    assert cfg.loss == "cross_entropy" and cfg.init == "uniform" and cfg.dtype == "float32"
    assert cfg.eval_every == 10 and cfg.out == "runs"
    assert cfg.name is None and cfg.data_dir is None


def test_seed_types():
    cfg = parse_seed_config(SEED, "baseline.cfg")
    assert type(cfg.total) is int and type(cfg.epochs) is int
    assert type(cfg.learning_rate) is float
    assert all(type(m) is int for m in cfg.hidden)


def test_seed_file_on_disk(tmp_path):
    cfg = load_config(write(tmp_path, "baseline.cfg", SEED))
    assert cfg == parse_seed_config(SEED, "x")


def test_crlf_file_parses(tmp_path):
    path = tmp_path / "win.cfg"
    path.write_bytes(SEED.replace("\n", "\r\n").encode())
    assert load_config(path) == parse_seed_config(SEED, "x")


def test_utf8_bom_is_ignored(tmp_path):
    path = tmp_path / "bom.cfg"
    path.write_bytes(b"\xef\xbb\xbf" + SEED.encode())
    assert load_config(path).total == 20000


def test_values_without_comments_and_with_spaces():
    cfg = parse_seed_config("  20000\n18000\t\n2000\n100\n2.5\n1000", "a.cfg")
    assert (cfg.total, cfg.epochs) == (20000, 1000)


def test_blank_lines_and_comment_lines_are_skipped_but_counted():
    text = "# my run\n\n" + SEED.replace("100 #", "\n   # the size:\nten #")
    # physical line 8 holds the hidden size now: header (2) + 3 values + blank + comment
    with pytest.raises(ConfigError, match=r"^a\.cfg line 8: hidden layer size"):
        parse_seed_config(text, "a.cfg")
    good = "# my run\n\n" + SEED.replace("100 #", "\n   # the size:\n100 #")
    assert parse_seed_config(good, "a.cfg") == parse_seed_config(SEED, "a.cfg")


def test_word_where_a_number_belongs():
    with pytest.raises(
        ConfigError,
        match=r"^baseline\.cfg line 4: hidden layer size must be a positive integer, got 'ten'$",
    ):
        parse_seed_config(seed_with(4, "ten"), "baseline.cfg")


def test_float_where_an_int_belongs():
    with pytest.raises(
        ConfigError, match=r"baseline\.cfg line 4: hidden layer size .* got '100\.5'"
    ):
        parse_seed_config(seed_with(4, "100.5"), "baseline.cfg")


@pytest.mark.parametrize(
    ("line", "value", "label"),
    [
        (1, "0", "total samples to load"),
        (1, "-20000", "total samples to load"),
        (2, "0", "training samples"),
        (3, "-1", "test samples"),
        (4, "0", "hidden layer size"),
        (4, "-100", "hidden layer size"),
        (6, "0", "epochs"),
        (6, "-5", "epochs"),
    ],
)
def test_zero_or_negative_counts(line, value, label):
    with pytest.raises(
        ConfigError,
        match=rf"^b\.cfg line {line}: {label} must be a positive integer, got '{value}'$",
    ):
        parse_seed_config(seed_with(line, value), "b.cfg")


def test_epochs_zero():
    with pytest.raises(ConfigError, match=r"line 6: epochs must be a positive integer, got '0'"):
        parse_seed_config(seed_with(6, "0"), "b.cfg")


def test_train_zero():
    with pytest.raises(ConfigError, match=r"line 2: training samples must be a positive integer"):
        parse_seed_config(seed_with(2, "0"), "b.cfg")


@pytest.mark.parametrize("value", ["0", "-0.1", "nan", "inf", "-inf", "NaN"])
def test_bad_learning_rate(value):
    with pytest.raises(
        ConfigError,
        match=rf"^b\.cfg line 5: learning rate must be a finite number > 0, got '{value}'$",
    ):
        parse_seed_config(seed_with(5, value), "b.cfg")


def test_learning_rate_may_be_written_as_an_int_or_with_an_exponent():
    assert parse_seed_config(seed_with(5, "3"), "b.cfg").learning_rate == 3.0
    assert parse_seed_config(seed_with(5, "1e-3"), "b.cfg").learning_rate == 1e-3


def test_train_plus_test_exceeds_total():
    with pytest.raises(
        ConfigError,
        match=r"^b\.cfg line 3: training samples \+ test samples must not exceed total samples "
        r"to load, got 18000 \+ 3000 = 21000 > 20000$",
    ):
        parse_seed_config(seed_with(3, "3000"), "b.cfg")


def test_train_plus_test_equal_to_total_is_fine():
    assert parse_seed_config(seed_with(3, "2000"), "b.cfg").test == 2000


def test_missing_line_names_it_and_what_it_holds():
    five = "\n".join(LINES[:5]) + "\n"
    with pytest.raises(
        ConfigError,
        match=r"^b\.cfg: line 6 is missing; it should hold the epochs \(a positive integer\); "
        r"the file has only 5 of 6 lines",
    ):
        parse_seed_config(five, "b.cfg")


def test_missing_line_in_the_middle_of_a_short_file():
    with pytest.raises(ConfigError, match=r"line 4 is missing; it should hold the hidden layer"):
        parse_seed_config("\n".join(LINES[:3]), "b.cfg")


def test_extra_lines():
    with pytest.raises(
        ConfigError, match=r"^b\.cfg line 8: unexpected value '7' after the 6 config lines"
    ):
        parse_seed_config(SEED + "\n7 # one more\n", "b.cfg")


def test_extra_comment_lines_are_fine():
    assert parse_seed_config(SEED + "\n# the end\n\n", "b.cfg").epochs == 1000


@pytest.mark.parametrize("text", ["", "\n\n  \n", "# only a note\n# and another\n"])
def test_empty_file(text):
    with pytest.raises(ConfigError, match=r"^e\.cfg: empty config; expected 6 lines \(1: total"):
        parse_seed_config(text, "e.cfg")


def test_two_values_on_one_line():
    with pytest.raises(ConfigError, match=r"line 4: hidden layer size .* got '100 200'"):
        parse_seed_config(seed_with(4, "100 200"), "b.cfg")


def test_seed_lines_order():
    assert SEED_LINES == ("total", "train", "test", "hidden", "learning_rate", "epochs")


# --- files -------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.cfg"
    with pytest.raises(ConfigError, match=r"nope\.cfg: config file not found"):
        load_config(path)


def test_directory_instead_of_a_file(tmp_path):
    (tmp_path / "folder.toml").mkdir()
    with pytest.raises(ConfigError, match=r"folder\.toml: is a folder, expected a config file"):
        load_config(tmp_path / "folder.toml")


def test_non_utf8_bytes(tmp_path):
    path = tmp_path / "latin.cfg"
    path.write_bytes(SEED.replace("epochs", "\xe9poques").encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin\.cfg line 6: not UTF-8 text \(byte 0xe9"):
        load_config(path)


def test_load_config_accepts_str_paths(tmp_path):
    path = write(tmp_path, "run.toml", MINIMAL_TOML)
    assert load_config(str(path)) == load_config(path)


def test_toml_suffix_picks_toml(tmp_path):
    # the same text that is a fine seed config is a TOML syntax error
    with pytest.raises(ConfigError, match="TOML syntax error"):
        load_config(write(tmp_path, "seed.toml", SEED))


# --- TOML --------------------------------------------------------------------------------------


def test_toml_minimal_equals_the_seed_format():
    assert parse_toml_config(MINIMAL_TOML, "r.toml") == parse_seed_config(SEED, "b.cfg")


def test_toml_every_field():
    text = """
# a deeper net on the official split
hidden = [800, 800]
learning_rate = 0.1
epochs = 30
dataset = "fashion-mnist"
data_dir = "/data/fashion"
seed = 7
split = "standard"
activation = ["relu", "tanh"]
loss = "mse"
init = "he_normal"
dtype = "float64"
eval_every = 5
out = "results"
name = "deep"
"""
    cfg = parse_toml_config(text, "deep.toml")
    assert cfg.hidden == (800, 800)
    assert cfg.activation == ("relu", "tanh")
    assert (cfg.total, cfg.train, cfg.test) == (None, None, None)
    assert cfg.split == "standard" and cfg.dtype == "float64" and cfg.name == "deep"
    assert cfg.data_dir == "/data/fashion" and cfg.out == "results" and cfg.seed == 7
    assert cfg.loss == "mse" and cfg.init == "he_normal" and cfg.eval_every == 5


def test_toml_single_activation_applies_to_every_layer():
    text = MINIMAL_TOML.replace("hidden = 100", "hidden = [64, 32, 16]") + 'activation = "relu"\n'
    assert parse_toml_config(text, "r.toml").activation == ("relu", "relu", "relu")


def test_toml_no_hidden_layer():
    cfg = parse_toml_config(MINIMAL_TOML.replace("hidden = 100", "hidden = []"), "r.toml")
    assert cfg.hidden == () and cfg.activation == ()


def test_toml_int_learning_rate_becomes_float():
    cfg = parse_toml_config(MINIMAL_TOML.replace("2.5", "2"), "r.toml")
    assert cfg.learning_rate == 2.0 and type(cfg.learning_rate) is float


def test_toml_standard_split_caps_counts():
    text = "split = 'standard'\ntrain = 1000\nlearning_rate = 0.5\nepochs = 3\n"
    cfg = parse_toml_config(text, "r.toml")
    assert (cfg.total, cfg.train, cfg.test) == (None, 1000, None)


def test_toml_original_split_needs_the_counts():
    text = "total = 100\nlearning_rate = 0.5\nepochs = 3\n"
    with pytest.raises(
        ConfigError, match=r"^r\.toml: split 'original' needs .*; missing train, test"
    ):
        parse_toml_config(text, "r.toml")


def test_toml_missing_required_field():
    text = MINIMAL_TOML.replace("learning_rate = 2.5\n", "")
    with pytest.raises(
        ConfigError, match=r"^r\.toml: missing learning_rate \(learning rate, a finite number"
    ):
        parse_toml_config(text, "r.toml")


def test_toml_unknown_key_names_it_and_suggests():
    text = MINIMAL_TOML + "\nlearning_rat = 0.1\n"
    with pytest.raises(
        ConfigError,
        match=r"^r\.toml line 8: unknown key 'learning_rat'; did you mean 'learning_rate'\?",
    ):
        parse_toml_config(text, "r.toml")


def test_toml_unknown_table():
    with pytest.raises(ConfigError, match=r"r\.toml line 7: unknown key 'model'"):
        parse_toml_config(MINIMAL_TOML + "[model]\nhidden = 3\n", "r.toml")


@pytest.mark.parametrize(
    ("line", "text", "message"),
    [
        (6, 'epochs = "1000"', r"epochs must be a positive integer, got '1000' \(a string\)"),
        (4, "hidden = 100.5", r"hidden must be a positive integer or a list .* \(a float\)"),
        (4, "hidden = true", r"hidden must be .*, got True \(a boolean\)"),
        (5, "learning_rate = [2.5]", r"learning_rate must be .* got \[2\.5\] \(a list\)"),
        (4, 'hidden = ["800", "800"]', r"hidden must be .* \(a list\)"),
        (7, "dataset = 5", r"dataset must be a non-empty string, got 5 \(an integer\)"),
    ],
)
def test_toml_wrong_type(line, text, message):
    key = text.split(" = ")[0]
    lines = [x for x in MINIMAL_TOML.splitlines() if not x.startswith(key + " ")]
    lines.insert(line - 1, text)
    with pytest.raises(ConfigError, match=rf"^r\.toml line {line}: {message}"):
        parse_toml_config("\n".join(lines) + "\n", "r.toml")


@pytest.mark.parametrize("value", ["0", "-0.1", "nan", "inf", "-inf"])
def test_toml_bad_learning_rate(value):
    text = MINIMAL_TOML.replace("2.5", value)
    with pytest.raises(
        ConfigError, match=r"^r\.toml line 5: learning_rate must be a finite number > 0, got"
    ):
        parse_toml_config(text, "r.toml")


def test_toml_negative_hidden_size_in_a_list():
    text = MINIMAL_TOML.replace("hidden = 100", "hidden = [800, -5]")
    with pytest.raises(ConfigError, match=r"line 4: hidden must be .*, got \[800, -5\]$"):
        parse_toml_config(text, "r.toml")


@pytest.mark.parametrize(
    ("key", "value", "names"),
    [
        ("activation", "rellu", ACTIVATION_NAMES),
        ("loss", "crossentropy", LOSS_NAMES),
        ("init", "xavier", INIT_NAMES),
        ("dtype", "float16", DTYPE_NAMES),
        ("split", "random", SPLIT_NAMES),
    ],
)
def test_toml_unknown_name_lists_the_known_ones(key, value, names):
    text = MINIMAL_TOML + f'{key} = "{value}"\n'
    with pytest.raises(ConfigError, match=rf"^r\.toml line 7: {key} must be one of") as info:
        parse_toml_config(text, "r.toml")
    message = str(info.value)
    assert f"got '{value}'" in message
    assert all(name in message for name in names)


def test_unknown_name_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"got 'rellu'; did you mean 'relu'\?"):
        parse_toml_config(MINIMAL_TOML + 'activation = "rellu"\n', "r.toml")


def test_activation_list_length_must_match_hidden():
    text = MINIMAL_TOML.replace("hidden = 100", "hidden = [800, 800]")
    text += 'activation = ["relu"]\n'
    with pytest.raises(
        ConfigError,
        match=r"^r\.toml line 7: activation lists 1 names for 2 hidden layers "
        r"\(hidden = \[800, 800\]\)",
    ):
        parse_toml_config(text, "r.toml")


def test_toml_syntax_error_names_the_line():
    text = MINIMAL_TOML.replace("epochs = 1000", "epochs = ")
    with pytest.raises(ConfigError, match=r"^r\.toml line 6: TOML syntax error: .*\(column"):
        parse_toml_config(text, "r.toml")


def test_toml_duplicate_key_is_a_syntax_error():
    with pytest.raises(ConfigError, match=r"r\.toml line 7: TOML syntax error"):
        parse_toml_config(MINIMAL_TOML + "epochs = 3\n", "r.toml")


def test_toml_train_plus_test_exceeds_total_names_the_test_line():
    text = MINIMAL_TOML.replace("test = 2000", "test = 2001")
    with pytest.raises(
        ConfigError,
        match=r"^r\.toml line 3: train \+ test must not exceed total, got 18000 \+ 2001",
    ):
        parse_toml_config(text, "r.toml")


def test_toml_run_name_may_not_be_a_path():
    with pytest.raises(ConfigError, match=r"line 7: name must be a folder name"):
        parse_toml_config(MINIMAL_TOML + 'name = "../escape"\n', "r.toml")


# --- writing TOML back -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"hidden": (800, 800), "activation": ("relu", "tanh"), "init": "he_uniform"},
        {"hidden": ()},
        {"learning_rate": 0.1 + 0.2, "dtype": "float64", "eval_every": 1},
        {"learning_rate": 1e-5},
        {"learning_rate": 1e22},
        {"split": "standard", "total": None, "train": None, "test": None},
        {"data_dir": 'C:\\data\\"mnist"\t\u00e9\x01', "name": "r\u00e9sum\u00e9 \u2603"},
        {"out": "some dir/with spaces", "seed": 12345, "loss": "mse"},
    ],
)
def test_to_toml_round_trip(tmp_path, changes):
    cfg = parse_seed_config(SEED, "b.cfg").replace(**changes)
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg), encoding="utf-8")
    back = load_config(path)
    assert back == cfg
    assert back.learning_rate == cfg.learning_rate  # bit-exact float


def test_to_toml_writes_every_field():
    cfg = parse_toml_config(
        MINIMAL_TOML
        + 'name = "x"\ndata_dir = "d"\nbatch_size = 32\nvalidation = 0.1\npatience = 3\n'
        + 'layers = ["conv 8 3", "relu", "maxpool 2"]\nsplit_seed = 5\n',
        "r.toml",
    )
    text = to_toml(cfg)
    for f in dataclasses.fields(RunConfig):
        if f.name != "average_from":  # weight averaging goes without a validation split
            assert f"\n{f.name} = " in text
    averaged = to_toml(cfg.replace(validation=0.0, patience=None, average_from=1))
    assert "\naverage_from = 1\n" in averaged


def test_to_toml_comments_out_unset_fields():
    text = to_toml(parse_seed_config(SEED, "b.cfg"))
    assert "# data_dir = (not set)" in text and "# name = (not set)" in text


# --- from a mapping (experiment CSV rows) -------------------------------------------------------


ROW = {"d": "5000", "dtrain": "4000", "dtest": "1000", "m": "100", "alpha": "2.5", "epochs": "300"}


def test_mapping_with_the_original_csv_aliases():
    cfg = config_from_mapping(ROW, "original.csv row 2")
    assert (cfg.total, cfg.train, cfg.test, cfg.hidden) == (5000, 4000, 1000, (100,))
    assert (cfg.learning_rate, cfg.epochs) == (2.5, 300)


@pytest.mark.parametrize(
    ("text", "hidden"),
    [("800-800", (800, 800)), ("800,800", (800, 800)), ("[800, 800]", (800, 800)),
     (" 64 ", (64,)), ("none", ()), ("[]", ())],
)  # fmt: skip
def test_mapping_hidden_text(text, hidden):
    cfg = config_from_mapping({**ROW, "m": text}, "g.csv row 2")
    assert cfg.hidden == hidden


def test_mapping_activation_text():
    row = {**ROW, "m": "800-800", "activation": "relu,tanh"}
    assert config_from_mapping(row, "g.csv").activation == ("relu", "tanh")
    row = {**ROW, "m": "800-800", "activation": "relu"}
    assert config_from_mapping(row, "g.csv").activation == ("relu", "relu")


def test_mapping_empty_cells_take_the_defaults():
    cfg = config_from_mapping({**ROW, "seed": "", "name": " ", "dataset": ""}, "g.csv")
    assert (cfg.seed, cfg.name, cfg.dataset) == (0, None, "mnist")


def test_mapping_error_names_the_key_as_written_and_its_location():
    where = {k: f"grid.csv row 3 column {k}" for k in ROW}
    with pytest.raises(
        ConfigError,
        match=r"^grid\.csv row 3 column alpha: alpha must be a finite number > 0, got '-1'$",
    ):
        config_from_mapping({**ROW, "alpha": "-1"}, "grid.csv row 3", where)


def test_mapping_where_may_be_a_callable():
    def where(key):
        return f"grid.csv row 9 column {key}"

    with pytest.raises(ConfigError, match=r"^grid\.csv row 9 column m: m must be"):
        config_from_mapping({**ROW, "m": "ten"}, "grid.csv row 9", where)
    with pytest.raises(ConfigError, match=r"^grid\.csv row 9 column dtest: dtrain \+ dtest"):
        config_from_mapping({**ROW, "dtest": "1001"}, "grid.csv row 9", where)


def test_mapping_location_falls_back_to_source():
    with pytest.raises(ConfigError, match=r"^g\.csv row 2: epochs must be"):
        config_from_mapping({**ROW, "epochs": "0"}, "g.csv row 2", where={"m": "elsewhere"})


def test_mapping_unknown_key():
    with pytest.raises(ConfigError, match=r"^g\.csv: unknown key 'alpah'; did you mean 'alpha'\?"):
        config_from_mapping({**ROW, "alpah": "1"}, "g.csv")


def test_mapping_key_and_alias_both_given():
    with pytest.raises(ConfigError, match=r"'alpha' and 'learning_rate' both give learning_rate"):
        config_from_mapping({**ROW, "learning_rate": "1"}, "g.csv")


def test_mapping_takes_native_values():
    cfg = config_from_mapping({"total": 10, "train": 6, "test": 4, "hidden": [3, 2],
                               "learning_rate": 1, "epochs": 2}, "dict")  # fmt: skip
    assert cfg.hidden == (3, 2) and cfg.learning_rate == 1.0


def test_mapping_float_text_for_an_int():
    with pytest.raises(ConfigError, match=r"epochs must be a positive integer, got '300\.5'$"):
        config_from_mapping({**ROW, "epochs": "300.5"}, "g.csv")


# --- RunConfig itself ---------------------------------------------------------------------------


def test_config_is_frozen():
    cfg = parse_seed_config(SEED, "b.cfg")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 3  # type: ignore[misc]


def test_replace_revalidates():
    cfg = parse_seed_config(SEED, "b.cfg")
    new = cfg.replace(dataset="digits", data_dir="/tmp/d", seed=3, out="elsewhere")
    assert (new.dataset, new.data_dir, new.seed, new.out) == ("digits", "/tmp/d", 3, "elsewhere")
    assert new.epochs == cfg.epochs and cfg.seed == 0
    with pytest.raises(ConfigError, match=r"^override: seed must be an integer >= 0, got -1$"):
        cfg.replace(seed=-1)
    with pytest.raises(ConfigError, match=r"^override: unknown key 'sed'; did you mean 'seed'"):
        cfg.replace(sed=1)
    with pytest.raises(ConfigError, match="must not exceed"):
        cfg.replace(total=100)


def test_replace_hidden_keeps_a_uniform_activation():
    cfg = parse_seed_config(SEED, "b.cfg").replace(activation="relu")
    assert cfg.replace(hidden=(8, 8, 8)).activation == ("relu",) * 3
    mixed = cfg.replace(hidden=(8, 8), activation=("relu", "tanh"))
    with pytest.raises(ConfigError, match="activation lists 2 names for 3 hidden layers"):
        mixed.replace(hidden=(8, 8, 8))


def test_direct_construction_is_validated():
    cfg = RunConfig(total=10, train=5, test=5, hidden=[4, 4], learning_rate=1, epochs=2)
    assert cfg.hidden == (4, 4) and cfg.activation == ("sigmoid", "sigmoid")
    with pytest.raises(ConfigError, match=r"^RunConfig: epochs must be a positive integer"):
        RunConfig(total=10, train=5, test=5, learning_rate=1.0, epochs=0)


def test_to_dict_is_json_able():
    cfg = parse_seed_config(SEED, "b.cfg")
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["hidden"] == [100] and d["activation"] == ["sigmoid"]
    assert list(d) == [f.name for f in dataclasses.fields(RunConfig)]
    assert RunConfig(**d) == cfg


def test_field_table_is_complete():
    specs = field_specs()
    assert list(specs) == [f.name for f in dataclasses.fields(RunConfig)]
    assert {a for s in specs.values() for a in s.aliases} == {"d", "dtrain", "dtest", "m", "alpha"}
    assert all(s.label and s.kind.expect for s in specs.values())


def test_equal_configs_hash_equal():
    a, b = parse_seed_config(SEED, "a"), parse_toml_config(MINIMAL_TOML, "b")
    assert a == b and hash(a) == hash(b)
    assert not math.isnan(a.learning_rate)


# --- optimization and regularization fields -------------------------------------------------


def test_optimizer_fields_parse_with_their_defaults():
    cfg = parse_toml_config(
        MINIMAL_TOML.replace("hidden = 100", "hidden = [800, 800]")
        + 'optimizer = "adam"\nbatch_size = 128\nschedule = "cosine"\nwarmup = 2\n'
        + "dropout = [0.2, 0.5]\nweight_decay = 1e-4\nvalidation = 0.1\npatience = 5\n",
        "deep.toml",
    )
    assert (cfg.optimizer, cfg.batch_size, cfg.schedule, cfg.warmup) == ("adam", 128, "cosine", 2)
    assert cfg.dropout == (0.2, 0.5) and cfg.weight_decay == 1e-4
    assert (cfg.beta1, cfg.beta2, cfg.eps, cfg.momentum) == (0.9, 0.999, 1e-8, 0.9)
    seed = parse_seed_config(SEED, "b.cfg")
    assert (seed.optimizer, seed.batch_size, seed.dropout) == ("gd", None, (0.0,))
    assert parse_toml_config(to_toml(cfg), "again.toml") == cfg


@pytest.mark.parametrize(
    "extra, message",
    [
        ('optimizer = "adagrad"', "optimizer must be one of gd, sgd"),
        ("batch_size = 0", "batch_size must be a positive integer"),
        ("momentum = 1.0", r"momentum must be a number in \[0, 1\)"),
        ("dropout = [0.5, 0.5]", "lists 2 probabilities for 1 hidden layers"),
        ("dropout = 1", r"must be a number in \[0, 1\)"),
        ("weight_decay = -1e-4", "weight_decay must be a finite number >= 0"),
        ("gamma = 0", r"gamma must be a number in \(0, 1\]"),
        ("patience = 3", "early stopping .* needs a validation split"),
        ('schedule = "cosin"', "did you mean 'cosine'"),
    ],
)
def test_bad_optimizer_fields_are_refused(extra, message):
    with pytest.raises(ConfigError, match=message):
        parse_toml_config(MINIMAL_TOML + extra + "\n", "opt.toml")


def test_csv_cells_for_optimizer_fields():
    cfg = config_from_mapping(
        {**ROW, "m": "800-800", "optimizer": "momentum", "dropout": "0.2,0.3", "batch_size": ""},
        "grid.csv row 2",
    )
    assert cfg.optimizer == "momentum" and cfg.dropout == (0.2, 0.3) and cfg.batch_size is None
    with pytest.raises(ConfigError, match="lists 2 probabilities for 3 hidden layers"):
        cfg.replace(hidden=(10, 10, 10))
    assert cfg.replace(hidden=(10, 10, 10), dropout=0.1).dropout == (0.1, 0.1, 0.1)


# --- hostile input: one line naming the file, the line and the value -----------------------


def test_two_values_on_one_line_short_of_six_names_that_line():
    text = "1797 1500\n297\n32\n2.0\n300\n"
    with pytest.raises(
        ConfigError, match=r"^b\.cfg line 1: expected one value per line, got 2 \('1797 1500'\)"
    ):
        parse_seed_config(text, "b.cfg")


def test_a_number_too_large_is_refused_with_its_line():
    with pytest.raises(ConfigError, match=r"^b\.cfg line 1: total .* got '1e400'"):
        parse_seed_config(seed_with(1, "1e400"), "b.cfg")
    with pytest.raises(ConfigError, match=r"^b\.cfg line 5: learning rate .* got '1e400'"):
        parse_seed_config(seed_with(5, "1e400"), "b.cfg")
    with pytest.raises(
        ConfigError, match=r"r\.toml line 6: epochs .*; at most 9223372036854775807"
    ):
        parse_toml_config(MINIMAL_TOML.replace("1000", "1" + "0" * 30), "r.toml")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('hidden = "abc"', r"line 4: hidden must be .* got 'abc' \(a string\)"),
        ("epochs = 1.5", r"line 6: epochs must be a positive integer, got 1\.5 \(a float\)"),
        ("epochs = true", r"line 6: epochs must be a positive integer, got True \(a boolean\)"),
        ("hidden = -5", r"line 4: hidden must be .* got -5$"),
    ],
)
def test_toml_wrong_types_name_the_line(line, message):
    key = line.split()[0]
    text = "".join(
        (line + "\n") if row.startswith(key + " ") else row + "\n"
        for row in MINIMAL_TOML.splitlines()
    )
    with pytest.raises(ConfigError, match=message):
        parse_toml_config(text, "r.toml")


def test_toml_nested_too_deeply_is_one_line():
    text = MINIMAL_TOML + "a = " + "[" * 100_000 + "]" * 100_000 + "\n"
    with pytest.raises(ConfigError, match=r"^r\.toml: TOML nested too deeply"):
        parse_toml_config(text, "r.toml")


def test_a_huge_config_file_is_refused_unread(tmp_path):
    path = write(tmp_path, "big.toml", MINIMAL_TOML + 'x = "' + "y" * (1 << 20) + '"\n')
    with pytest.raises(ConfigError, match=r"big\.toml: .* bytes is too large for a config file"):
        load_config(path)


def test_a_long_bad_value_is_shortened_in_the_message():
    with pytest.raises(ConfigError) as err:
        parse_toml_config(MINIMAL_TOML + 'loss = "' + "x" * 100_000 + '"\n', "r.toml")
    assert len(str(err.value)) < 300 and "(100,002 characters)" in str(err.value)


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("a\x00b", r"it holds '\\x00'"),
        ("a/b", "it holds '/'"),
        ("a\\b", r"it holds '\\\\'"),
        ("x" * 300, "it is 300 bytes long; at most 200"),
        ("summary.csv", "is a file handprop writes next to the run folders"),
        ("Summary.MD", "is a file handprop writes next to the run folders"),
        ("a|b", r"it holds '\|'"),
        ("a\nb", r"it holds '\\n'"),
        (" x", "starts or ends with a space"),
        ("..", "is not a folder of its own"),
    ],
)
def test_bad_run_names_are_refused_naming_the_field(name, why):
    from handprop.config import run_name_problem

    assert run_name_problem(name)
    with pytest.raises(
        ConfigError, match=r"^g\.csv row 2 column name: name must be a folder"
    ) as err:
        config_from_mapping(
            {"learning_rate": 1.0, "epochs": 1, "split": "standard", "name": name},
            "g.csv row 2",
            lambda key: f"g.csv row 2 column {key}",
            text=False,
        )
    assert len(str(err.value).splitlines()) == 1
    assert err.match(why)


def test_good_run_names_pass():
    from handprop.config import run_name_problem

    for name in ("lr0.1", "r\u00e9sum\u00e9 \u2603", "summary", "a-b_c", "x" * 200):
        assert run_name_problem(name) is None


# --- split_seed: the split's own seed ------------------------------------------------------------


def test_split_seed_defaults_to_the_seed():
    cfg = parse_toml_config(MINIMAL_TOML + "seed = 4\n", "r.toml")
    assert cfg.split_seed is None and cfg.resolved_split_seed == 4
    assert parse_seed_config(SEED, "b.cfg").resolved_split_seed == 0
    # changing the seed of a config without split_seed moves its split too (as before)
    assert cfg.replace(seed=9).resolved_split_seed == 9


def test_split_seed_holds_whatever_the_seed():
    cfg = parse_toml_config(MINIMAL_TOML + "seed = 4\nsplit_seed = 0\n", "r.toml")
    assert (cfg.seed, cfg.split_seed, cfg.resolved_split_seed) == (4, 0, 0)
    assert cfg.replace(seed=9).resolved_split_seed == 0
    assert "\nsplit_seed = 0\n" in to_toml(cfg)
    assert "# split_seed = (not set)" in to_toml(cfg.replace(split_seed=None))


def test_split_seed_is_a_csv_column():
    assert config_from_mapping({**ROW, "seed": "2", "split_seed": "7"}, "g.csv").split_seed == 7
    assert config_from_mapping({**ROW, "seed": "2", "split_seed": ""}, "g.csv").split_seed is None


@pytest.mark.parametrize(
    "value, got", [("-1", "-1"), ("1.5", r"1\.5 \(a float\)"), ('"1"', r"'1' \(a string\)")]
)
def test_bad_split_seed_in_toml_names_its_line(value, got):
    with pytest.raises(
        ConfigError, match=rf"^r\.toml line 7: split_seed must be an integer >= 0, got {got}$"
    ):
        parse_toml_config(MINIMAL_TOML + f"split_seed = {value}\n", "r.toml")


def test_bad_split_seed_in_csv_names_its_column():
    where = {"split_seed": "g.csv row 2 column split_seed"}
    with pytest.raises(
        ConfigError, match=r"^g\.csv row 2 column split_seed: split_seed must be an integer >= 0"
    ):
        config_from_mapping({**ROW, "split_seed": "one"}, "g.csv row 2", where)


#: every field that holds a number other than an integer count
REAL_FIELDS = [
    name
    for name, spec in field_specs().items()
    if any(w in spec.kind.expect for w in ("number", "float")) and "integer" not in spec.kind.expect
]


def test_the_real_fields_are_all_there():
    assert {"learning_rate", "momentum", "weight_decay", "dropout", "validation"} <= set(
        REAL_FIELDS
    )
    assert {"augment_rotate", "augment_scale", "augment_elastic_alpha"} <= set(REAL_FIELDS)


@pytest.mark.parametrize("name", REAL_FIELDS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_no_number_field_takes_nan_or_inf(name, value):
    """NaN fails every comparison, so a bound alone lets it through: every field that
    reads a number refuses NaN and infinities, in TOML, a CSV cell and an override."""
    text = MINIMAL_TOML.replace("learning_rate = 2.5\n", "")  # given again below
    if name != "learning_rate":
        text += "learning_rate = 2.5\n"
    with pytest.raises(ConfigError, match=rf"^r\.toml line \d+: {name} must be .*, got {value}"):
        parse_toml_config(text + f"{name} = {value}\n", "r.toml")
    row = {k: v for k, v in ROW.items() if k != "alpha" or name != "learning_rate"}
    where = {name: f"g.csv row 2 column {name}"}
    with pytest.raises(ConfigError, match=rf"^g\.csv row 2 column {name}: {name} must be"):
        config_from_mapping({**row, name: value}, "g.csv row 2", where)
    base = parse_toml_config(MINIMAL_TOML, "r.toml")
    with pytest.raises(ConfigError, match=rf"^override: {name} must be .*, got {value}"):
        base.replace(**{name: float(value)})


def test_a_change_of_size_is_a_fraction_below_one_and_needs_batches():
    text = MINIMAL_TOML + "batch_size = 10\naugment_scale = "
    cfg = parse_toml_config(text + "0.15\n", "r.toml")
    assert cfg.augment_scale == 0.15 and cfg.augments
    assert not parse_toml_config(MINIMAL_TOML, "r.toml").augments
    with pytest.raises(ConfigError, match=r"augment_scale must be a number in \[0, 1\), got 1"):
        parse_toml_config(text + "1\n", "r.toml")
    per_batch = r"^r\.toml line 7: augmentation is applied per mini-batch; set batch_size"
    with pytest.raises(ConfigError, match=per_batch):
        parse_toml_config(MINIMAL_TOML + "augment_scale = 0.1\n", "r.toml")


def test_a_rotation_of_180_degrees_is_the_most_there_is():
    text = MINIMAL_TOML + "batch_size = 10\naugment_rotate = "
    assert parse_toml_config(text + "180\n", "r.toml").augment_rotate == 180
    with pytest.raises(ConfigError, match=r"augment_rotate must be a number in \[0, 180\], got"):
        parse_toml_config(text + "180.5\n", "r.toml")
