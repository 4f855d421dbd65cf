"""Per-browser-session state for the pages: the run, its widgets, and what they mean.

Each session owns its own Trainer in ``st.session_state``; nothing per-user lives in a
global cache. Set-up widgets are turned into a RunConfig here, validated by bn_core, and
only applied by an explicit Reset; live widgets act on the running trainer at once.
"""

from __future__ import annotations

from typing import Any

import streamlit as st

from bn_core.claims import ClaimBook, load_claims
from bn_core.config import (
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
        config, preset, warnings = from_query(st.query_params.to_dict(), DEFAULT_PRESET)
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
        ss.run_claims = ClaimBook(load_claims(preset))
        ss.base_config = config
        ss.playing = False
        ss.message = ("warning", "\n\n".join(warnings)) if warnings else None
        _fill_widgets(config)
        ss.trainer = trainer
    return ss


def sync_url() -> None:
    """Keep the address bar a shareable link to the set-up and live settings shown."""
    ss = st.session_state
    try:
        config = config_from_widgets()
    except ConfigError:
        config = ss.trainer.config.replace(**ss.trainer.live)
    params = to_query(config, ss.preset)
    if st.query_params.to_dict() != params:
        st.query_params.from_dict(params)


def load_uploaded_config(data: bytes) -> None:
    """Restore a run from an uploaded config JSON; a bad file leaves the current run as is."""
    ss = st.session_state
    if len(data) > MAX_CONFIG_BYTES:
        ss.message = (
            "error",
            f"config file = {len(data):,} bytes: allowed: at most {MAX_CONFIG_BYTES:,} bytes. "
            "The current run is kept.",
        )
        return
    try:
        config = RunConfig.from_json(data)  # JSON only: never pickle, never eval
        trainer = make_trainer(config)
    except (ConfigError, DatasetUnavailable) as err:
        ss.message = ("error", f"That file was not loaded, the current run is kept. {err}")
        return
    ss.base_config = config
    _fill_widgets(config)
    ss.trainer = trainer
    ss.run_claims = ClaimBook([])  # a config file carries no claims about its outcome
    ss.playing = False
    ss.message = ("success", "Loaded the uploaded config and started a fresh run with it.")


def _fill_widgets(config: RunConfig) -> None:
    ss = st.session_state
    for name in SETUP_FIELDS:
        value = getattr(config, name)
        if name == "variants":
            value = [v.name for v in config.variants]
        ss[f"w_{name}"] = value
    for name, key in LIVE_WIDGETS.items():
        ss[key] = getattr(config, name)


def config_from_widgets() -> RunConfig:
    """The run the widgets describe; raises ConfigError naming the bad field."""
    ss = st.session_state
    changes = {name: ss[f"w_{name}"] for name in SETUP_FIELDS}
    changes.update({name: ss[key] for name, key in LIVE_WIDGETS.items()})
    if not changes["variants"]:
        raise ConfigError("variants", [], "allowed: pick at least one variant")
    # A variant of a loaded config or link (its own name, norm or lr) keeps its spec.
    known = {spec.name: spec for spec in ss.base_config.variants}
    changes["variants"] = [known.get(name, name) for name in changes["variants"]]
    return ss.base_config.replace(**changes)


FIELD_LABELS = {
    "dataset": "Data set",
    "noise": "Data noise",
    "model": "Model",
    "depth": "Hidden layers",
    "width": "Units per layer",
    "activation": "Activation",
    "init": "Init",
    "init_std": "Init std",
    "variants": "Variants",
    "placement": "BN placement",
    "keep_bias": "Keep the linear bias",
    "groups": "GroupNorm groups",
    "residual": "Skip connections",
    "batch_size": "Batch size",
    "seed": "Seed",
    "device": "Device",
}


def pending_changes() -> tuple[RunConfig | None, list[str], str | None]:
    """(config from widgets, set-up fields that differ from the run, error message)."""
    try:
        wanted = config_from_widgets()
    except ConfigError as err:
        return None, [], str(err)
    return wanted, wanted.setup_differs(st.session_state.trainer.config), None


# --- actions (used as widget callbacks, so they run before the page draws) ---------------
def on_preset() -> None:
    """Load a preset into the widgets; like any set-up change it waits for Reset."""
    ss = st.session_state
    config = load_preset(ss.w_preset)
    ss.preset = ss.w_preset
    ss.base_config = config
    _fill_widgets(config)


def on_live(name: str) -> None:
    ss = st.session_state
    try:
        ss.trainer.set_live(**{name: ss[LIVE_WIDGETS[name]]})
    except ConfigError as err:
        ss.message = ("error", str(err))
        ss[LIVE_WIDGETS[name]] = ss.trainer.live[name]


def reset() -> None:
    """Start a fresh run from the widgets; a run that cannot start leaves the old one intact."""
    ss = st.session_state
    try:
        config = config_from_widgets()
        trainer = make_trainer(config)
    except (ConfigError, DatasetUnavailable) as err:
        ss.message = ("error", f"Reset not applied, the current run is kept. {err}")
        return
    ss.trainer = trainer
    ss.run_claims = ClaimBook(load_claims(ss.preset))
    ss.playing = False
    ss.message = ("success", "Started a fresh run with the set-up shown in the sidebar.")


def set_playing(on: bool) -> None:
    """Play or pause. It sets the state the button showed rather than toggling, so a
    click the browser delivers twice cannot undo itself."""
    ss = st.session_state
    ss.playing = on and not ss.trainer.finished


def step_once(at_step: int) -> None:
    """One step from the step the button was drawn at; a repeated click does nothing."""
    ss = st.session_state
    ss.playing = False
    if ss.trainer.step == at_step:
        ss.trainer.advance(steps=1)


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
