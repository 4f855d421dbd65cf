"""Bad input through every door gives the same field error from RunConfig.

One table of bad cases is generated from ``bn_core.config.FIELDS`` (so a new field is covered
without editing this file), plus unknown keys, combinations of fields and variants. Each
case knows the message RunConfig must give: ``field = repr(value): allowed ...``. The
cases then go through each door:

1. the Python API (``RunConfig.from_dict`` and ``replace``),
2. a JSON text or file (``RunConfig.from_json``),
3. the command line (``main([...])`` in this process: ``--config FILE`` and override flags),
4. a link's query parameters (``from_query``: a warning, never an exception),
5. an uploaded config in the real page (AppTest's file uploader, a sample of the cases),
6. the page's set-up widgets: each drawn from its FieldSpec (label, help, bounds or
   choices), a field added to the set-up drawn and applied with no other edit, and the
   combinations of valid values they can reach.

Doors 2 and 3 must repeat door 1's message word for word; doors 4 and 5 wrap it in their
own sentence. tests/test_config.py checks values JSON cannot carry (``object()``, huge
integers); tests/test_cli.py, tests/test_sharing.py and tests/test_app.py check single
examples of each door in more depth.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from streamlit.testing.v1 import AppTest

from bn_core.__main__ import main
from bn_core.config import FIELDS, ConfigError, FieldSpec, RunConfig, from_query, load_preset
from ui import session
from ui.session import MAX_CONFIG_BYTES

ROOT = Path(__file__).resolve().parent.parent
PRESET = "ioffe-fig1"  # the app's default preset: the base of every case
PRESET_CONFIG = load_preset(PRESET)
BASE = PRESET_CONFIG.to_dict()
UNICODE = "ñöñ-数据"
ALL_KEYS = ", ".join([*FIELDS, "variants"])
CLI_ERROR = "python -m bn_core: error: "
LINK_IGNORED = "Link parameter ignored, the preset's value is used: "
UPLOAD_REFUSED = "That file was not loaded, the current run is kept. "


def shown(value: Any) -> str:
    """A value as a ConfigError message shows it: its repr, cut to 80 characters."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def shown_key(key: str) -> str:
    """An unknown key as a message names it: as is, or its repr when it would not read as
    one short line (empty, a control character, longer than 80 characters)."""
    return key if key and key.isprintable() and len(key) <= 80 else shown(key)


@dataclass(frozen=True)
class Case:
    """One bad input: the changes on top of the preset and the error they must give."""

    id: str
    data: dict[str, Any]  # changes to BASE, the offending key last
    field: str  # ConfigError.field, and how the message starts
    shown: str  # the value as the message shows it
    allowed: str  # the message's whole "allowed ..." part, or a fragment of it
    exact: bool = True  # the message is exactly f"{field} = {shown}: {allowed}"
    query: dict[str, str] | None = None  # the same change as link parameters (None: no link)
    query_shown: str | None = None  # the value as the link's warning shows it
    group: str = ""  # the field kind, for sampling the slower doors
    category: str = ""

    @property
    def message(self) -> str:
        return f"{self.field} = {self.shown}: {self.allowed}"


def _kind_group(spec: FieldSpec) -> str:
    group = spec.kind.__name__
    if spec.nullable:
        group += "-nullable"
    if spec.low_open:
        group += "-open"
    return group


def _bad_values(spec: FieldSpec) -> list[tuple[str, Any]]:
    """(category, value) pairs the field must refuse; every value survives JSON."""
    out: list[tuple[str, Any]] = []
    if spec.kind is bool:
        out += [("number", 1), ("text", "true")]
    elif spec.kind is str:
        assert spec.choices, "a string field without choices would accept any text"
        out += [("not-a-choice", spec.choices[0].upper()), ("number", 1), ("bool", True)]
    else:
        number = spec.kind
        if spec.low is not None:
            if spec.low_open:
                out.append(("at-open-low", float(spec.low)))
            if spec.kind is int:
                out.append(("below-low", int(spec.low) - 1))
            else:
                out.append(("below-low", spec.low / 2 if spec.low > 0 else spec.low - 0.5))
        if spec.high is not None:
            out.append(("above-high", number(spec.high) + (1 if number is int else 0.5)))
        if spec.kind is int:
            out.append(("non-integer", (spec.low or 0) + 0.5))
        out += [
            ("text", "abc"),
            ("numeric-text", "1"),
            ("bool", True),
            # Every comparison is False for NaN, so a range check alone lets it through.
            ("non-finite", math.nan),
        ]
    if not spec.nullable:
        out.append(("null", None))
    out.append(("list", [1]))
    return out


def _link_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return json.dumps(value)
    return repr(value)


def _field_case(name: str, spec: FieldSpec, category: str, value: Any) -> Case:
    # A link carries text: "1" is the number 1 there, and 1/true are booleans by design.
    no_link = (category == "numeric-text") or (spec.kind is bool and value in (1, "true"))
    text = _link_text(value)
    numeric_value = isinstance(value, int | float) and not isinstance(value, bool)
    link_value_shown = shown(value) if spec.kind in (int, float) and numeric_value else shown(text)
    return Case(
        id=f"{name}-{category}",
        data={name: value},
        field=name,
        shown=shown(value),
        allowed=spec.allowed(),
        query=None if no_link else {name: text},
        query_shown=None if no_link else link_value_shown,
        group=_kind_group(spec),
        category=category,
    )


FIELD_CASES = [
    _field_case(name, spec, category, value)
    for name, spec in FIELDS.items()
    for category, value in _bad_values(spec)
]

UNKNOWN_KEYS = {
    "typo": "widht",
    # A key that would not read as one line is shown as its repr.
    "newline": "a\nb",
}
UNKNOWN_CASES = [
    Case(
        id=f"unknown-{label}",
        data={key: 1},
        field=shown_key(key),
        shown="1",
        allowed="unknown field; allowed: " + ALL_KEYS,
        query={key: "1"},
        group="unknown",
        category=label,
    )
    for label, key in UNKNOWN_KEYS.items()
]

OTHER_CASES = [
    # Combinations: each value is valid alone.
    Case(
        "combo-groups-not-dividing-width",
        {"variants": ["plain", "groupnorm"], "groups": 3},
        "groups",
        "3",
        "allowed: a group count that divides the channels of every layer GroupNorm "
        "normalizes (width = 100 channels per layer) into groups of 2 or more, and 3 does "
        "not divide 100",
        exact=False,
        query={"variants": "plain,groupnorm", "groups": "3"},
        query_shown="3",
        group="combo",
    ),
    Case(
        "combo-batch-1-preset-bn",
        {"batch_size": 1},
        "batch_size",
        "1",
        "allowed: at least 2 when a variant uses BatchNorm",
        exact=False,
        query={"batch_size": "1"},
        query_shown="1",
        group="combo",
    ),
    Case(
        "combo-batch-1-noisy-bn",
        {"variants": ["batchnorm-noisy"], "batch_size": 1},
        "batch_size",
        "1",
        "allowed: at least 2 when a variant uses BatchNorm",
        exact=False,
        query={"variants": "batchnorm-noisy", "batch_size": "1"},
        query_shown="1",
        group="combo",
    ),
    Case(
        "combo-landscape-low-above-high",
        {"landscape_high": 2.0, "landscape_low": 3.0},
        "landscape_low",
        "3.0",
        "allowed: at most landscape_high (2)",
        query={"landscape_high": "2", "landscape_low": "3"},
        query_shown="3.0",
        group="combo",
    ),
    Case(
        "combo-noise-scale-low-above-high",
        {"bn_noise_scale_high": 1.5, "bn_noise_scale_low": 2.0},
        "bn_noise_scale_low",
        "2.0",
        "allowed: at most bn_noise_scale_high (1.5)",
        query={"bn_noise_scale_high": "1.5", "bn_noise_scale_low": "2"},
        query_shown="2.0",
        group="combo",
    ),
    Case(
        "combo-probe-unit-equals-width",
        {"width": 16, "probe_unit": 16},
        "probe_unit",
        "16",
        "allowed: an integer in [0, 15]",
        query={"width": "16", "probe_unit": "16"},
        query_shown="16",
        group="combo",
    ),
    Case(
        "combo-probe-unit-above-width",
        {"probe_unit": 300},
        "probe_unit",
        "300",
        f"allowed: an integer in [0, {PRESET_CONFIG.width - 1}]",
        query={"probe_unit": "300"},
        query_shown="300",
        group="combo",
    ),
    Case(
        "combo-lenet-probe-unit",
        {"model": "lenet", "probe_unit": 6},
        "probe_unit",
        "6",
        "allowed: an integer in [0, 5]",
        exact=False,
        query={"model": "lenet", "probe_unit": "6"},
        query_shown="6",
        group="combo",
    ),
    Case(
        "combo-lenet-toy-data",
        {"model": "lenet", "dataset": "moons"},
        "dataset",
        "'moons'",
        "allowed with model = 'lenet'",
        exact=False,
        query={"model": "lenet", "dataset": "moons"},
        query_shown="'moons'",
        group="combo",
    ),
    # Unicode in the other text fields.
    Case(
        "dataset-cjk",
        {"dataset": "数据"},
        "dataset",
        "'数据'",
        FIELDS["dataset"].allowed(),
        query={"dataset": "数据"},
        query_shown="'数据'",
        group="unicode",
    ),
    Case(
        "variant-name-unicode",
        {"variants": [{"name": "ñ", "norm": "batchnorm"}]},
        "variants[0].name",
        "'ñ'",
        "allowed: 1-32 characters",
        exact=False,
        query={"variants": "ñ:batchnorm"},
        query_shown="'ñ'",
        group="unicode",
    ),
    Case(
        "variant-bare-unicode",
        {"variants": ["plain", UNICODE]},
        "variants[1]",
        shown(UNICODE),
        "allowed: plain, batchnorm",
        exact=False,
        query={"variants": f"plain,{UNICODE}"},
        query_shown=shown(UNICODE),
        group="unicode",
    ),
    Case(
        "variant-norm-unicode",
        {"variants": [{"name": "x", "norm": UNICODE}]},
        "variants[0].norm",
        shown(UNICODE),
        "allowed: none, batchnorm",
        exact=False,
        query={"variants": f"x:{UNICODE}"},
        query_shown=shown(UNICODE),
        group="unicode",
    ),
    Case(
        "variant-unknown-key-newline",
        {"variants": [{"name": "x", "norm": "none", "a\nb": 1}]},
        "variants[0].'a\\nb'",
        "1",
        "unknown key; allowed: name, norm, lr",
        group="variant",
    ),
    # "$" in a pattern also matches before a final newline; a name must not end in one.
    # (A link cannot say this: its variant tokens are stripped.)
    Case(
        "variant-name-trailing-newline",
        {"variants": [{"name": "bn\n", "norm": "batchnorm"}]},
        "variants[0].name",
        "'bn\\n'",
        "allowed: 1-32 characters",
        exact=False,
        group="unicode",
    ),
]

CASES = FIELD_CASES + UNKNOWN_CASES + OTHER_CASES
IDS = [c.id for c in CASES]


def test_every_field_has_cases_and_ids_are_unique():
    assert len(set(IDS)) == len(IDS)
    assert {c.field for c in FIELD_CASES} == set(FIELDS)
    for name, spec in FIELDS.items():
        categories = {c.category for c in FIELD_CASES if c.field == name}
        assert {"list"} <= categories, name
        if spec.kind in (int, float):
            assert {"below-low", "above-high", "text", "non-finite"} <= categories, name
            if spec.low_open:
                assert "at-open-low" in categories, name
        if not spec.nullable:
            assert "null" in categories, name


# --- helpers ---------------------------------------------------------------------------
def raised(call: Callable[[], Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        call()
    return info.value


def check_message(err: ConfigError, case: Case) -> str:
    msg = str(err)
    assert err.field == case.field, msg
    assert "\n" not in msg and "\r" not in msg, repr(msg)
    assert msg.startswith(f"{case.field} = {case.shown}: allowed") or msg.startswith(
        f"{case.field} = {case.shown}: unknown "
    ), msg
    if case.exact:
        assert msg == case.message
    else:
        assert case.allowed in msg, msg
    return msg


def api_message(case: Case) -> str:
    return str(raised(lambda: RunConfig.from_dict({**BASE, **case.data})))


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """`python -m bn_core ARGV` in this process: (exit status, stdout, stderr)."""
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse errors exit
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def check_cli_refusal(code: int, out: str, err: str, out_dir: Path) -> str:
    assert code == 2, err
    assert "Traceback" not in err
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert not out_dir.exists()
    return lines[0]


# --- door 1: the Python API ---------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_python_api(case):
    err = raised(lambda: RunConfig.from_dict({**BASE, **case.data}))
    msg = check_message(err, case)
    # replace() is the path of widgets, links and CLI overrides: the same words.
    assert str(raised(lambda: PRESET_CONFIG.replace(**case.data))) == msg


# --- door 2: JSON text and files ----------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_json(case):
    expected = api_message(case)
    data = {**BASE, **case.data}
    # Python's json writes NaN/Infinity, as a hand-edited or exported file may hold them;
    # once with \u escapes (str) and once as raw UTF-8 (bytes, as read from a file).
    for text in (json.dumps(data), json.dumps(data, ensure_ascii=False).encode("utf-8")):
        err = raised(lambda text=text: RunConfig.from_json(text))
        assert str(err) == expected
        assert err.field == case.field


# JSON that is not a config object at all, as a file or an upload may hold it.
BAD_FILES: dict[str, tuple[bytes, str]] = {
    # id: (content, a fragment of the message after "config = ")
    "empty": (b"", "not valid JSON"),
    "whitespace": (b" \n\t", "not valid JSON"),
    "truncated": (b'{"depth": 3,', "not valid JSON"),
    "trailing-garbage": (b'{"depth": 3} x', "not valid JSON"),
    "json-list": (b"[1, 2]", "[1, 2]: allowed: a JSON object"),
    "json-number": (b"3", "3: allowed: a JSON object"),
    "json-string": (b'"depth"', "'depth': allowed: a JSON object"),
    "json-null": (b"null", "None: allowed: a JSON object"),
    "json-true": (b"true", "True: allowed: a JSON object"),
    "not-utf8": (b'{"dataset": "\xff\xfe"}', "utf-8"),
    # Python refuses integers over 4300 digits (a ValueError inside json).
    "too-many-digits": (b'{"seed": ' + b"9" * 5000 + b"}", "not valid JSON"),
    # Well under the upload limit, but deeper than Python's recursion limit.
    "deeply-nested": (b"[" * 20_000 + b"]" * 20_000, "not valid JSON"),
}
FILE_IDS = list(BAD_FILES)


@pytest.mark.parametrize("key", FILE_IDS)
def test_json_that_is_not_a_config(key):
    content, fragment = BAD_FILES[key]
    assert len(content) <= MAX_CONFIG_BYTES  # each of these reaches the parser in the app
    texts: list[str | bytes] = [content]
    if key != "not-utf8":
        texts.append(content.decode("utf-8"))  # the same, already decoded
    for text in texts:
        err = raised(lambda text=text: RunConfig.from_json(text))
        msg = str(err)
        assert err.field == "config"
        assert msg.startswith("config = ") and "allowed" in msg, msg
        assert fragment in msg, msg
        assert "\n" not in msg and len(msg) < 1000, msg


# --- door 3: the command line ----------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_cli_config_file(case, tmp_path, capsys):
    expected = api_message(case)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**BASE, **case.data}, ensure_ascii=False), encoding="utf-8")
    argv = ["run", "--config", str(path), "--steps", "1", "--out", str(tmp_path / "out")]
    line = check_cli_refusal(*run_main(argv, capsys), tmp_path / "out")
    assert line == CLI_ERROR + expected


@pytest.mark.parametrize("key", FILE_IDS)
def test_cli_config_file_that_is_not_a_config(key, tmp_path, capsys):
    content, _ = BAD_FILES[key]
    expected = str(raised(lambda: RunConfig.from_json(content)))
    path = tmp_path / "config.json"
    path.write_bytes(content)
    argv = ["run", "--config", str(path), "--steps", "1", "--out", str(tmp_path / "out")]
    line = check_cli_refusal(*run_main(argv, capsys), tmp_path / "out")
    assert line == CLI_ERROR + expected


def test_cli_config_that_is_a_directory(tmp_path, capsys):
    argv = ["run", "--config", str(tmp_path), "--steps", "1", "--out", str(tmp_path / "out")]
    line = check_cli_refusal(*run_main(argv, capsys), tmp_path / "out")
    assert line.startswith(f"{CLI_ERROR}--config = {str(tmp_path)!r}: allowed: a readable file")


FLAG_FIELDS = ("steps", "device", "seed", "dataset")  # the fields `run` takes as flags


def _flag_text(value: Any) -> str | None:
    """How a value is written as a flag, or None where the CLI reads that text as another
    value (flags go through int(), then float(), else stay text)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return value
        return None
    return repr(value)


FLAG_CASES = [
    (c.field, _flag_text(c.data[c.field]), c)
    for c in FIELD_CASES
    if c.field in FLAG_FIELDS and _flag_text(c.data[c.field]) is not None
]
FLAG_CASES.append(
    ("device", "tpu", Case("device-tpu", {"device": "tpu"}, "device", "'tpu'", "", group="str"))
)


@pytest.mark.parametrize(
    ("flag", "text", "case"), FLAG_CASES, ids=[f"--{f}={t}" for f, t, _ in FLAG_CASES]
)
def test_cli_flags(flag, text, case, tmp_path, capsys):
    expected = api_message(case)
    assert expected.startswith(f"{flag} = {case.shown}: allowed")
    argv = ["run", "--preset", PRESET, f"--{flag}={text}", "--out", str(tmp_path / "out")]
    if flag != "steps":
        argv[3:3] = ["--steps", "1"]  # were the flag taken, the run would be one step
    line = check_cli_refusal(*run_main(argv, capsys), tmp_path / "out")
    assert line == CLI_ERROR + expected


def test_flag_table_has_the_usual_mistakes():
    texts = {(flag, text) for flag, text, _ in FLAG_CASES}
    assert {("steps", "0"), ("steps", "abc"), ("seed", "-1"), ("device", "tpu")} <= texts
    assert {flag for flag, _ in texts} == set(FLAG_FIELDS)


# --- door 4: links -------------------------------------------------------------------------
LINK_CASES = [c for c in CASES if c.query is not None]


@pytest.mark.parametrize("case", LINK_CASES, ids=[c.id for c in LINK_CASES])
def test_link(case):
    config, preset, warnings = from_query({"preset": PRESET, **case.query}, "bias-blowup")
    assert preset == PRESET
    assert len(warnings) == 1, warnings
    warning = warnings[0]
    assert "allowed" in warning and "Traceback" not in warning
    if case.group == "unknown":
        key = next(iter(case.data))
        with pytest.raises(ConfigError) as named:  # the link names the key as RunConfig does
            RunConfig.from_dict({key: 1})
        field = named.value.field
        assert warning.startswith(f"Link parameter ignored: {field} = '1': unknown parameter")
        assert config == PRESET_CONFIG
        return
    assert warning.startswith(f"{LINK_IGNORED}{case.field} = {case.query_shown}: allowed"), warning
    if case.exact:
        assert warning == f"{LINK_IGNORED}{case.field} = {case.query_shown}: {case.allowed}"
    else:
        assert case.allowed in warning, warning
    # The offending parameter keeps the preset's value; the valid ones before it apply.
    top = case.field.split("[")[0]
    assert getattr(config, top) == getattr(PRESET_CONFIG, top)
    partners = {k: v for k, v in case.data.items() if k != top}
    assert config == PRESET_CONFIG.replace(**partners)


def test_every_link_case_has_a_reason_when_it_has_no_link():
    """A case leaves the link door only for a known reason, so the door is not skipped."""
    for case in CASES:
        if case.query is None:
            assert case.category in ("numeric-text", "number", "text") or case.id in (
                "variant-unknown-key-newline",
                "variant-name-trailing-newline",
            ), case.id
            if case.category in ("number", "text"):
                assert FIELDS[case.field].kind is bool, case.id


# --- door 5: uploads in the real page -----------------------------------------------------
APP_CATEGORIES = {"below-low", "at-open-low", "above-high", "text", "non-finite", "null", "number"}


def _app_sample() -> list[Case]:
    """All of one field per kind (int, float, open float, nullable float, str, bool) in the
    main categories, and every unknown-key, combination and unicode case."""
    first_of_group: dict[str, str] = {}
    for c in FIELD_CASES:
        first_of_group.setdefault(c.group, c.field)
    picked = [
        c
        for c in FIELD_CASES
        if first_of_group[c.group] == c.field and (c.category in APP_CATEGORIES or c.group == "str")
    ]
    return picked + UNKNOWN_CASES + OTHER_CASES


APP_CASES = _app_sample()


def test_app_sample_covers_every_field_kind():
    groups = {c.group for c in APP_CASES}
    assert {_kind_group(spec) for spec in FIELDS.values()} <= groups


def _app_run(target) -> AppTest:
    at = target.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _button(at: AppTest, label: str):
    found = [b for b in at.button if b.label == label]
    assert len(found) == 1, f"button {label!r}: {[b.label for b in at.button]}"
    return found[0]


class LivePage:
    """One session of the Live training page, one step into the default run."""

    WIDGETS = ("w_depth", "w_width", "w_lr", "w_variants", "w_dataset", "w_batch_size")

    def __init__(self, app_path: Path) -> None:
        self.at = _app_run(AppTest.from_file(str(app_path), default_timeout=60))
        _app_run(_button(self.at, "Step").click())
        self.snapshot()

    def snapshot(self) -> None:
        ss = self.at.session_state
        self.trainer = ss.trainer
        self.step = self.trainer.step
        self.rows = len(self.trainer.history.to_frame())
        self.events = list(self.trainer.history.events)
        self.base = ss.base_config
        self.widgets = {k: ss[k] for k in self.WIDGETS}
        self.url = dict(self.at.query_params)

    def upload(self, name: str, content: bytes) -> list[str]:
        uploader = self.at.file_uploader(key="w_upload")
        _app_run(uploader.set_value((name, content, "application/json")))
        return [e.value for e in self.at.error]

    def assert_unchanged(self) -> None:
        ss = self.at.session_state
        assert ss.trainer is self.trainer
        assert self.trainer.step == self.step
        assert len(self.trainer.history.to_frame()) == self.rows
        assert self.trainer.history.events == self.events
        assert ss.base_config == self.base
        assert {k: ss[k] for k in self.WIDGETS} == self.widgets
        assert dict(self.at.query_params) == self.url
        assert not self.at.success


@pytest.fixture(scope="module")
def live_page(app_path, one_torch_thread_for_module):
    """Shared by the upload tests: a bad upload must leave it as it was, so each test
    starts where the last one left it (and one page start, seconds, serves them all)."""
    return LivePage(app_path)


@pytest.mark.parametrize("case", APP_CASES, ids=[c.id for c in APP_CASES])
def test_upload_in_the_app(live_page, case):
    expected = api_message(case)
    content = json.dumps({**BASE, **case.data}, ensure_ascii=False).encode("utf-8")
    errors = live_page.upload(f"{case.id}.json", content)
    assert errors == [UPLOAD_REFUSED + expected]
    live_page.assert_unchanged()


TEN_MB = 10 * 1024 * 1024
SPECIAL_UPLOADS = {
    **{key: content for key, (content, _) in BAD_FILES.items()},
    # A valid config padded with spaces: refused for its size alone, never parsed.
    "10-MB": PRESET_CONFIG.to_json().encode("utf-8").ljust(TEN_MB),
    "limit-plus-1": PRESET_CONFIG.to_json().encode("utf-8").ljust(MAX_CONFIG_BYTES + 1),
}


@pytest.mark.parametrize("key", list(SPECIAL_UPLOADS))
def test_upload_of_a_file_that_is_not_a_config(live_page, key):
    content = SPECIAL_UPLOADS[key]
    errors = live_page.upload(f"{key}.json", content)
    if len(content) > MAX_CONFIG_BYTES:
        assert errors == [
            f"config file = {len(content):,} bytes: allowed: at most {MAX_CONFIG_BYTES:,} "
            "bytes. The current run is kept."
        ]
    else:
        assert errors == [UPLOAD_REFUSED + str(raised(lambda: RunConfig.from_json(content)))]
    live_page.assert_unchanged()


def test_the_run_goes_on_after_the_bad_uploads(live_page):
    at = live_page.at
    _app_run(_button(at, "Step").click())
    assert at.session_state.trainer is live_page.trainer
    assert live_page.trainer.step == live_page.step + 1
    assert not at.error  # each message is shown once
    live_page.snapshot()


class FakeState(dict):
    __getattr__ = dict.__getitem__
    __setattr__ = dict.__setitem__


def test_upload_size_limit_is_inclusive(monkeypatch, one_torch_thread):
    """A valid config of exactly MAX_CONFIG_BYTES loads; one byte more is refused unread."""
    monkeypatch.setattr(session.st, "session_state", FakeState(trainer=None, message=None))
    ss = session.st.session_state
    text = PRESET_CONFIG.replace(depth=2).to_json().encode("utf-8")
    session.load_uploaded_config(text.ljust(MAX_CONFIG_BYTES + 1))
    assert ss.trainer is None
    kind, message = ss.message
    assert kind == "error" and f"{MAX_CONFIG_BYTES + 1:,} bytes" in message
    session.load_uploaded_config(text.ljust(MAX_CONFIG_BYTES))
    assert ss.message[0] == "success", ss.message
    assert ss.trainer.config == PRESET_CONFIG.replace(depth=2)
    assert ss.w_depth == 2


# --- door 6: the page's set-up widgets ----------------------------------------------------
# The form (ui/setup_form.py) draws each widget from its field's FieldSpec, with bounds
# the field allows and only its choices, so a single out-of-range value cannot be typed
# in: the browser clamps it, and Streamlit resets a value sent outside the bounds to the
# widget's default. What the widgets can reach are combinations of valid
# values, which the page must name without touching the run.
WIDGET_COMBINATIONS = {
    # id: (widget key -> value, in order; the field the error names)
    "batch-1-with-bn": ({"w_batch_size": 1}, "batch_size"),
    "lenet-on-moons": ({"w_model": "lenet", "w_dataset": "moons"}, "dataset"),
    "groups-not-dividing-width": (
        {"w_variants": ["plain", "groupnorm"], "w_groups": 3},
        "groups",
    ),
}
WIDGET_KINDS = ("number_input", "slider", "select_slider", "selectbox", "multiselect", "checkbox")


def _widget(at: AppTest, key: str):
    for kind in WIDGET_KINDS:
        found = [w for w in getattr(at.sidebar, kind) if w.key == key]
        if found:
            return found[0]
    raise AssertionError(f"no sidebar widget {key!r}")


@pytest.fixture
def page(app_path, one_torch_thread) -> LivePage:
    return LivePage(app_path)


FORM_FIELDS = [name for name in session.SETUP_FIELDS if name != "variants"]


def _field_widget(at: AppTest, name: str) -> tuple[str, Any]:
    """(widget kind, widget) of the one sidebar widget that edits a field."""
    found = [
        (kind, w)
        for kind in WIDGET_KINDS
        for w in getattr(at.sidebar, kind)
        if w.key == f"w_{name}"
    ]
    assert len(found) == 1, (name, found)
    return found[0]


def assert_drawn_from_spec(at: AppTest, name: str) -> None:
    """The field's widget is the one its FieldSpec describes, and offers only values the
    field allows: a bound or choice outside them would be a bad input one click away."""
    spec = FIELDS[name]
    kind, w = _field_widget(at, name)
    assert kind == spec.widget_kind(), name
    assert (w.label, w.help) == (spec.label, spec.help), name
    if kind == "selectbox":
        assert w.options == [(spec.display or str)(c) for c in spec.choices], name
    if kind in ("number_input", "slider"):
        assert (w.min, w.max) == spec.widget_bounds(), name
        spec.check(name, w.min)  # raises ConfigError for a bound the field refuses
        spec.check(name, w.max)
    assert w.value == getattr(at.session_state.base_config, name), name


@pytest.fixture(scope="module")
def drawn(app_path, one_torch_thread_for_module) -> AppTest:
    """The Live training page as first drawn; the tests using it only read it."""
    return _app_run(AppTest.from_file(str(app_path), default_timeout=60))


@pytest.mark.parametrize("name", FORM_FIELDS)
def test_setup_widget_is_drawn_from_its_field_spec(drawn, name):
    assert_drawn_from_spec(drawn, name)


def test_the_sidebar_edits_exactly_the_setup_and_live_fields(drawn):
    keys = {w.key for kind in WIDGET_KINDS for w in getattr(drawn.sidebar, kind)}
    edited = {k.removeprefix("w_") for k in keys if k and k.removeprefix("w_") in FIELDS}
    assert edited == (set(FORM_FIELDS) | set(session.LIVE_WIDGETS))
    assert "w_variants" in keys


def test_live_widgets_offer_only_allowed_values_under_the_field_label(drawn):
    for name in session.LIVE_WIDGETS:
        spec = FIELDS[name]
        kind, w = _field_widget(drawn, name)
        assert w.label == spec.label, name
        if kind == "slider":
            spec.check(name, w.min)
            spec.check(name, w.max)
        else:
            for option in w.options:  # shown through format_func: "cumulative (None)"
                spec.check(name, None if "None" in option else float(option))


# A field of each widget kind not in the form today, and a value other than the preset's.
ADDED_FIELDS = {"hist_bins": 20, "hist_range": 4.0, "optimizer": "adam"}


@pytest.mark.parametrize("name", list(ADDED_FIELDS))
def test_a_field_added_to_setup_fields_is_drawn_and_reaches_the_run(
    app_path, one_torch_thread, monkeypatch, name
):
    """One edit (the name in SETUP_FIELDS) puts a field in the form, its notices, link and
    Reset: nothing else lists the set-up's widgets."""
    monkeypatch.setattr(session, "SETUP_FIELDS", (*session.SETUP_FIELDS, name))
    at = _app_run(AppTest.from_file(str(app_path), default_timeout=60))
    assert_drawn_from_spec(at, name)
    value = ADDED_FIELDS[name]
    assert getattr(PRESET_CONFIG, name) != value
    _app_run(_field_widget(at, name)[1].set_value(value))
    assert any(f"{FIELDS[name].label} ({name})" in w.value for w in at.warning)
    assert dict(at.query_params)[name] == str(value)  # the link carries it
    _app_run(_button(at, "Reset").click())
    assert getattr(at.session_state.trainer.config, name) == value


def test_widgets_that_do_not_apply_are_disabled(page):
    """Noise only for the toy sets, depth/width/skips only for the MLP, the std only for a
    Gaussian init, groups only with a GroupNorm variant; each change in turn."""
    at = page.at
    steps = [
        ({}, {"noise", "groups"}),
        ({"w_dataset": "moons"}, {"groups"}),
        ({"w_variants": ["plain", "groupnorm"]}, set()),
        ({"w_init": "xavier"}, {"init_std"}),
        (
            {"w_model": "lenet", "w_dataset": "digits"},
            {"init_std", "noise", "depth", "width", "residual"},
        ),
    ]
    for changes, off in steps:
        for key, value in changes.items():
            _app_run(_widget(at, key).set_value(value))
        disabled = {name for name in FORM_FIELDS if _field_widget(at, name)[1].disabled}
        assert disabled == off, changes


@pytest.mark.parametrize("key", list(WIDGET_COMBINATIONS))
def test_widget_combination_error_keeps_the_run(page, key):
    changes, field_name = WIDGET_COMBINATIONS[key]
    at = page.at
    for widget_key, value in changes.items():
        _app_run(_widget(at, widget_key).set_value(value))
    fields = {k.removeprefix("w_"): v for k, v in changes.items()}
    expected = str(raised(lambda: PRESET_CONFIG.replace(**fields)))
    assert expected.startswith(f"{field_name} = ")
    assert [e.value for e in at.error] == [f"The set-up in the sidebar is not valid: {expected}"]
    assert _button(at, "Reset").disabled
    assert at.session_state.trainer is page.trainer and page.trainer.step == page.step
    _app_run(_button(at, "Step").click())  # the current run goes on
    assert at.session_state.trainer is page.trainer and page.trainer.step == page.step + 1
    assert len(at.error) == 1  # the set-up is still not valid, and still said so


def test_no_variant_picked_names_variants(page):
    """The one widget error RunConfig does not word: an empty Variants pick."""
    at = page.at
    _app_run(_widget(at, "w_variants").set_value([]))
    errors = [e.value for e in at.error]
    assert errors == [
        "The set-up in the sidebar is not valid: variants = []: allowed: pick at least one variant"
    ]
    assert _button(at, "Reset").disabled
    assert at.session_state.trainer is page.trainer
