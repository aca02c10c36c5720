"""Typed run configuration, validated at the edge.

One `RunConfig` describes a training run for `efmuon simulate`, `run`, `server` and `worker`.
It is filled, in increasing priority, from: the dataclass defaults, the task's recommended
settings (`Task.defaults`, for fields left as None), a TOML file (`--config`), and flags.
Unknown keys and bad values raise `ConfigError` naming the key and the allowed values.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import ConfigError
from .links import parse_link, parse_link_mix

# The values the config accepts for `task` and `preset` (common.tasks.TASKS and common.lmo.PRESETS name
# the same; tests/test_tasks.py checks that they agree). Spelled here so that building the command line
# (`efmuon --help`) needs no torch.
TASKS = ("lsq", "digits", "gpt-char", "gpt", "gpt-moe")
PRESETS = ("muon", "scion", "gluon", "muonmax", "muonmax-momo", "adamw")

METHODS = ("ef21", "ef14")
SCHEDULES = ("constant", "cosine", "linear")
INITS = ("grad", "zero")
EF14_VARIANTS = ("classic", "airbench")
DEVICES = ("cpu", "cuda", "auto")
NS_COEFFS = ("jordan", "polar_express")
SHAPINGS = ("inproc", "netns")

# The embedded default pairing, the best of `efmuon bench bytes` (BENCHMARKS.md, "bytes"): dense
# low-bit values beat sparsification under EF21-Muon: a sparse estimator leaves most entries stale
# for many rounds and the LMO (polar / sign) weighs every entry, so topk / rankk lose more rounds
# than their bytes save (topk:0.1 both ways: 2.7x). Uplink 3 bits per entry (+ an fp32 scale per 256),
# downlink 1 bit per entry (+ an fp32 scale per 256): ~11.6x fewer bytes than identity to the same
# gpt-char validation loss (with the task's lr 0.075 / beta 0.3, for both; 10.5x at the former 0.05 / 0.15).
DEFAULT_UPLINK = "quant:3:256"
DEFAULT_DOWNLINK = "sign:256"


@dataclass
class RunConfig:
    """Everything that determines a run. Fields set to None take the task's recommended value."""

    # --- what to train
    task: str = "gpt-char"  # a built-in task; with `model` set, the model's spec (resolve fills it in)
    model: str | None = None  # a user's model: 'package.module:factory' (common.usermodel); replaces `task`
    task_options: dict = field(default_factory=dict)
    workers: int = 4
    rounds: int | None = None
    seed: int = 0
    # --- the algorithm (docs/design.md §1)
    method: str = "ef21"
    preset: str | None = None
    lr: float | None = None
    beta: float | None = None  # weight of the NEW gradient in the momentum (Scion convention)
    schedule: str | None = None
    warmup: int | None = None
    weight_decay: float = 0.0
    init: str = "grad"  # G_j = M_j = g_j(X_0) sent uncompressed once ('grad'), or G_j = M_j = 0 ('zero')
    ns_steps: int = 5
    ns_coeffs: str = "jordan"
    lr_mult: dict = field(default_factory=dict)  # {norm: multiplier}, e.g. {"sign": 4.0}
    norms: dict = field(default_factory=dict)  # {param-name pattern: norm[:scale_rule]}
    gluon_l0: float = 1.0
    gluon_l1: float = 1.0
    f_star: float = 0.0  # muonmax-momo: the lower bound F* of the loss that the Momo truncation uses
    ef14_variant: str = "classic"
    ef14_bits: int = 8
    ef14_decay: float = 0.9
    adam_beta1: float = 0.9  # preset 'adamw' (Adam on the aggregate G, no LMO): first-moment decay
    adam_beta2: float = 0.95  # second-moment decay
    adam_eps: float = 1e-8
    # --- compression (docs/design.md §2)
    uplink: str = DEFAULT_UPLINK
    downlink: str = DEFAULT_DOWNLINK
    uplink_layers: dict = field(default_factory=dict)  # {param-name pattern: spec}
    downlink_layers: dict = field(default_factory=dict)
    # --- execution
    device: str = "cpu"
    threads: int = 1
    lmo_threads: int = 0  # torch threads for the server's Newton-Schulz; 0 = lmo.lmo_threads (all cores for >= 1 GFLOP)
    eval_every: int | None = None  # rounds between loss evaluations (None: the task's, 1 for small tasks)
    log_every: int = 10
    report: str | None = None
    metrics: str | None = None  # JSONL stream, one line per round
    plots: str | None = None  # directory for PNG plots (None: the report's directory; "none": no plots)
    # --- federated simulation (docs/design.md §6; efmuon.simulate.federated, common.federation). Any of
    # these set switches `simulate` into federated mode; all None keeps the synchronous path.
    clients: int | None = None  # n clients (overrides `workers` as n)
    participation: float | None = None  # fraction of the n clients sampled per round, in (0, 1]
    link: str | None = None  # one link profile for every client: a preset or 'up=10mbit,down=50mbit,delay=20ms'
    link_mix: Any = None  # {preset: weight} or 'dsl=0.3,lte=0.5,wifi=0.2': each client draws a preset
    link_trace: str | None = None  # CSV of per-client links: client,up_bps,down_bps,delay_ms[,jitter_ms]
    deadline: float | None = None  # simulated round deadline (s): slower sampled clients are dropped
    compute_scale: str | None = None  # per-client speed factor: a number, 'lognormal:SIGMA' or 'uniform:LO:HI'
    compute_seconds: float | None = None  # simulated gradient time per round (None: measured in this process)
    adaptive_deadline: float | None = None  # K: round deadline = median + K * MAD of recent client times (<= deadline)
    links: dict = field(default_factory=dict)  # {client id: link profile}: per-client links, over link/link_mix/link_trace
    # --- `efmuon run` link emulation: 'inproc' (the worker's relay shapes; default when a link is given)
    # or 'netns' (network namespaces + tc tbf, needs root); see efmuon.server.netns
    shaping: str | None = None
    # the server's own link under shaping 'netns' (a profile; up = towards the server): default the clients' link
    # when they all share one (`link`), else unshaped
    server_link: str | None = None

    # ------------------------------------------------------------------ helpers
    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)


def from_mapping(data: dict[str, Any], base: RunConfig | None = None, where: str = "config") -> RunConfig:
    """Overlay `data` on `base`, rejecting unknown keys with the list of valid ones."""
    base = base or RunConfig()
    valid = set(RunConfig.keys())
    unknown = sorted(k for k in data if k not in valid)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys are: {', '.join(sorted(valid))}"
        )
    data = {k.replace("-", "_"): v for k, v in data.items()}
    if data.get("model") is not None:
        if "task" in data and data["task"] != data["model"]:
            raise ConfigError(f"{where}: give either task ({data['task']!r}) or model ({data['model']!r}), not both: "
                              f"a model from your own module replaces the built-in task")
        data["task"] = data["model"]  # a model given here replaces a task of the base (flags over the file)
    elif "task" in data and base.model is not None and data["task"] != base.model:
        data["model"] = None  # a built-in task given here replaces the base's model
    cfg = dataclasses.replace(base, **data)
    validate(cfg)
    return cfg


def load_toml(path: str, base: RunConfig | None = None) -> RunConfig:
    """Read a TOML config file. Top-level keys are RunConfig fields; tables give the dict fields."""
    try:
        import tomllib  # lazy: read only for --config
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]  # lazy: an optional backport, for --config only
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path!r} is not valid TOML: {exc}") from None
    data = {k.replace("-", "_"): v for k, v in data.items()}
    return from_mapping(data, base, where=path)


def check_model_spec(spec: Any) -> tuple[str, str]:
    """'package.module:factory' -> (module, attribute), or ConfigError saying how it is spelt (no import)."""
    how = "spell it package.module:factory, e.g. --model mymodels.cnn:make (a module importable here, a colon, " \
          "a function in it)"
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ConfigError(f"model={spec!r} is not module:factory; {how}")
    module, attr = (s.strip() for s in spec.split(":"))
    if not module or not attr or not all(p.isidentifier() for p in module.split(".")) \
            or not all(a.isidentifier() for a in attr.split(".")):
        raise ConfigError(f"model={spec!r} is not module:factory; {how}")
    return module, attr


def _choice(name: str, value, allowed) -> None:
    if value is not None and value not in allowed:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of: {', '.join(allowed)}")


def _positive(name: str, value, allow_zero: bool = False, integer: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name}={value!r} must be a number")
    if integer and not float(value).is_integer():
        raise ConfigError(f"{name}={value!r} must be a whole number")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name}={value!r} must be {'>= 0' if allow_zero else '> 0'} and finite")


def validate(cfg: RunConfig) -> RunConfig:
    """Check every field; raise ConfigError naming the field and the allowed values."""
    if cfg.model is not None:
        check_model_spec(cfg.model)
        if cfg.task != cfg.model:
            _choice("task", cfg.task, TASKS)  # a RunConfig(model=...) built in Python: resolve sets task = model
    else:
        _choice("task", cfg.task, TASKS)
    _choice("method", cfg.method, METHODS)
    _choice("preset", cfg.preset, PRESETS)
    _choice("schedule", cfg.schedule, SCHEDULES)
    _choice("init", cfg.init, INITS)
    _choice("ef14_variant", cfg.ef14_variant, EF14_VARIANTS)
    _choice("device", cfg.device, DEVICES)
    _choice("ns_coeffs", cfg.ns_coeffs, NS_COEFFS)
    _positive("workers", cfg.workers, integer=True)
    _positive("rounds", cfg.rounds, integer=True)
    _positive("seed", cfg.seed, allow_zero=True, integer=True)
    _positive("lr", cfg.lr, allow_zero=True)
    _positive("warmup", cfg.warmup, allow_zero=True, integer=True)
    _positive("weight_decay", cfg.weight_decay, allow_zero=True)
    _positive("ns_steps", cfg.ns_steps, integer=True)
    _positive("threads", cfg.threads, integer=True)
    _positive("lmo_threads", cfg.lmo_threads, allow_zero=True, integer=True)
    _positive("eval_every", cfg.eval_every, integer=True)
    _positive("log_every", cfg.log_every, integer=True)
    _positive("gluon_l0", cfg.gluon_l0, allow_zero=True)
    _positive("gluon_l1", cfg.gluon_l1, allow_zero=True)
    if not isinstance(cfg.f_star, (int, float)) or isinstance(cfg.f_star, bool) or not math.isfinite(cfg.f_star):
        raise ConfigError(f"f_star={cfg.f_star!r} must be a finite number (a lower bound of the training loss; 0 for "
                          "a non-negative loss)")
    if cfg.gluon_l0 == 0 and cfg.gluon_l1 == 0:
        raise ConfigError("gluon_l0 and gluon_l1 cannot both be 0 (the Gluon step t = ||G||_*/(L0 + L1||G||_*) would divide by zero)")
    if cfg.beta is not None:
        _positive("beta", cfg.beta)
        if cfg.beta > 1:
            raise ConfigError(f"beta={cfg.beta!r} must be in (0, 1]: it weights the new gradient (1 = no momentum)")
    if cfg.ef14_bits not in (4, 8, 16, 32):
        raise ConfigError(f"ef14_bits={cfg.ef14_bits!r} is not valid; choose one of: 4, 8, 16, 32")
    if not 0 <= cfg.ef14_decay < 1:
        raise ConfigError(f"ef14_decay={cfg.ef14_decay!r} must be in [0, 1)")
    for name in ("adam_beta1", "adam_beta2"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
            raise ConfigError(f"{name}={v!r} must be a number in [0, 1)")
    _positive("adam_eps", cfg.adam_eps)
    for name in ("task_options", "lr_mult", "norms", "uplink_layers", "downlink_layers", "links"):
        if not isinstance(getattr(cfg, name), dict):
            raise ConfigError(f"{name} must be a table (mapping), got {type(getattr(cfg, name)).__name__}")
    _validate_federated(cfg)
    for name in ("uplink", "downlink"):
        if not isinstance(getattr(cfg, name), str) or not getattr(cfg, name):
            raise ConfigError(f"{name} must be a compressor spec string such as 'topk:0.1'")
    # Compressor specs are checked by parsing them (the parser names the valid forms).
    from .compress import parse_spec  # lazy: the codecs need torch; `efmuon --help` builds flags without it

    for spec in [cfg.uplink, cfg.downlink, *cfg.uplink_layers.values(), *cfg.downlink_layers.values()]:
        parse_spec(spec)
    return cfg


def _validate_federated(cfg: RunConfig) -> None:
    _positive("clients", cfg.clients, integer=True)
    _positive("deadline", cfg.deadline)
    _positive("compute_seconds", cfg.compute_seconds, allow_zero=True)
    _positive("adaptive_deadline", cfg.adaptive_deadline, allow_zero=True)
    if cfg.participation is not None:
        _positive("participation", cfg.participation)
        if cfg.participation > 1:
            raise ConfigError(f"participation={cfg.participation!r} must be in (0, 1]: the fraction of clients sampled per round")
    for name in ("plots", "link", "link_trace", "compute_scale"):
        v = getattr(cfg, name)
        if v is not None and (not isinstance(v, str) or not v.strip()):
            raise ConfigError(f"{name}={v!r} must be a non-empty string")
    given = [name for name in ("link", "link_mix", "link_trace") if getattr(cfg, name) is not None]
    if len(given) > 1:
        raise ConfigError(f"give at most one of link, link_mix, link_trace (got {', '.join(given)})")
    if cfg.link is not None:
        parse_link(cfg.link)
    _choice("shaping", cfg.shaping, SHAPINGS)
    if cfg.server_link is not None:
        if not isinstance(cfg.server_link, str) or not cfg.server_link.strip():
            raise ConfigError(f"server_link={cfg.server_link!r} must be a link profile (a preset or 'up=..,down=..')")
        parse_link(cfg.server_link)
    if isinstance(cfg.links, dict):
        for key, spec in cfg.links.items():
            try:
                ok = int(str(key)) >= 0
            except ValueError:
                ok = False
            if not ok:
                raise ConfigError(f"links: key {key!r} is not a client id (0, 1, ...); write e.g. [links] 0 = \"dsl\"")
            if not isinstance(spec, str):
                raise ConfigError(f"links.{key}={spec!r} must be a link spec string such as 'lte' or 'up=10mbit,delay=20ms'")
            parse_link(spec)
    if cfg.link_mix is not None:
        parse_link_mix(cfg.link_mix)
    if cfg.compute_scale is not None:
        parse_compute_scale(cfg.compute_scale)


def resolve(cfg: RunConfig, task_defaults: dict) -> RunConfig:
    """Fill the fields left as None from the task's recommended settings."""
    fill = {}
    if (cfg.preset or task_defaults.get("preset")) == "adamw":
        # a task's Muon settings (lr, lr_mult) do not suit Adam: its `adamw` table overrides them
        task_defaults = {**task_defaults, "lr": 1e-3, "beta": 1.0, "lr_mult": {},
                         **task_defaults.get("adamw", {})}
    generic = {"rounds": 100, "preset": "muon", "lr": 0.02, "beta": 0.1, "schedule": "cosine", "warmup": 0,
               "eval_every": 1}
    for key, fallback in generic.items():
        if getattr(cfg, key) is None:
            fill[key] = task_defaults.get(key, fallback)
    if not cfg.lr_mult and task_defaults.get("lr_mult"):
        fill["lr_mult"] = dict(task_defaults["lr_mult"])
    if cfg.model is not None and cfg.task != cfg.model:
        fill["task"] = cfg.model  # the run is reported under the user's model, never a built-in task's name
    out = dataclasses.replace(cfg, **fill)
    validate(out)
    if out.warmup >= out.rounds:
        raise ConfigError(f"warmup={out.warmup} must be smaller than rounds={out.rounds}")
    return out

def parse_compute_scale(spec: str | float | None) -> tuple:
    """'1' / '2.5' (constant), 'lognormal:SIGMA' (median 1), 'uniform:LO:HI' -> a parsed tuple; any of
    them may be followed by per-client overrides ',J=FACTOR' (e.g. '1,3=40': client 3 is 40x slower,
    a deterministic straggler), which end the tuple as a {client: factor} dict."""
    if spec is None:
        return ("const", 1.0)
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        spec = str(spec)
    if not isinstance(spec, str):
        raise ConfigError(f"compute_scale must be a string, got {spec!r}")
    forms = ("a positive number (constant factor), 'lognormal:SIGMA' (median 1) or 'uniform:LO:HI', optionally "
             "followed by per-client factors ',J=FACTOR' (e.g. '1,3=40')")
    head, *extra = [t.strip() for t in spec.strip().lower().split(",")]
    overrides: dict[int, float] = {}
    for item in extra:
        j, eq, f = item.partition("=")
        try:
            jj, ff = int(j), float(f)
        except ValueError:
            jj, ff = -1, math.nan
        if not eq or jj < 0 or not (math.isfinite(ff) and ff > 0):
            raise ConfigError(f"compute_scale={spec!r}: {item!r} is not J=FACTOR (a client id and a positive "
                              f"factor); use {forms}")
        overrides[jj] = ff
    base = _parse_scale_head(head, spec, forms)
    return base + (overrides,) if overrides else base


def _parse_scale_head(text: str, spec, forms: str) -> tuple:
    parts = text.split(":")
    try:
        nums = [float(x) for x in parts[1:]] if len(parts) > 1 else []
        if len(parts) == 1:
            v = float(parts[0])
            if not (math.isfinite(v) and v > 0):
                raise ValueError
            return ("const", v)
        if parts[0] == "lognormal" and len(nums) == 1 and math.isfinite(nums[0]) and nums[0] >= 0:
            return ("lognormal", nums[0])
        if parts[0] == "uniform" and len(nums) == 2 and 0 < nums[0] <= nums[1] and math.isfinite(nums[1]):
            return ("uniform", nums[0], nums[1])
    except ValueError:
        pass
    raise ConfigError(f"compute_scale={spec!r} is not valid; use {forms}")
