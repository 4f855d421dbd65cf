"""RunConfig: the one serializable description of a run, validated in one place.

Every door into a run (Python API, CLI flags, JSON files, presets, the app's widgets and
URL) goes through ``RunConfig.from_dict`` or ``RunConfig.replace``, so a bad value always
gets the same message: ``field = value: allowed ...``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "BATCH_NORMS",
    "NORMS",
    "PRESET_DIR",
    "ConfigError",
    "FieldSpec",
    "FIELDS",
    "LIVE_FIELDS",
    "MEASURE_CADENCES",
    "RunConfig",
    "VariantSpec",
    "list_presets",
    "from_query",
    "load_preset",
    "to_query",
]

PRESET_DIR = Path(__file__).resolve().parent.parent / "assets" / "presets"

# Normalization kinds a variant can use, with what each one is for.
NORMS: dict[str, str] = {
    "none": "no normalization (the plain net)",
    "batchnorm": "our BatchNorm, gradient through the batch statistics",
    "batchnorm-naive": "our BatchNorm, batch statistics held constant in the gradient",
    "batchnorm-torch": "torch.nn.BatchNorm1d/2d, as a reference line",
    "batchnorm-noisy": "our BatchNorm, then random shift and scale each step (Santurkar et al.)",
    "layernorm": "our LayerNorm: each example over its own features, no batch statistics",
    "groupnorm": "our GroupNorm: each example over groups of its channels (field groups)",
    "rmsnorm": "our RMSNorm: each example scaled by its root mean square, no centering",
}
# Norms that use the batch's statistics (and keep running averages for inference).
BATCH_NORMS = ("batchnorm", "batchnorm-naive", "batchnorm-torch", "batchnorm-noisy")
# A variant may be written as a bare name; these names imply their normalization.
_SHORTHAND = {"plain": "none", **{k: k for k in NORMS if k != "none"}}
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.\-]{0,31}$")


class ConfigError(ValueError):
    """A config value outside what is allowed; names the field, the value and the rule."""

    def __init__(self, field_name: str, value: Any, allowed: str) -> None:
        self.field = field_name
        self.value = value
        self.allowed = allowed
        super().__init__(f"{field_name} = {_show(value)}: {allowed}")


def _common_divisors(numbers: list[int]) -> list[int]:
    return [d for d in range(1, min(numbers) + 1) if all(n % d == 0 for n in numbers)]


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _key(key: Any) -> str:
    """An unknown key as the field a message names: as is when it reads as one short line."""
    text = str(key)
    return text if text and text.isprintable() and len(text) <= 80 else _show(text)


@dataclass(frozen=True)
class FieldSpec:
    """How one config field is typed, bounded, explained and shown as a widget.

    The app's set-up form draws each field from this alone (ui/setup_form.py), so a
    widget's range, label and help cannot drift from what validation allows.
    """

    kind: type  # int, float, str or bool
    help: str
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] | None = None
    nullable: bool = False
    low_open: bool = False  # low itself not allowed
    label: str = ""
    # Widget hints. A number is a number input unless widget is "slider"; a widget cannot
    # offer an open interval, so an open-low number names the smallest value it offers.
    widget: str | None = None
    step: float | None = None
    format: str | None = None  # printf-style, e.g. "%.3f" for a std of 0.001
    widget_low: float | None = None
    display: Callable[[str], str] | None = None  # how a choice reads, e.g. str.upper

    def widget_kind(self) -> str:
        """The widget that edits the field: checkbox, selectbox, slider or number_input."""
        if self.kind is bool:
            return "checkbox"
        if self.choices is not None:
            return "selectbox"
        return self.widget or "number_input"

    def widget_bounds(self) -> tuple[Any, Any]:
        """(min, max) of a number widget, in the field's type; both values the field allows."""
        low = self.low if self.widget_low is None else self.widget_low
        return self.kind(low), self.kind(self.high)

    def allowed(self) -> str:
        if self.choices is not None:
            return "allowed: " + ", ".join(self.choices)
        if self.kind is bool:
            return "allowed: true or false"
        kind = "an integer" if self.kind is int else "a number"
        lo = "(" if self.low_open else "["
        rule = f"allowed: {kind} in {lo}{_num(self.low)}, {_num(self.high)}]"
        return rule + (" or null" if self.nullable else "")

    def check(self, name: str, value: Any) -> Any:
        if value is None:
            if self.nullable:
                return None
            raise ConfigError(name, value, self.allowed())
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ConfigError(name, value, self.allowed())
            return value
        if self.kind is str:
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                raise ConfigError(name, value, self.allowed())
            return value
        # Numbers: bool is an int subclass in Python but never a valid number here.
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(name, value, self.allowed())
        if self.kind is int:
            if isinstance(value, float):
                if not value.is_integer():
                    raise ConfigError(name, value, self.allowed())
                value = int(value)
        else:
            try:
                value = float(value)
            except OverflowError:  # an integer beyond float range, e.g. 10**400 in JSON
                raise ConfigError(name, value, self.allowed()) from None
            if not math.isfinite(value):
                raise ConfigError(name, value, self.allowed())
        too_low = self.low is not None and (
            value <= self.low if self.low_open else value < self.low
        )
        if too_low or (self.high is not None and value > self.high):
            raise ConfigError(name, value, self.allowed())
        return value


def _num(x: float | None) -> str:
    if x is None:
        return "inf"
    if float(x).is_integer() and abs(x) < 1e15:
        return str(int(x))
    return f"{x:g}"


FIELDS: dict[str, FieldSpec] = {
    # data
    "dataset": FieldSpec(
        str,
        "the data the nets learn to classify",
        choices=("digits", "moons", "circles", "spirals", "blobs", "mnist", "fashion-mnist"),
        label="Data set",
    ),
    "noise": FieldSpec(
        float,
        "noise of the 2-D toy sets",
        0.0,
        1.0,
        label="Data noise",
        widget="slider",
        step=0.05,
    ),
    "seed": FieldSpec(int, "seed for data split, init and batch order", 0, 2**31 - 1, label="Seed"),
    # model
    "model": FieldSpec(
        str,
        "architecture: an MLP, or LeNet's convolutions (images only)",
        choices=("mlp", "lenet"),
        label="Model",
        display=str.upper,
    ),
    "depth": FieldSpec(int, "hidden layers of the MLP", 1, 8, label="Hidden layers"),
    "width": FieldSpec(int, "units per hidden layer of the MLP", 4, 512, label="Units per layer"),
    "activation": FieldSpec(
        str, "nonlinearity", choices=("sigmoid", "tanh", "relu"), label="Activation"
    ),
    "init": FieldSpec(str, "weight init", choices=("gaussian", "xavier", "kaiming"), label="Init"),
    "init_std": FieldSpec(
        float,
        "std of the small-Gaussian init",
        0.0,
        10.0,
        low_open=True,
        label="Init std",
        format="%.3f",
        widget_low=0.001,
    ),
    "placement": FieldSpec(
        str,
        "BN relative to the nonlinearity",
        choices=("before", "after"),
        label="BN placement",
    ),
    "keep_bias": FieldSpec(
        bool,
        "keep the linear bias in front of BN: BN's beta makes it redundant (it gets zero "
        "gradient); keep it to see that",
        label="Keep the linear bias before BN",
    ),
    "groups": FieldSpec(
        int,
        "GroupNorm's groups of channels per layer; must divide the units of every layer",
        1,
        512,
        label="GroupNorm groups",
    ),
    "residual": FieldSpec(
        str,
        "skip connections of the MLP, residual blocks from layer 2 on with f(h) = "
        "act(W h + b): pre is h + f(N(h)), the normalizer N on the block's input; post is "
        "N(h + f(h)), after the addition",
        choices=("none", "pre", "post"),
        label="Skip connections",
    ),
    # training
    "batch_size": FieldSpec(int, "examples per step", 1, 4096, label="Batch size"),
    "steps": FieldSpec(int, "length of the run in steps", 1, 10_000_000, label="Steps"),
    "optimizer": FieldSpec(str, "optimizer", choices=("sgd", "adam"), label="Optimizer"),
    "lr": FieldSpec(float, "learning rate", 1e-5, 10.0, label="Learning rate"),
    "momentum": FieldSpec(float, "SGD momentum", 0.0, 0.99, label="SGD momentum"),
    "bn_momentum": FieldSpec(
        float,
        "BN running-stat momentum",
        0.001,
        1.0,
        nullable=True,
        label="BN running-stat momentum",
    ),
    "device": FieldSpec(
        str,
        "where the nets train: auto picks a CUDA GPU, then Apple's MPS, then the CPU",
        choices=("auto", "cpu", "cuda", "mps"),
        label="Device",
    ),
    # telemetry
    "telemetry_every": FieldSpec(
        int, "steps between probe measurements", 1, 100_000, label="Probe every"
    ),
    "eval_every": FieldSpec(
        int, "steps between test-set evaluations", 1, 1_000_000, label="Evaluate every"
    ),
    "probe_size": FieldSpec(
        int, "examples in the fixed probe batch", 2, 10_000, label="Probe batch size"
    ),
    "probe_unit": FieldSpec(
        int, "the unit whose input Fig. 1 follows", 0, 511, label="Fig. 1 unit"
    ),
    "hist_bins": FieldSpec(int, "histogram bins", 10, 200, label="Histogram bins"),
    "hist_range": FieldSpec(
        float,
        "histograms cover [-range, range]",
        0.0,
        100.0,
        low_open=True,
        label="Histogram range",
        widget_low=0.1,
    ),
    "saturation_threshold": FieldSpec(
        float,
        "saturation cut-off",
        0.5,
        1.0,
        low_open=True,
        label="Saturation cut-off",
        widget_low=0.51,
    ),
    "max_points": FieldSpec(int, "points kept per series", 10, 100_000, label="Points kept"),
    "max_histograms": FieldSpec(
        int, "histograms kept per layer", 10, 10_000, label="Histograms kept"
    ),
    # Santurkar et al. (2018): internal covariate shift, noisy BN, landscape probes
    "ics_every": FieldSpec(
        int, "steps between ICS measurements (0: off)", 0, 100_000, label="ICS every"
    ),
    "landscape_every": FieldSpec(
        int, "steps between landscape probes (0: off)", 0, 100_000, label="Landscape every"
    ),
    "landscape_low": FieldSpec(
        float,
        "smallest probe step, in units of lr",
        0.0,
        100.0,
        low_open=True,
        label="Smallest probe step",
        widget_low=0.01,
    ),
    "landscape_high": FieldSpec(
        float,
        "largest probe step, in units of lr",
        0.0,
        100.0,
        low_open=True,
        label="Largest probe step",
        widget_low=0.01,
    ),
    "landscape_points": FieldSpec(
        int, "probe steps along the gradient", 2, 32, label="Probe steps"
    ),
    "bn_noise_shift": FieldSpec(
        float, "noisy BN: each step's mean shift is U(-a, a)", 0.0, 10.0, label="Noise shift"
    ),
    "bn_noise_scale_low": FieldSpec(
        float,
        "noisy BN: each step's scale is U(low, high)",
        0.0,
        10.0,
        label="Noise scale low",
    ),
    "bn_noise_scale_high": FieldSpec(
        float,
        "noisy BN: each step's scale is U(low, high)",
        0.0,
        10.0,
        label="Noise scale high",
    ),
    "bn_noise_shift_spread": FieldSpec(
        float, "noisy BN: per-element shift spread", 0.0, 10.0, label="Noise shift spread"
    ),
    "bn_noise_scale_std": FieldSpec(
        float, "noisy BN: per-element scale std", 0.0, 10.0, label="Noise scale std"
    ),
}
LIVE_FIELDS = ("lr", "momentum", "bn_momentum")
# Cadences of the measures a Trainer is given (bn_core.experiments.measures_for); 0 is off.
MEASURE_CADENCES = ("ics_every", "landscape_every")
_TOP_LEVEL = set(FIELDS) | {"variants"}


@dataclass(frozen=True)
class VariantSpec:
    """One model of a run: a name, its normalization and an optional learning-rate override."""

    name: str
    norm: str
    lr: float | None = None

    @classmethod
    def parse(cls, raw: Any, where: str) -> VariantSpec:
        if isinstance(raw, VariantSpec):
            raw = dataclasses.asdict(raw)
        if isinstance(raw, str):
            if raw not in _SHORTHAND:
                allowed = "allowed: " + ", ".join(_SHORTHAND) + ", or an object {name, norm, lr}"
                raise ConfigError(where, raw, allowed)
            return cls(raw, _SHORTHAND[raw])
        if not isinstance(raw, Mapping):
            raise ConfigError(where, raw, "allowed: a variant name or an object {name, norm, lr}")
        unknown = set(raw) - {"name", "norm", "lr"}
        if unknown:
            key = sorted(unknown)[0]
            raise ConfigError(
                f"{where}.{_key(key)}", raw[key], "unknown key; allowed: name, norm, lr"
            )
        name = raw.get("name")
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise ConfigError(
                f"{where}.name", name, "allowed: 1-32 characters of a-z, 0-9, '_', '-', '.'"
            )
        norm = raw.get("norm", _SHORTHAND.get(name))
        if norm not in NORMS:
            raise ConfigError(f"{where}.norm", norm, "allowed: " + ", ".join(NORMS))
        lr = FIELDS["lr"].check(f"{where}.lr", raw["lr"]) if raw.get("lr") is not None else None
        return cls(name, norm, lr)

    @property
    def uses_bn(self) -> bool:
        """Normalizes with the batch's statistics (a BatchNorm kind)."""
        return self.norm in BATCH_NORMS


_DEFAULT_VARIANTS = (VariantSpec("plain", "none"), VariantSpec("batchnorm", "batchnorm"))


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run. Defaults are Ioffe & Szegedy's Fig. 1 set-up on digits."""

    dataset: str = "digits"
    noise: float = 0.1
    seed: int = 0
    model: str = "mlp"
    depth: int = 3
    width: int = 100
    activation: str = "sigmoid"
    init: str = "gaussian"
    init_std: float = 0.1
    placement: str = "before"
    keep_bias: bool = False
    groups: int = 4
    residual: str = "none"
    variants: tuple[VariantSpec, ...] = field(default=_DEFAULT_VARIANTS)
    batch_size: int = 60
    steps: int = 50_000
    optimizer: str = "sgd"
    lr: float = 0.5
    momentum: float = 0.0
    bn_momentum: float | None = 0.1
    device: str = "auto"
    telemetry_every: int = 10
    eval_every: int = 100
    probe_size: int = 300
    probe_unit: int = 0
    hist_bins: int = 60
    hist_range: float = 8.0
    saturation_threshold: float = 0.97
    max_points: int = 1000
    max_histograms: int = 200
    ics_every: int = 0
    landscape_every: int = 0
    landscape_low: float = 0.5
    landscape_high: float = 4.0
    landscape_points: int = 8
    # Santurkar et al.'s noise: per step and layer mu ~ U(-0.5, 0.5), sigma ~ U(1, 1.25);
    # per element m ~ U(mu - 0.1, mu + 0.1), s ~ N(sigma, 0.1).
    bn_noise_shift: float = 0.5
    bn_noise_scale_low: float = 1.0
    bn_noise_scale_high: float = 1.25
    bn_noise_shift_spread: float = 0.1
    bn_noise_scale_std: float = 0.1

    def __post_init__(self) -> None:
        for name, spec in FIELDS.items():
            object.__setattr__(self, name, spec.check(name, getattr(self, name)))
        object.__setattr__(self, "variants", _parse_variants(self.variants))
        self._check_combinations()

    def layer_channels(self) -> list[int]:
        """The channels (units) of each hidden layer a normalization sees."""
        return [6, 16, 120, 84] if self.model == "lenet" else [self.width] * self.depth

    def _check_combinations(self) -> None:
        if self.batch_size < 2 and any(v.uses_bn for v in self.variants):
            raise ConfigError(
                "batch_size",
                self.batch_size,
                "allowed: at least 2 when a variant uses BatchNorm (the variance of one "
                "example is 0)",
            )
        norms = {v.norm for v in self.variants}
        if "groupnorm" in norms:
            channels = self.layer_channels()
            # A group of one MLP unit holds a single value per example, which normalizes
            # to 0 whatever it was: such a net could not learn.
            fits = [
                g
                for g in _common_divisors(channels)
                if self.model == "lenet" or self.width // g >= 2
            ]
            if self.groups not in fits:
                where = (
                    "LeNet's layers have 6, 16, 120 and 84"
                    if self.model == "lenet"
                    else f"width = {self.width} channels per layer"
                )
                bad = next((c for c in channels if c % self.groups), None)
                why = (
                    f"{self.groups} does not divide {bad}"
                    if bad is not None
                    else f"{self.groups} groups of {self.width // self.groups} leave one unit "
                    "per group, which normalizes to 0"
                )
                raise ConfigError(
                    "groups",
                    self.groups,
                    f"allowed: a group count that divides the channels of every layer "
                    f"GroupNorm normalizes ({where}) into groups of 2 or more, and {why}; "
                    "these do: " + ", ".join(str(g) for g in fits),
                )
        if self.residual != "none" and self.model != "mlp":
            raise ConfigError(
                "residual",
                self.residual,
                "allowed with model = 'lenet': none (skip connections are built for the MLP)",
            )
        if self.model == "lenet" and "rmsnorm" in norms:
            raise ConfigError(
                "variants",
                "rmsnorm",
                "allowed with model = 'lenet': every norm but rmsnorm (it is built for the "
                "MLP's feature vectors)",
            )
        if self.model == "mlp" and self.probe_unit >= self.width:
            raise ConfigError(
                "probe_unit", self.probe_unit, f"allowed: an integer in [0, {self.width - 1}]"
            )
        if self.model == "lenet" and self.probe_unit >= 6:
            raise ConfigError(
                "probe_unit",
                self.probe_unit,
                "allowed: an integer in [0, 5] (LeNet's first layer has 6 channels)",
            )
        if self.landscape_low > self.landscape_high:
            raise ConfigError(
                "landscape_low",
                self.landscape_low,
                f"allowed: at most landscape_high ({self.landscape_high:g})",
            )
        if self.bn_noise_scale_low > self.bn_noise_scale_high:
            raise ConfigError(
                "bn_noise_scale_low",
                self.bn_noise_scale_low,
                f"allowed: at most bn_noise_scale_high ({self.bn_noise_scale_high:g})",
            )
        if self.model == "lenet" and self.dataset not in ("digits", "mnist", "fashion-mnist"):
            raise ConfigError(
                "dataset",
                self.dataset,
                "allowed with model = 'lenet': digits, mnist, fashion-mnist (images)",
            )

    # --- conversions -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any) -> RunConfig:
        """Validate a JSON-like mapping; unknown keys are an error, missing keys take defaults."""
        if not isinstance(data, Mapping):
            raise ConfigError("config", data, "allowed: a JSON object of config fields")
        unknown = sorted(set(data) - _TOP_LEVEL, key=str)
        if unknown:
            key = unknown[0]
            raise ConfigError(
                _key(key), data[key], "unknown field; allowed: " + ", ".join([*FIELDS, "variants"])
            )
        return cls(**dict(data))

    @classmethod
    def from_json(cls, text: str | bytes) -> RunConfig:
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError, RecursionError) as err:
            raise ConfigError(
                "config",
                "<file>",
                f"allowed: a JSON object of config fields (not valid JSON: {err})",
            ) from None
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["variants"] = [
            {k: v for k, v in dataclasses.asdict(s).items() if v is not None} for s in self.variants
        ]
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def replace(self, **changes: Any) -> RunConfig:
        """A validated copy with some fields changed (unknown names are an error)."""
        return RunConfig.from_dict({**self.to_dict(), **changes})

    def setup_differs(self, other: RunConfig) -> list[str]:
        """Fields other than the live ones that differ: changing these needs a reset."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [k for k in mine if k not in LIVE_FIELDS and mine[k] != theirs[k]]


def _parse_variants(raw: Any) -> tuple[VariantSpec, ...]:
    if isinstance(raw, str) or not isinstance(raw, list | tuple):
        raise ConfigError("variants", raw, "allowed: a list of 1 to 8 variants")
    if not 1 <= len(raw) <= 8:
        raise ConfigError("variants", list(raw), "allowed: a list of 1 to 8 variants")
    specs = tuple(VariantSpec.parse(v, f"variants[{i}]") for i, v in enumerate(raw))
    names = [s.name for s in specs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ConfigError("variants", names, f"allowed: distinct names ('{dup}' repeats)")
    return specs


# --- presets -----------------------------------------------------------------------------
def list_presets(preset_dir: Path = PRESET_DIR) -> dict[str, dict[str, str]]:
    """name -> {"title", "description"} for every preset file, sorted by name."""
    out = {}
    for path in sorted(preset_dir.glob("*.json")):
        meta = json.loads(path.read_text())
        out[path.stem] = {"title": meta["title"], "description": meta["description"]}
    return out


def load_preset(name: str, preset_dir: Path = PRESET_DIR) -> RunConfig:
    path = preset_dir / f"{name}.json"
    if not re.fullmatch(r"[a-z0-9\-]+", name) or not path.is_file():
        names = ", ".join(list_presets(preset_dir)) or "(none found)"
        raise ConfigError("preset", name, f"allowed: {names}")
    return RunConfig.from_dict(json.loads(path.read_text())["config"])


# --- shareable links -----------------------------------------------------------------------
def to_query(config: RunConfig, preset: str) -> dict[str, str]:
    """The URL query parameters of a config: its preset plus every field that differs."""
    base = load_preset(preset).to_dict()
    params = {"preset": preset}
    for name, value in config.to_dict().items():
        if value == base[name]:
            continue
        if name == "variants":
            value = ",".join(_variant_token(VariantSpec(**v)) for v in value)
        elif isinstance(value, bool):
            value = "true" if value else "false"
        elif value is None:
            value = "none"
        params[name] = str(value)
    return params


def _variant_token(spec: VariantSpec) -> str:
    """A variant in a link: its bare name, or name:norm[:lr] when it is not a shorthand."""
    if spec.lr is None and _SHORTHAND.get(spec.name) == spec.norm:
        return spec.name
    return f"{spec.name}:{spec.norm}" + ("" if spec.lr is None else f":{spec.lr:g}")


def _parse_variant_token(token: str) -> Any:
    name, _, rest = token.partition(":")
    if not rest:
        return name
    norm, _, lr = rest.partition(":")
    spec: dict[str, Any] = {"name": name, "norm": norm}
    if lr:
        try:
            spec["lr"] = float(lr)
        except ValueError:
            spec["lr"] = lr  # RunConfig names the field and the allowed range
    return spec


def _parse_query_value(name: str, text: str) -> Any:
    if name == "variants":
        return [_parse_variant_token(p.strip()) for p in text.split(",") if p.strip()]
    spec = FIELDS[name]
    if spec.nullable and text.lower() in ("none", "null"):
        return None
    if spec.kind is bool:
        lowered = text.lower()
        return {"true": True, "1": True, "false": False, "0": False}.get(lowered, text)
    if spec.kind in (int, float):
        try:
            number = float(text)
        except ValueError:
            return text  # RunConfig names the field and the allowed range
        return int(number) if spec.kind is int and number.is_integer() else number
    return text


def from_query(
    params: Mapping[str, str | list[str]], default_preset: str
) -> tuple[RunConfig, str, list[str]]:
    """(config, preset, warnings) from URL query parameters.

    A bad or unknown parameter never stops the page: it is named in a warning and the
    preset's value is used instead.
    """
    warnings: list[str] = []
    flat = {k: (v[-1] if isinstance(v, list) else v) for k, v in params.items()}
    preset = flat.pop("preset", default_preset)
    try:
        config = load_preset(preset)
    except ConfigError as err:
        warnings.append(f"Link parameter ignored: {err}")
        preset, config = default_preset, load_preset(default_preset)
    for name, text in flat.items():
        if name not in _TOP_LEVEL:
            warnings.append(
                f"Link parameter ignored: {_key(name)} = {_show(text)}: unknown parameter; "
                "allowed: " + ", ".join(["preset", *FIELDS, "variants"])
            )
            continue
        try:
            config = config.replace(**{name: _parse_query_value(name, text)})
        except ConfigError as err:
            warnings.append(f"Link parameter ignored, the preset's value is used: {err}")
    return config, preset, warnings
