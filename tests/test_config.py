"""RunConfig: one validation path, one message format ("field = value: allowed ..."), presets."""

from __future__ import annotations

import json
import math

import pytest

from bn_core.config import (
    FIELDS,
    LIVE_FIELDS,
    NORMS,
    ConfigError,
    FieldSpec,
    RunConfig,
    VariantSpec,
    list_presets,
    load_preset,
)
from bn_core.data import DATASETS

# Fields whose valid boundary values need a matching setting elsewhere (probe_unit 511
# needs width 512, batch_size 1 needs a run without BatchNorm).
BASE = {"width": 512, "variants": ["plain"]}


def bad_values(name: str, spec: FieldSpec) -> list:
    """Values the field must refuse: out of range, wrong type, bool, NaN, inf, None."""
    out: list = [object(), [1], {"a": 1}]
    if not spec.nullable:
        out.append(None)
    if spec.kind is bool:
        return [*out, 1, 0, "true", 1.0]
    if spec.kind is str:
        return [*out, "no-such-choice", 1, True, spec.choices[0].upper() + "X"]
    out += ["1", "abc", True, False, math.nan, math.inf, -math.inf]
    if spec.low is not None:
        out.append(spec.low if spec.low_open else spec.low - 1)
        out.append(spec.kind(spec.low - 10**6))
    if spec.high is not None:
        out.append(spec.high + 1)
        out.append(spec.kind(spec.high * 10 + 10**6))
    if spec.kind is int:
        out.append((spec.low or 0) + 1.5)  # not an integer
    return out


BAD_CASES = [(name, value) for name, spec in FIELDS.items() for value in bad_values(name, spec)]


def expect_error(data: dict, field: str, value_text: str | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        RunConfig.from_dict(data)
    err = info.value
    msg = str(err)
    assert err.field == field, msg
    assert msg.startswith(f"{field} = "), msg
    assert "allowed" in msg, msg
    if value_text is not None:
        assert value_text in msg, msg
    assert "\n" not in msg
    return err


def case_id(name: str, value) -> str:
    shown = "object" if type(value) is object else repr(value)  # no memory addresses
    return f"{name}-{shown}"


@pytest.mark.parametrize(("name", "value"), BAD_CASES, ids=[case_id(n, v) for n, v in BAD_CASES])
def test_every_field_refuses_bad_values(name, value):
    err = expect_error({**BASE, name: value}, name)
    shown = repr(value)
    assert (shown if len(shown) <= 80 else shown[:77]) in str(err)
    assert err.allowed.startswith("allowed")
    # The same check through the constructor and replace().
    with pytest.raises(ConfigError):
        RunConfig(**{**BASE, name: value})
    with pytest.raises(ConfigError, match="allowed"):
        RunConfig.from_dict(BASE).replace(**{name: value})


# Fields bounded by a partner (low <= high): the partner is set to its own widest value.
PARTNERS = {
    "landscape_low": {"landscape_high": FIELDS["landscape_high"].high},
    "bn_noise_scale_low": {"bn_noise_scale_high": FIELDS["bn_noise_scale_high"].high},
    "bn_noise_scale_high": {"bn_noise_scale_low": FIELDS["bn_noise_scale_low"].low},
}


@pytest.mark.parametrize("name", list(FIELDS))
def test_every_field_accepts_its_bounds_and_choices(name):
    spec = FIELDS[name]
    if spec.kind is bool:
        good = [True, False]
    elif spec.kind is str:
        good = list(spec.choices)
    else:
        good = [spec.high, (spec.low + spec.high) / 2 if spec.kind is float else spec.high - 1]
        if not spec.low_open:
            good.append(spec.low)
        if spec.nullable:
            good.append(None)
    for value in good:
        # LeNet refuses probe_unit >= 6 and needs no width: test it on the defaults.
        data = (
            {"model": "lenet"}
            if value == "lenet"
            else {**BASE, **PARTNERS.get(name, {}), name: value}
        )
        cfg = RunConfig.from_dict(data)
        got = getattr(cfg, name)
        assert got == value
        if spec.kind is int and value is not None:
            assert type(got) is int
        if spec.kind is float and value is not None:
            assert type(got) is float


def test_int_field_takes_integral_float_as_int():
    cfg = RunConfig(width=32.0, steps=1e3)
    assert cfg.width == 32 and type(cfg.width) is int
    assert cfg.steps == 1000 and type(cfg.steps) is int


def test_float_field_takes_int():
    cfg = RunConfig(lr=1, noise=0)
    assert cfg.lr == 1.0 and type(cfg.lr) is float


def test_huge_int_for_float_field_is_a_config_error():
    # JSON integers have no size limit: 10**400 must be "out of range", not OverflowError.
    expect_error({"lr": 10**400}, "lr")


def test_unknown_key_names_it_and_lists_every_allowed_field():
    err = expect_error({"width": 16, "widht": 32}, "widht", "32")
    msg = str(err)
    assert "unknown" in msg
    for name in [*FIELDS, "variants"]:
        assert name in msg.split("allowed", 1)[1], f"{name} missing from {msg}"


def test_non_mapping_config_is_refused():
    for raw in ([1, 2], "width", 3, None):
        expect_error(raw, "config")


# --- combinations --------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["batchnorm", "batchnorm-naive", "batchnorm-torch"])
def test_bn_variant_needs_batch_of_two(norm):
    expect_error({"batch_size": 1, "variants": ["plain", norm]}, "batch_size", "1")
    assert RunConfig(batch_size=2, variants=["plain", norm]).batch_size == 2
    assert RunConfig(batch_size=1, variants=["plain"]).batch_size == 1


def test_probe_unit_must_be_below_width():
    err = expect_error({"width": 16, "probe_unit": 16}, "probe_unit", "16")
    assert "15" in str(err)
    assert RunConfig(width=16, probe_unit=15).probe_unit == 15


def test_lenet_probe_unit_is_a_first_layer_channel():
    expect_error({"model": "lenet", "probe_unit": 6}, "probe_unit", "6")
    assert RunConfig(model="lenet", probe_unit=5).probe_unit == 5


@pytest.mark.parametrize("dataset", ["moons", "circles", "spirals", "blobs"])
def test_lenet_refuses_toy_2d_data(dataset):
    expect_error({"model": "lenet", "dataset": dataset}, "dataset", repr(dataset))
    assert RunConfig(model="mlp", dataset=dataset).dataset == dataset


@pytest.mark.parametrize("dataset", ["digits", "mnist", "fashion-mnist"])
def test_lenet_takes_image_data(dataset):
    assert RunConfig(model="lenet", dataset=dataset).model == "lenet"


# --- variants ------------------------------------------------------------------------


def test_variant_shorthands():
    cfg = RunConfig(variants=["plain", "batchnorm", "batchnorm-naive", "batchnorm-torch"])
    assert [(v.name, v.norm, v.lr) for v in cfg.variants] == [
        ("plain", "none", None),
        ("batchnorm", "batchnorm", None),
        ("batchnorm-naive", "batchnorm-naive", None),
        ("batchnorm-torch", "batchnorm-torch", None),
    ]
    assert [v.uses_bn for v in cfg.variants] == [False, True, True, True]


def test_variant_objects_and_lr_override():
    cfg = RunConfig.from_dict(
        {
            "lr": 0.5,
            "variants": [
                {"name": "bn-x5", "norm": "batchnorm", "lr": 2.5},
                {"name": "plain"},
                {"name": "base", "norm": "none", "lr": None},
            ],
        }
    )
    assert cfg.variants == (
        VariantSpec("bn-x5", "batchnorm", 2.5),
        VariantSpec("plain", "none", None),
        VariantSpec("base", "none", None),
    )
    assert isinstance(cfg.variants[0].lr, float)


def test_variants_tuple_of_specs_accepted():
    specs = (VariantSpec("a", "none"), VariantSpec("b", "batchnorm", 0.1))
    assert RunConfig(variants=specs).variants == specs


@pytest.mark.parametrize("count", [0, 9])
def test_variant_count_limits(count):
    names = [f"v{i}" for i in range(count)]
    expect_error({"variants": [{"name": n, "norm": "none"} for n in names]}, "variants")


def test_eight_variants_allowed():
    variants = [{"name": f"v{i}", "norm": list(NORMS)[i % 4]} for i in range(8)]
    assert len(RunConfig(variants=variants).variants) == 8


def test_duplicate_variant_names():
    err = expect_error({"variants": ["plain", "batchnorm", "plain"]}, "variants")
    assert "plain" in str(err)
    expect_error(
        {"variants": [{"name": "a", "norm": "none"}, {"name": "a", "norm": "batchnorm"}]},
        "variants",
    )


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ("plain", "variants"),  # a string, not a list
        ({"name": "plain"}, "variants"),
        (["nope"], "variants[0]"),
        ([1], "variants[0]"),
        (["plain", None], "variants[1]"),
        ([{"name": "x"}], "variants[0].norm"),
        ([{"name": "x", "norm": "weightnorm"}], "variants[0].norm"),
        ([{"name": "Upper", "norm": "none"}], "variants[0].name"),
        ([{"name": "", "norm": "none"}], "variants[0].name"),
        ([{"name": "a" * 33, "norm": "none"}], "variants[0].name"),
        ([{"name": 3, "norm": "none"}], "variants[0].name"),
        ([{"norm": "none"}], "variants[0].name"),
        ([{"name": "x", "norm": "none", "lr": 11.0}], "variants[0].lr"),
        ([{"name": "x", "norm": "none", "lr": math.nan}], "variants[0].lr"),
        ([{"name": "x", "norm": "none", "lr": True}], "variants[0].lr"),
        ([{"name": "x", "norm": "none", "lr": "0.1"}], "variants[0].lr"),
        ([{"name": "x", "norm": "none", "momentum": 0.9}], "variants[0].momentum"),
    ],
)
def test_bad_variants(raw, field):
    expect_error({"variants": raw}, field)


# --- conversions ---------------------------------------------------------------------


def sample_config() -> RunConfig:
    return RunConfig(
        dataset="moons",
        noise=0.25,
        seed=7,
        depth=2,
        width=24,
        activation="tanh",
        init="xavier",
        init_std=0.3,
        placement="after",
        keep_bias=True,
        variants=["plain", {"name": "bn-fast", "norm": "batchnorm-torch", "lr": 2.0}],
        batch_size=32,
        steps=123,
        optimizer="adam",
        lr=0.01,
        momentum=0.5,
        bn_momentum=None,
        device="cpu",
        telemetry_every=3,
        eval_every=7,
        probe_size=50,
        probe_unit=5,
        hist_bins=20,
        hist_range=4.5,
        saturation_threshold=0.9,
        max_points=50,
        max_histograms=20,
    )


def test_dict_round_trip():
    cfg = sample_config()
    data = cfg.to_dict()
    assert set(data) == set(FIELDS) | {"variants"}
    assert data["variants"] == [
        {"name": "plain", "norm": "none"},
        {"name": "bn-fast", "norm": "batchnorm-torch", "lr": 2.0},
    ]
    assert RunConfig.from_dict(data) == cfg
    assert RunConfig.from_dict(RunConfig().to_dict()) == RunConfig()


def test_json_round_trip():
    cfg = sample_config()
    text = cfg.to_json()
    assert json.loads(text)["bn_momentum"] is None
    back = RunConfig.from_json(text)
    assert back == cfg
    assert back.to_json() == text
    assert RunConfig.from_json(text.encode()) == cfg


def test_missing_keys_take_defaults():
    assert RunConfig.from_dict({}) == RunConfig()
    assert RunConfig.from_json('{"width": 16}') == RunConfig(width=16)


@pytest.mark.parametrize("text", ["{nope", "", "[1,", "\xff"])
def test_bad_json_is_a_config_error(text):
    with pytest.raises(ConfigError) as info:
        RunConfig.from_json(text)
    assert "\n" not in str(info.value)


def test_bad_json_message_follows_the_format():
    with pytest.raises(ConfigError) as info:
        RunConfig.from_json("{nope")
    assert str(info.value).startswith("config = ")
    assert "allowed" in str(info.value)


def test_json_with_bad_value():
    with pytest.raises(ConfigError, match=r"^depth = 0: allowed"):
        RunConfig.from_json('{"depth": 0}')
    with pytest.raises(ConfigError, match=r"^lr = inf: allowed"):
        RunConfig.from_json('{"lr": 1e400}')
    with pytest.raises(ConfigError, match=r"^lr = nan: allowed"):
        RunConfig.from_json('{"lr": NaN}')


def test_replace():
    cfg = RunConfig(width=32)
    new = cfg.replace(lr=0.1, depth=2, variants=["batchnorm"])
    assert (new.lr, new.depth, new.width) == (0.1, 2, 32)
    assert new.variants == (VariantSpec("batchnorm", "batchnorm"),)
    assert cfg.lr == 0.5 and cfg.depth == 3  # frozen original untouched
    assert new == RunConfig(width=32, lr=0.1, depth=2, variants=["batchnorm"])
    expect_error(cfg.to_dict() | {"nope": 1}, "nope")
    with pytest.raises(ConfigError, match="^nope = 1: unknown field"):
        cfg.replace(nope=1)
    with pytest.raises(ConfigError, match="^probe_unit = 31: "):
        RunConfig(width=64, probe_unit=31).replace(width=16)


def test_frozen():
    cfg = RunConfig()
    with pytest.raises(AttributeError):
        cfg.lr = 1.0  # type: ignore[misc]


def test_setup_differs_lists_non_live_fields_only():
    cfg = RunConfig(width=32)
    assert cfg.setup_differs(cfg) == []
    assert cfg.setup_differs(cfg.replace(lr=0.1, momentum=0.9, bn_momentum=None)) == []
    other = cfg.replace(lr=0.1, width=16, seed=3, variants=["plain"], momentum=0.5)
    assert sorted(cfg.setup_differs(other)) == ["seed", "variants", "width"]
    assert set(LIVE_FIELDS) == {"lr", "momentum", "bn_momentum"}
    for name, spec in FIELDS.items():
        if name in LIVE_FIELDS or spec.kind is not str:
            continue
        changed = cfg.replace(**{name: spec.choices[-1]})
        if getattr(changed, name) != getattr(cfg, name):
            assert cfg.setup_differs(changed) == [name]


def test_config_error_attributes():
    err = ConfigError("lr", 11.0, "allowed: a number in [1e-05, 10]")
    assert (err.field, err.value, err.allowed) == ("lr", 11.0, "allowed: a number in [1e-05, 10]")
    assert str(err) == "lr = 11.0: allowed: a number in [1e-05, 10]"
    assert isinstance(err, ValueError)
    long = ConfigError("x", "a" * 200, "allowed: short")
    assert len(str(long)) < 120 and str(long).endswith("...: allowed: short")


def test_field_spec_allowed_texts():
    assert FIELDS["lr"].allowed() == "allowed: a number in [1e-05, 10]"
    assert FIELDS["init_std"].allowed() == "allowed: a number in (0, 10]"
    assert FIELDS["bn_momentum"].allowed() == "allowed: a number in [0.001, 1] or null"
    assert FIELDS["width"].allowed() == "allowed: an integer in [4, 512]"
    assert FIELDS["keep_bias"].allowed() == "allowed: true or false"
    assert FIELDS["model"].allowed() == "allowed: mlp, lenet"


# --- presets -------------------------------------------------------------------------

PRESETS = [
    "bias-blowup",
    "deep-sigmoid",
    "high-lr-sigmoid",
    "ioffe-fig1",
    "lenet-conv",
    "placement",
]


def test_list_presets():
    presets = list_presets()
    assert list(presets) == sorted(presets)
    assert set(PRESETS) <= set(presets)
    for meta in presets.values():
        assert meta["title"] and meta["description"]


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads(name):
    cfg = load_preset(name)
    assert isinstance(cfg, RunConfig)
    assert RunConfig.from_json(cfg.to_json()) == cfg


def test_all_preset_files_load():
    for name in list_presets():
        load_preset(name)


def test_ioffe_preset_is_the_paper_setup():
    cfg = load_preset("ioffe-fig1")
    assert (cfg.depth, cfg.width, cfg.activation, cfg.batch_size, cfg.steps) == (
        3,
        100,
        "sigmoid",
        60,
        50_000,
    )
    assert (cfg.init, cfg.init_std, cfg.placement, cfg.keep_bias) == (
        "gaussian",
        0.1,
        "before",
        False,
    )
    assert [v.name for v in cfg.variants] == ["plain", "batchnorm"]


@pytest.mark.parametrize("name", ["nope", "../pyproject", "IOFFE-FIG1", "", "ioffe-fig1.json"])
def test_unknown_preset_lists_presets(name):
    with pytest.raises(ConfigError) as info:
        load_preset(name)
    msg = str(info.value)
    assert info.value.field == "preset"
    assert msg.startswith(f"preset = {name!r}: allowed")
    for preset in PRESETS:
        assert preset in msg


# --- the field table as the widgets' source (ui/setup_form.py draws from it) ----------------
def test_every_field_has_its_own_label():
    labels = [spec.label for spec in FIELDS.values()]
    assert all(labels), [name for name, spec in FIELDS.items() if not spec.label]
    assert len(set(labels)) == len(labels)  # a notice names a field by its label


@pytest.mark.parametrize("name", [n for n, s in FIELDS.items() if s.kind in (int, float)])
def test_a_number_widget_offers_only_allowed_values(name):
    """Both ends of a number widget pass the field's own check; an open-low field (a std
    must be above 0) needs the smallest value its widget offers written in the table."""
    spec = FIELDS[name]
    low, high = spec.widget_bounds()
    assert spec.check(name, low) == low and spec.check(name, high) == high
    assert type(low) is spec.kind and type(high) is spec.kind
    if spec.step is not None:
        assert 0 < spec.step <= high - low


def test_widget_hints_fit_the_field_kind():
    for name, spec in FIELDS.items():
        number = spec.kind in (int, float)
        assert spec.widget_kind() in ("checkbox", "selectbox", "slider", "number_input"), name
        if not number:
            assert (spec.widget, spec.step, spec.format, spec.widget_low) == (None,) * 4, name
        if spec.display is not None:
            assert spec.choices is not None, name
            shown = [spec.display(c) for c in spec.choices]
            assert len(set(shown)) == len(shown), name  # two choices must not read alike


def test_every_data_set_choice_has_a_description():
    assert tuple(DATASETS) == FIELDS["dataset"].choices


def test_groupnorm_groups_must_divide_every_layer_into_groups_of_two_or_more():
    ok = RunConfig(variants=["plain", "groupnorm"], width=100, groups=50)
    assert ok.groups == 50
    with pytest.raises(ConfigError, match=r"^groups = 3: .*3 does not divide 100"):
        RunConfig(variants=["plain", "groupnorm"], width=100, groups=3)
    # One unit per group normalizes to 0: refused, though 100 divides 100.
    with pytest.raises(ConfigError, match=r"^groups = 100: .*one unit per group"):
        RunConfig(variants=["plain", "groupnorm"], width=100, groups=100)
    # Only a groupnorm variant makes the field matter.
    assert RunConfig(variants=["plain", "batchnorm"], width=100, groups=3).groups == 3
    with pytest.raises(ConfigError, match=r"^groups = 4: .*these do: 1, 2$"):
        RunConfig(model="lenet", variants=["plain", "groupnorm"], groups=4)
