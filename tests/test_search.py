"""twinquant.duplication.search: planted optima, seeding, resume from a journal log, failed trials, bad specs.

Tolerances: over seeds 0..49 of this planted objective the worst |found - planted| of the floats was 0.044 for
TPE after 60 trials, 0.036 for CMA-ES after 100 and 0.046 for NSGA-II after 200 (its population is trials // 10,
so about ten generations); 0.1 leaves twice that margin. Every run here takes well under a second.
"""

import json
import math

import pytest

from twinquant.duplication.search import Param, SearchResult, SearchSpace, search
from twinquant.errors import TwinquantError

MIXED = {"bits": [2, 4, 8], "alpha": {"low": 0.0, "high": 1.0}, "clip": {"low": 0.5, "high": 1.0}}
NUMERIC = {"alpha": {"low": 0.0, "high": 1.0}, "clip": {"low": 0.5, "high": 1.0},
           "n": {"low": 1, "high": 8, "type": "int"}}


def planted(p):
    """Best at bits 4 (mixed space) or n 3 (numeric space), alpha 0.3, clip 0.8; value 0 there."""
    return ((p.get("bits", 4) != 4) * 1.0 + (p["alpha"] - 0.3) ** 2 + (p["clip"] - 0.8) ** 2
            + 0.1 * (p.get("n", 3) - 3) ** 2)


def assert_near_planted(best, tol):
    assert best.get("bits", 4) == 4 and best.get("n", 3) == 3, best
    assert abs(best["alpha"] - 0.3) < tol and abs(best["clip"] - 0.8) < tol, best


@pytest.mark.parametrize("strategy,space,trials", [
    ("bayes", MIXED, 60),
    ("evolution", MIXED, 200),    # NSGA-II (a categorical is in the space)
    ("evolution", NUMERIC, 100),  # CMA-ES
])
def test_finds_planted_optimum(strategy, space, trials):
    r = search(planted, SearchSpace.from_dict(space), strategy, trials, seed=0, progress=False)
    assert_near_planted(r.best_params, 0.1)
    assert len(r.trials) == trials and all(t["state"] == "COMPLETE" for t in r.trials)
    assert r.best_value == min(t["value"] for t in r.trials) and r.strategy == strategy


def test_grid_exhaustive_hits_planted_points_exactly():
    space = SearchSpace.from_dict({"bits": [2, 4, 8], "alpha": {"low": 0.0, "high": 1.0, "step": 0.1},
                                   "clip": {"low": 0.5, "high": 1.0, "step": 0.05}})
    points = space.grid()
    assert len(points) == 3 * 11 * 11 and {"bits": 4, "alpha": 0.3, "clip": 0.8} in points
    r = search(planted, space, "grid", 10_000, progress=False)  # the grid ends first
    assert len(r.trials) == len(points)
    assert sorted(map(str, (t["params"] for t in r.trials))) == sorted(map(str, points))  # each point once
    assert r.best_params == {"bits": 4, "alpha": 0.3, "clip": 0.8} and r.best_value == pytest.approx(0.0)


def test_grid_subset_is_seeded():
    space = SearchSpace.from_dict(MIXED)
    runs = [search(planted, space, "grid", 20, seed=s, progress=False) for s in (0, 0, 1)]
    orders = [[t["params"] for t in r.trials] for r in runs]
    assert len(orders[0]) == 20 and len({str(p) for p in orders[0]}) == 20
    assert orders[0] == orders[1] != orders[2]
    assert all(p in space.grid() for p in orders[2])


@pytest.mark.parametrize("strategy,space", [("bayes", MIXED), ("evolution", MIXED), ("evolution", NUMERIC)])
def test_same_seed_same_result(strategy, space):
    a, b, c = (search(planted, SearchSpace.from_dict(space), strategy, 25, seed=s, progress=False) for s in (3, 3, 4))
    assert a.best_params == b.best_params and [t["params"] for t in a.trials] == [t["params"] for t in b.trials]
    assert [t["params"] for t in a.trials] != [t["params"] for t in c.trials]


@pytest.mark.parametrize("strategy", ["bayes", "evolution", "grid"])
def test_resume_counts_earlier_trials(tmp_path, strategy):
    log = tmp_path / "runs" / "study.log"
    first = search(planted, SearchSpace.from_dict(MIXED), strategy, 10, study_log=log, progress=False)
    assert len(first.trials) == 10
    calls = []
    r = search(lambda p: calls.append(p) or planted(p), SearchSpace.from_dict(MIXED), strategy, 25, study_log=log,
               progress=False)
    assert len(calls) == 15 and sum(t["state"] == "COMPLETE" for t in r.trials) == 25
    assert [t["number"] for t in r.trials] == list(range(25)) and r.trials[:10] == first.trials
    again = search(planted, SearchSpace.from_dict(MIXED), strategy, 25, study_log=log, progress=False)
    assert len(again.trials) == 25 and again.best_params == r.best_params  # nothing left to run


def test_resume_after_interrupt_reevaluates_the_lost_grid_point(tmp_path):
    log, space = tmp_path / "study.log", SearchSpace.from_dict(MIXED)
    calls = []

    def interrupted(p):
        calls.append(p)
        if len(calls) == 4:
            raise KeyboardInterrupt  # optuna records the trial as failed and re-raises
        return planted(p)

    with pytest.raises(KeyboardInterrupt):
        search(interrupted, space, "grid", 8, study_log=log, progress=False)
    r = search(planted, space, "grid", 8, study_log=log, progress=False)
    done = [t for t in r.trials if t["state"] == "COMPLETE"]
    assert len(done) == 8 and calls[3] in [t["params"] for t in done]  # the interrupted point was run again
    assert len({str(t["params"]) for t in done}) == 8  # and no point twice


def test_resume_closes_a_trial_left_running(tmp_path):
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    log = tmp_path / "study.log"
    search(planted, SearchSpace.from_dict(MIXED), "bayes", 3, study_log=log, progress=False)
    # a process killed mid-trial leaves it RUNNING in the log
    optuna.load_study(study_name="twinquant", storage=JournalStorage(JournalFileBackend(str(log)))).ask()
    r = search(planted, SearchSpace.from_dict(MIXED), "bayes", 5, study_log=log, progress=False)
    assert [t["state"] for t in r.trials] == ["COMPLETE"] * 3 + ["FAIL"] + ["COMPLETE"] * 2  # not counted


def test_resume_refuses_other_settings(tmp_path):
    log = tmp_path / "study.log"
    search(planted, SearchSpace.from_dict(MIXED), "bayes", 3, study_log=log, progress=False)
    with pytest.raises(TwinquantError, match="strategy"):
        search(planted, SearchSpace.from_dict(MIXED), "grid", 5, study_log=log, progress=False)
    r = search(planted, SearchSpace.from_dict(MIXED), "grid", 5, study_log=log, study_name="other", progress=False)
    assert len(r.trials) == 5


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("strategy", ["bayes", "evolution", "grid"])
def test_non_finite_values_fail_the_trial(strategy, bad):
    f = lambda p: bad if p["bits"] == 4 else planted(p)  # the planted optimum itself is broken
    r = search(f, SearchSpace.from_dict(MIXED), strategy, 30, progress=False)
    failed = [t for t in r.trials if t["state"] == "FAIL"]
    assert len(r.trials) == 30 and failed and all(t["params"]["bits"] == 4 and t["value"] is None for t in failed)
    assert r.best_params["bits"] != 4 and math.isfinite(r.best_value)
    with pytest.raises(TwinquantError, match="finite"):
        search(lambda p: math.nan, SearchSpace.from_dict(MIXED), strategy, 3, progress=False)


def test_progress_lines_and_json(tmp_path, capsys):
    r = search(planted, SearchSpace.from_dict(MIXED), "bayes", 4, seed=1)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4 and lines[-1].startswith("search bayes [4/4] trial 3: bits=") and "best" in lines[-1]
    out = tmp_path / "search.json"
    r.write_json(out)
    d = json.loads(out.read_text())
    assert d == json.loads(json.dumps(r.to_dict())) and set(d) == {"best_params", "best_value", "trials", "seconds",
                                                                     "strategy"}
    assert set(d["trials"][0]) == {"number", "params", "value", "state", "seconds"}
    assert [p.name for p in tmp_path.iterdir()] == ["search.json"]  # no temporary file left behind
    assert isinstance(SearchResult(**d), SearchResult)


def test_space_from_dict_and_grid():
    space = SearchSpace.from_dict({"act_bits": [4, 8], "alpha": {"low": 0.0, "high": 1.0},
                                   "clip": {"low": 0.5, "high": 1.0, "step": 0.05},
                                   "n": {"low": 1, "high": 4, "type": "int"},
                                   "lr": {"low": 1e-3, "high": 1e-1, "log": True}})
    kinds = {p.name: p.kind for p in space.params}
    assert kinds == {"act_bits": "categorical", "alpha": "float", "clip": "float", "n": "int", "lr": "float"}
    v = space.grid_values(points_per_float=5)
    assert v["alpha"] == [0.0, 0.25, 0.5, 0.75, 1.0] and v["n"] == [1, 2, 3, 4]  # a short int range: every integer
    assert v["lr"] == pytest.approx([1e-3, 10**-2.5, 1e-2, 10**-1.5, 1e-1])  # log: geometric spacing
    assert len(v["clip"]) == 11 and v["clip"][6] == 0.8  # the lattice, not points_per_float; float noise rounded off
    assert len(space.grid(points_per_float=5)) == 2 * 5 * 11 * 4 * 5
    assert SearchSpace.from_dict(space.to_dict()).to_dict() == space.to_dict()
    assert Param("k", "int", 1, 100).grid_values(5) == [1, 26, 50, 75, 100]  # a long int range is sampled, not listed


@pytest.mark.parametrize("make,msg", [
    (lambda: Param("a", "float", 1.0, 0.5), "low 1.0 > high 0.5"),
    (lambda: Param("a", "categorical", choices=[]), "non-empty"),
    (lambda: Param("a", "float", 0.0, 1.0, log=True), "low > 0"),
    (lambda: Param("a", "bool", 0, 1), "unknown kind"),
    (lambda: Param("a", "int", 0.5, 3), "integer"),
    (lambda: Param("a", "float", 0.0, 1.0, step=0.3), "multiple of step"),
    (lambda: Param("a", "categorical", choices=[1, 1]), "duplicate"),
    (lambda: SearchSpace.from_dict({"a": {"low": 0, "hi": 1}}), "unknown key"),
    (lambda: SearchSpace.from_dict({"a": 3}), "list of choices"),
    (lambda: SearchSpace.from_dict({}), "non-empty"),
    (lambda: SearchSpace([Param("a", "float", 0, 1), Param("a", "int", 0, 1)]), "more than once"),
    (lambda: search(planted, SearchSpace.from_dict(MIXED), "random", 5), "unknown search strategy"),
    (lambda: search(planted, SearchSpace.from_dict(MIXED), "bayes", 0), "trials >= 1"),
])
def test_invalid_specs(make, msg):
    with pytest.raises(TwinquantError, match=msg) as e:
        make()
    assert "\n" not in str(e.value)
