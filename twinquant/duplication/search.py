"""Black-box search over a mixed discrete/continuous parameter space, built on optuna.

Used to tune per-layer-copy quantization parameters against a scalar loss (KL divergence on calibration
windows; lower is better). Strategies:

- "grid": every point of `SearchSpace.grid()`, or `trials` of them in a seeded random order (GridSampler);
- "bayes": TPE (multivariate, seeded);
- "evolution": CMA-ES when every parameter is numeric, else NSGA-II's genetic algorithm (mixed spaces).

With `study_log` the study lives in an optuna journal file, so an interrupted search resumes where it stopped:
trials already evaluated count against `trials`. One process per log (a trial left running in the log is taken
for one whose process died).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from twinquant.errors import TwinquantError

KINDS = ("int", "float", "categorical")
STRATEGIES = ("grid", "bayes", "evolution")
_CHOICE_TYPES = (type(None), bool, int, float, str)  # what optuna stores and JSON carries
_SPEC_KEYS = {"type", "low", "high", "step", "log", "choices"}


def _finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class Param:
    """One searched parameter: "int"/"float" in [low, high] (optionally log-scaled or on a `step` lattice), or
    "categorical" over `choices`."""

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    choices: list | None = None
    log: bool = False
    step: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TwinquantError(f"search parameter name must be a non-empty string, got {self.name!r}")
        where = f"search parameter {self.name!r}"
        if self.kind not in KINDS:
            raise TwinquantError(f"{where}: unknown kind {self.kind!r} (expected one of {', '.join(KINDS)})")
        if self.kind == "categorical":
            if self.low is not None or self.high is not None or self.step is not None or self.log:
                raise TwinquantError(f"{where}: a categorical parameter takes choices only (no low/high/step/log)")
            if not isinstance(self.choices, (list, tuple)) or not self.choices:
                raise TwinquantError(f"{where}: categorical choices must be a non-empty list")
            bad = [c for c in self.choices if not isinstance(c, _CHOICE_TYPES)]
            if bad:
                raise TwinquantError(f"{where}: choices must be numbers, strings, booleans or null, got {bad[0]!r}")
            if len(set(self.choices)) != len(self.choices):  # optuna maps a choice to its first index
                raise TwinquantError(f"{where}: duplicate choices in {list(self.choices)!r}")
            self.choices = list(self.choices)
            return
        if self.choices is not None:
            raise TwinquantError(f"{where}: a {self.kind} parameter takes low/high, not choices")
        if not (_finite_number(self.low) and _finite_number(self.high)):
            raise TwinquantError(f"{where}: low and high must be finite numbers, got {self.low!r} and {self.high!r}")
        if self.low > self.high:
            raise TwinquantError(f"{where}: low {self.low} > high {self.high}")
        if self.log and self.low <= 0:
            raise TwinquantError(f"{where}: a log-scaled range needs low > 0, got {self.low}")
        if self.step is not None:
            if self.log:  # optuna samples log ranges continuously; a lattice on them is undefined
                raise TwinquantError(f"{where}: step cannot be combined with log")
            if not _finite_number(self.step) or self.step <= 0:
                raise TwinquantError(f"{where}: step must be a positive number, got {self.step!r}")
            n = (self.high - self.low) / self.step
            if abs(n - round(n)) > 1e-6:  # else optuna silently moves `high` down to the lattice
                raise TwinquantError(f"{where}: high - low ({self.high - self.low:g}) is not a multiple of step "
                                     f"{self.step:g}")
        if self.kind == "int":
            if any(v is not None and float(v) != int(v) for v in (self.low, self.high, self.step)):
                raise TwinquantError(f"{where}: an int parameter needs integer low/high/step")
            self.low, self.high = int(self.low), int(self.high)
            self.step = None if self.step is None else int(self.step)

    def grid_values(self, points_per_float: int = 5) -> list:
        """This parameter's grid: the choices, the `step` lattice, every integer of a short int range, else
        `points_per_float` evenly spaced points (geometric when log) including both ends."""
        if self.kind == "categorical":
            return list(self.choices)
        lo, hi = self.low, self.high
        if self.step is not None:
            vals = [lo + k * self.step for k in range(round((hi - lo) / self.step) + 1)]
        elif self.kind == "int" and hi - lo + 1 <= points_per_float:
            vals = list(range(lo, hi + 1))
        else:
            ts = [k / (points_per_float - 1) for k in range(points_per_float)]
            vals = [lo * (hi / lo) ** t if self.log else lo + (hi - lo) * t for t in ts]
        if self.kind == "int":
            vals = [round(v) for v in vals]
        else:  # round off float noise (0.5 + 6 * 0.05 = 0.8000000000000002) so grid points print and compare cleanly
            vals = [min(max(round(v, 12), lo), hi) for v in vals]
        return list(dict.fromkeys(vals))  # log / rounded int ranges can repeat a point

    def to_spec(self) -> Any:
        """The `SearchSpace.from_dict` form of this parameter."""
        if self.kind == "categorical":
            return list(self.choices)
        spec = {"type": self.kind, "low": self.low, "high": self.high}
        if self.step is not None:
            spec["step"] = self.step
        if self.log:
            spec["log"] = True
        return spec


class SearchSpace:
    """An ordered set of uniquely named `Param`s."""

    def __init__(self, params: list[Param]):
        self.params = list(params)
        if not self.params:
            raise TwinquantError("search space is empty: give at least one parameter")
        names = [p.name for p in self.params]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise TwinquantError(f"search space names a parameter more than once: {', '.join(dup)}")

    @classmethod
    def from_dict(cls, d: Mapping) -> SearchSpace:
        """`{"bits": [4, 8], "alpha": {"low": 0, "high": 1}, "n": {"low": 1, "high": 4, "type": "int"}}`:
        a list is categorical; a mapping is a float range unless it says `type` (or gives `choices`)."""
        if not isinstance(d, Mapping) or not d:
            raise TwinquantError(f"search space must be a non-empty mapping of parameter name to spec, got {d!r}")
        params = []
        for name, spec in d.items():
            if isinstance(spec, (list, tuple)):
                params.append(Param(name, "categorical", choices=list(spec)))
            elif isinstance(spec, Mapping):
                unknown = sorted(set(spec) - _SPEC_KEYS)
                if unknown:
                    raise TwinquantError(f"search parameter {name!r}: unknown key(s) {', '.join(map(str, unknown))} "
                                         f"(expected {', '.join(sorted(_SPEC_KEYS))})")
                kind = spec.get("type", "categorical" if "choices" in spec else "float")
                params.append(Param(name, kind, spec.get("low"), spec.get("high"), spec.get("choices"),
                                    bool(spec.get("log", False)), spec.get("step")))
            else:
                raise TwinquantError(f"search parameter {name!r}: expected a list of choices or a mapping with "
                                     f"low/high, got {spec!r}")
        return cls(params)

    def to_dict(self) -> dict:
        return {p.name: p.to_spec() for p in self.params}

    @property
    def numeric(self) -> bool:
        return all(p.kind != "categorical" for p in self.params)

    def grid_values(self, points_per_float: int = 5) -> dict[str, list]:
        if points_per_float < 2:
            raise TwinquantError(f"points_per_float must be at least 2 (both ends of a range), got {points_per_float}")
        return {p.name: p.grid_values(points_per_float) for p in self.params}

    def grid(self, points_per_float: int = 5) -> list[dict]:
        """Every grid point (the Cartesian product of the per-parameter grids), as parameter dicts."""
        values = self.grid_values(points_per_float)
        return [dict(zip(values, combo)) for combo in itertools.product(*values.values())]

    def suggest(self, trial) -> dict:
        """Ask an optuna trial for one value of every parameter."""
        out = {}
        for p in self.params:
            if p.kind == "categorical":
                out[p.name] = trial.suggest_categorical(p.name, p.choices)
            elif p.kind == "int":
                out[p.name] = trial.suggest_int(p.name, p.low, p.high, step=p.step or 1, log=p.log)
            else:
                out[p.name] = trial.suggest_float(p.name, p.low, p.high, step=p.step, log=p.log)
        return out


@dataclass
class SearchResult:
    best_params: dict
    best_value: float
    trials: list[dict]  # every trial of the study (resumed ones included): number, params, value, state, seconds
    seconds: float  # wall-clock time of this `search` call
    strategy: str

    def to_dict(self) -> dict:
        return asdict(self)

    def write_json(self, path: str | os.PathLike) -> None:
        """Write atomically (temporary file + rename), so a reader never sees half a file."""
        path = os.fspath(path)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".search-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=2, allow_nan=False)
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise


def search(objective: Callable[[dict], float], space: SearchSpace | Mapping, strategy: str, trials: int,
           seed: int = 0, study_log: str | os.PathLike | None = None, study_name: str = "twinquant",
           progress: bool = True, timeout: float | None = None, points_per_float: int = 5) -> SearchResult:
    """Minimise `objective(params) -> float` over `space` with `trials` evaluations in all (a resumed study's
    earlier evaluations included). A NaN/inf value marks that trial failed; it never becomes the best."""
    if strategy not in STRATEGIES:
        raise TwinquantError(f"unknown search strategy {strategy!r} (expected one of {', '.join(STRATEGIES)})")
    if not isinstance(trials, int) or trials < 1:
        raise TwinquantError(f"search needs trials >= 1, got {trials!r}")
    if not isinstance(space, SearchSpace):
        space = SearchSpace.from_dict(space)
    try:
        import optuna
    except ImportError as e:
        raise TwinquantError("the search needs optuna: pip install optuna") from e
    t0 = time.perf_counter()
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own per-trial line replaces optuna's chatter
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return _search(optuna, objective, space, strategy, trials, seed, study_log, study_name, progress,
                           timeout, points_per_float, t0)
    finally:
        optuna.logging.set_verbosity(verbosity)


def _search(optuna, objective, space, strategy, trials, seed, study_log, study_name, progress, timeout,
            points_per_float, t0) -> SearchResult:
    from optuna.trial import TrialState

    storage = None
    if study_log is not None:
        from optuna.storages.journal import JournalFileBackend, JournalStorage  # optuna >= 4.0 names

        study_log = os.fspath(study_log)
        os.makedirs(os.path.dirname(os.path.abspath(study_log)), exist_ok=True)
        storage = JournalStorage(JournalFileBackend(study_log))
    study = optuna.create_study(storage=storage, study_name=study_name, load_if_exists=True, direction="minimize")

    # Resuming with other settings would mix incomparable trials (and reshuffle a grid): refuse it.
    settings = {"strategy": strategy, "space": space.to_dict(), "seed": seed, "points_per_float": points_per_float}
    stored = study.user_attrs.get("twinquant")
    if stored is None:
        study.set_user_attr("twinquant", settings)
    elif stored != settings:
        diff = ", ".join(k for k in settings if stored.get(k) != settings[k])
        raise TwinquantError(f"study {study_name!r} in {study_log} was started with another {diff}; resume with the "
                             f"same settings or use a new study name")

    # A trial still RUNNING in the log belongs to a process that died: close it so samplers and the grid skip it.
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)

    def counted(t) -> bool:  # evaluations that returned a value (non-finite ones included); not interrupted ones
        return t.state == TrialState.COMPLETE or (t.state == TrialState.FAIL and "nonfinite" in t.user_attrs)

    existing = study.get_trials(deepcopy=False)
    if strategy == "grid":
        grid = space.grid_values(points_per_float)
        # The seed fixes the (shuffled) grid order, which a resumed run must keep: no offset here.
        study.sampler = optuna.samplers.GridSampler(grid, seed=seed)
        _requeue_lost_grid_points(study, storage, study_name, grid, existing, counted)
    else:
        # Offset the seed by the trials already in the log, or a resumed run would redraw the same startup points.
        s = seed + len(existing)
        if strategy == "bayes":
            study.sampler = optuna.samplers.TPESampler(seed=s, multivariate=True)
        elif space.numeric:
            study.sampler = optuna.samplers.CmaEsSampler(seed=s, warn_independent_sampling=False,
                                                         independent_sampler=optuna.samplers.TPESampler(seed=s))
        else:
            # Single-objective NSGA-II is an elitist genetic algorithm; shrink its population (default 50) so a
            # budget of tens of trials still runs about ten generations.
            study.sampler = optuna.samplers.NSGAIISampler(seed=s, population_size=max(4, min(50, trials // 10)))

    done = sum(map(counted, existing))
    remaining = trials - done
    exhausted = strategy == "grid" and study.sampler.is_exhausted(study)

    def run_trial(trial) -> float:
        value = float(objective(space.suggest(trial)))
        if not math.isfinite(value):
            # optuna fails NaN but would keep ±inf as a value (and -inf as the best): fail both, remember why
            trial.set_user_attr("nonfinite", repr(value))
            return math.nan
        return value

    def report(study, ft) -> None:
        nonlocal done
        done += counted(ft)
        params = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in ft.params.items())
        value = f"{ft.value:.6g}" if ft.state == TrialState.COMPLETE else f"failed ({ft.user_attrs.get('nonfinite')})"
        try:
            best = f"{study.best_value:.6g} (trial {study.best_trial.number})"
        except ValueError:  # no completed trial yet
            best = "none yet"
        print(f"search {strategy} [{done}/{trials}] trial {ft.number}: {params} -> {value}; best {best}",
              file=sys.stderr, flush=True)

    if remaining > 0 and not exhausted:
        study.optimize(run_trial, n_trials=remaining, timeout=timeout, callbacks=[report] if progress else None)

    all_trials = [t for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING]
    if not any(t.state == TrialState.COMPLETE for t in all_trials):
        raise TwinquantError(f"search: none of the {len(all_trials)} trials returned a finite objective value")
    names = [p.name for p in space.params]
    best = study.best_trial
    return SearchResult(
        best_params={n: best.params[n] for n in names},
        best_value=best.value,
        trials=[{"number": t.number, "params": {n: t.params[n] for n in names if n in t.params},
                 "value": t.value if t.state == TrialState.COMPLETE else None, "state": t.state.name,
                 "seconds": t.duration.total_seconds() if t.duration is not None else None} for t in all_trials],
        seconds=time.perf_counter() - t0,
        strategy=strategy,
    )


def _requeue_lost_grid_points(study, storage, study_name, grid, existing, counted) -> None:
    """Queue again the grid points whose evaluation was interrupted: optuna's GridSampler counts any finished
    trial (a failed one too) as visited, so without this a Ctrl-C would drop that point from the grid for good."""
    from optuna.trial import TrialState

    kept = {t.system_attrs.get("grid_id") for t in existing if counted(t) or t.state == TrialState.WAITING}
    lost = sorted({t.system_attrs["grid_id"] for t in existing if "grid_id" in t.system_attrs} - kept)
    if not lost:
        return  # (always so without a log: an in-memory study starts empty)
    study_id = storage.get_study_id_from_name(study_name)
    for grid_id in lost:
        # An empty enqueued trial carrying the grid id: GridSampler then serves that point's values.
        study.enqueue_trial({})
        number = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))[-1].number
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
        storage.set_trial_system_attr(trial_id, "search_space", grid)
        storage.set_trial_system_attr(trial_id, "grid_id", grid_id)
