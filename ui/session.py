"""Per-browser-session state for the pages: the run, its widgets, and what they mean.

Each session owns its own Trainer in ``st.session_state``; nothing per-user lives in a
global cache. Set-up widgets are turned into a RunConfig here, validated by bn_core, and
only applied by an explicit Reset; live widgets act on the running trainer from its next
step. Either way the widgets only ask: the page's Player (``ui/player.py``) applies.
"""

from __future__ import annotations

from typing import Any

import streamlit as st

from bn_core.claims import ClaimBook, load_claims
from bn_core.config import (
    FIELDS,
    NORMS,
    ConfigError,
    RunConfig,
    from_query,
    list_presets,
    load_preset,
    to_query,
)
from bn_core.data import DatasetUnavailable
from bn_core.experiments import make_trainer
from bn_core.train import DeviceUnavailable
from ui.player import Player

DEFAULT_PRESET = "ioffe-fig1"
MAX_CONFIG_BYTES = 64 * 1024  # a config is about 1 KB; anything far larger is not one
# Log-spaced 1-2-3-5 grid, 1e-4 .. 10, so the slider moves by ratios, not by 0.01s.
LR_CHOICES = sorted(
    {round(m * 10.0**e, 6) for e in range(-4, 2) for m in (1, 2, 3, 5) if m * 10.0**e <= 10}
)
BN_MOMENTUM_CHOICES = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
VARIANT_CHOICES = [
    "plain",
    "batchnorm",
    "batchnorm-naive",
    "batchnorm-torch",
    "batchnorm-noisy",
    "layernorm",
    "groupnorm",
    "rmsnorm",
]
VARIANT_HELP = {"plain": NORMS["none"], **{k: NORMS[k] for k in VARIANT_CHOICES[1:]}}
# The set-up fields a widget edits; the rest of a RunConfig comes from the preset.
SETUP_FIELDS = (
    "dataset",
    "noise",
    "model",
    "depth",
    "width",
    "activation",
    "init",
    "init_std",
    "variants",
    "placement",
    "keep_bias",
    "groups",
    "residual",
    "batch_size",
    "seed",
    "device",
)
LIVE_WIDGETS = {"lr": "w_lr", "momentum": "w_momentum", "bn_momentum": "w_bn_momentum"}
JUMP_FACTOR = 20  # the "×20 now" button: 0.5 straight to 10, the learning-rate lesson
# The live page's views: label -> chart, whose name is the view's value in a link.
LIVE_VIEWS = {
    "Fig. 1 percentiles": "percentile_bands",
    "Distributions": "preact_heatmaps",
    "Saturation": "saturation",
    "Gradient norms": "grad_norms",
    "Update ratio": "update_ratio",
}
DEFAULT_VIEW = "Fig. 1 percentiles"


def _with_choice(choices: list[float], value: float | None) -> list:
    if value in choices:
        return choices
    if value is None:  # BN momentum None: PyTorch's cumulative average, shown first
        return [None, *choices]
    return sorted([*choices, value])


def format_rate(value: float | None) -> str:
    return "cumulative (None)" if value is None else f"{value:g}"


def lr_choices(current: float) -> list[float]:
    return _with_choice(LR_CHOICES, current)


def bn_momentum_choices(current: float | None) -> list[float]:
    return _with_choice(BN_MOMENTUM_CHOICES, current)


def state() -> Any:
    """The session's state, initialised on first use with the default preset."""
    ss = st.session_state
    if "trainer" not in ss:
        # A shared link carries its set-up in the query string; a bad part is named and
        # replaced by the preset's value, so the page always loads.
        params = st.query_params.to_dict()
        view, layer = params.pop("view", None), params.pop("layer", None)
        config, preset, warnings = from_query(params, DEFAULT_PRESET)
        try:
            trainer = make_trainer(config)
        except DeviceUnavailable as err:
            # Keep the rest of the link; only the device this machine lacks falls back.
            warnings.append(f"Link parameter ignored, device auto is used: {err}")
            config = config.replace(device="auto")
            trainer = make_trainer(config)
        except (ConfigError, DatasetUnavailable) as err:
            warnings.append(f"The linked set-up could not start ({err}); using {preset}.")
            config = load_preset(preset)
            trainer = make_trainer(config)
        ss.preset = preset
        ss.preset_live = {}
        ss.run_claims = ClaimBook(load_claims(preset))
        ss.base_config = config
        ss.playing = False
        ss.w_view = DEFAULT_VIEW
        warnings += _restore_view(view, layer, trainer.model.layer_names)
        ss.message = ("warning", "\n\n".join(warnings)) if warnings else None
        _fill_widgets(config)
        ss.trainer = trainer
    return ss


def _restore_view(view: str | None, layer: str | None, layers: list[str]) -> list[str]:
    """The view and layer a link names, into their widgets; warnings for bad ones."""
    ss = st.session_state
    warnings = []
    by_chart = {chart: label for label, chart in LIVE_VIEWS.items()}
    if view is not None:
        if view in by_chart:
            ss.w_view = by_chart[view]
        else:
            warnings.append(
                f"Link parameter ignored: view = {view!r}: allowed: " + ", ".join(by_chart)
            )
    if layer is not None:
        if layer in layers:
            ss.w_layer = layer
        else:
            warnings.append(
                f"Link parameter ignored: layer = {layer!r}: allowed: " + ", ".join(layers)
            )
    return warnings


def sync_url() -> None:
    """Keep the address bar a shareable link to the set-up and live settings shown."""
    ss = st.session_state
    try:
        config = config_from_widgets()
    except ConfigError:
        config = ss.trainer.config.replace(**ss.trainer.live)
    params = to_query(config, ss.preset)
    # The view and layer on screen, where they are not the page's defaults.
    view = LIVE_VIEWS.get(ss.get("w_view"), LIVE_VIEWS[DEFAULT_VIEW])
    if view != LIVE_VIEWS[DEFAULT_VIEW]:
        params["view"] = view
    layers = ss.trainer.model.layer_names
    if ss.get("w_layer") in layers and ss.w_layer != layers[-1]:
        params["layer"] = ss.w_layer
    if st.query_params.to_dict() != params:
        st.query_params.from_dict(params)


def load_uploaded_config(data: bytes) -> bool:
    """Restore a run from an uploaded config JSON; a bad file leaves the current run as is.
    A restart for the Player: True if a fresh run started."""
    ss = st.session_state
    if len(data) > MAX_CONFIG_BYTES:
        ss.message = (
            "error",
            f"config file = {len(data):,} bytes: allowed: at most {MAX_CONFIG_BYTES:,} bytes. "
            "The current run is kept.",
        )
        return False
    try:
        config = RunConfig.from_json(data)  # JSON only: never pickle, never eval
        trainer = make_trainer(config)
    except (ConfigError, DatasetUnavailable) as err:
        ss.message = ("error", f"That file was not loaded, the current run is kept. {err}")
        return False
    ss.base_config = config
    _fill_widgets(config)
    ss.trainer = trainer
    ss.run_claims = ClaimBook([])  # a config file carries no claims about its outcome
    ss.message = ("success", "Loaded the uploaded config and started a fresh run with it.")
    return True


def _fill_widgets(config: RunConfig, *, live: bool = True) -> None:
    ss = st.session_state
    for name in SETUP_FIELDS:
        value = getattr(config, name)
        if name == "variants":
            value = [v.name for v in config.variants]
        ss[f"w_{name}"] = value
    ss.preset_live = {}
    if live:
        for name, key in LIVE_WIDGETS.items():
            ss[key] = getattr(config, name)


def config_from_widgets() -> RunConfig:
    """The run the widgets describe; raises ConfigError naming the bad field."""
    ss = st.session_state
    changes = {name: ss[f"w_{name}"] for name in SETUP_FIELDS}
    changes.update({name: ss[key] for name, key in LIVE_WIDGETS.items()})
    changes.update(ss.get("preset_live") or {})  # a picked preset's, until Reset
    if not changes["variants"]:
        raise ConfigError("variants", [], "allowed: pick at least one variant")
    # A variant of a loaded config or link (its own name, norm or lr) keeps its spec.
    known = {spec.name: spec for spec in ss.base_config.variants}
    changes["variants"] = [known.get(name, name) for name in changes["variants"]]
    return ss.base_config.replace(**changes)


VARIANTS_LABEL = "Variants"  # variants is a list of specs, not a FIELDS entry
# How the page names a field in its notices: the widget's label, from the field table.
FIELD_LABELS = {**{name: spec.label for name, spec in FIELDS.items()}, "variants": VARIANTS_LABEL}


def pending_changes() -> tuple[RunConfig | None, list[str], str | None]:
    """(config from widgets, fields that differ from the run, error message).

    The fields are the set-up's, and the live settings of a picked preset that wait for
    Reset with it.
    """
    ss = st.session_state
    try:
        wanted = config_from_widgets()
    except ConfigError as err:
        return None, [], str(err)
    differs = wanted.setup_differs(ss.trainer.config)
    differs += [
        name
        for name in ss.get("preset_live") or {}
        if getattr(wanted, name) != ss.trainer.live[name]
    ]
    return wanted, differs, None


def _show(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ", ".join(map(str, value)) or "none"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def custom_changes() -> list[str]:
    """The set-up fields in the sidebar that differ from the loaded preset, each as
    "Hidden layers 3 → 2"; empty while the sidebar shows the preset as it is."""
    ss = st.session_state
    preset = load_preset(ss.preset)
    out = []
    for name in SETUP_FIELDS:
        was = getattr(preset, name)
        if name == "variants":
            was = [v.name for v in preset.variants]
        now = ss[f"w_{name}"]
        if now != was:
            out.append(f"{FIELD_LABELS[name]} {_show(was)} → {_show(now)}")
    return out


# --- actions (widget callbacks record them; the Player applies) ----------------------------
SETUP_RULE = (
    "Changes here wait for **Reset**, so a run is never restarted by surprise; so does a "
    "picked preset, whose Reset brings its learning rate and momenta too."
)


def on_preset() -> None:
    """Load a preset into the set-up widgets. Like any set-up change it waits for Reset,
    and so do its live settings: the live sliders keep acting on the running run."""
    ss = st.session_state
    config = load_preset(ss.w_preset)
    ss.preset = ss.w_preset
    ss.base_config = config
    _fill_widgets(config, live=False)
    ss.preset_live = {name: getattr(config, name) for name in LIVE_WIDGETS}


def on_live(player: Player, name: str) -> None:
    """A live slider moved: checked, then asked of the Player for the next step."""
    ss = st.session_state
    value = ss[LIVE_WIDGETS[name]]
    try:
        FIELDS[name].check(name, value)
    except ConfigError as err:
        ss.message = ("error", str(err))
        ss[LIVE_WIDGETS[name]] = ss.trainer.live[name]
        return
    # Moved after a preset was picked: the slider is the later choice, so Reset keeps it.
    ss.preset_live.pop(name, None)
    player.wish_live(name, value)


def jump_lr(player: Player) -> None:
    """The learning rate times JUMP_FACTOR (at most the slider's top) in one change."""
    ss = st.session_state
    value = min(float(f"{ss.w_lr * JUMP_FACTOR:.6g}"), LR_CHOICES[-1])  # 0.3 * 20 is 6.000…1
    ss.w_lr = value
    ss.preset_live.pop("lr", None)
    player.wish_live("lr", value, jump=True)


def reset() -> bool:
    """Start a fresh run from the widgets; a run that cannot start leaves the old one intact.
    A restart for the Player: True if a fresh run started."""
    ss = st.session_state
    try:
        config = config_from_widgets()
        trainer = make_trainer(config)
    except (ConfigError, DatasetUnavailable) as err:
        ss.message = ("error", f"Reset not applied, the current run is kept. {err}")
        return False
    ss.trainer = trainer
    ss.run_claims = ClaimBook(load_claims(ss.preset))
    for name, key in LIVE_WIDGETS.items():  # a picked preset's live settings now show
        ss[key] = getattr(config, name)
    ss.preset_live = {}
    ss.message = ("success", "Started a fresh run with the set-up shown in the sidebar.")
    return True


def show_message() -> None:
    """The pending message, once. The slot is drawn even when empty, so the elements
    below keep their places from run to run (a live fragment's place must not move)."""
    ss = st.session_state
    slot = st.empty()
    if ss.get("message"):
        kind, text = ss.message
        getattr(slot, kind)(text)
        ss.message = None


def preset_label(name: str) -> str:
    return list_presets()[name]["title"]


def variant_options() -> list[str]:
    """The built-in variants plus any a loaded config or link brought along."""
    extra = [v.name for v in st.session_state.base_config.variants]
    return list(dict.fromkeys([*VARIANT_CHOICES, *extra]))
