"""Benchmark registry: names, did-you-mean, data folder resolution, loading, sampling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eval_fakes import write_jsonl

from acd_engine.errors import ConfigError
from acd_engine.eval.registry import (
    BENCHMARKS,
    DATA_DIR_ENV,
    check_benchmark_data,
    check_benchmark_name,
    choose_data_dir,
    load_benchmark,
    resolve_data_dir,
    sample_items,
    user_data_dir,
)

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "benchmarks"
PAPER_SETS = [
    "advbench",
    "malicious_instruct",
    "harmfulqa",
    "dangerousqa",
    "beavertails",
    "xstest",
    "alpaca_eval",
    "truthfulqa",
]


def test_registry_names_the_papers_sets() -> None:
    assert list(BENCHMARKS) == PAPER_SETS


def test_unknown_name_did_you_mean() -> None:
    with pytest.raises(ConfigError) as exc:
        check_benchmark_name("advbnech")
    assert str(exc.value) == (
        "unknown benchmark 'advbnech'; did you mean 'advbench'? Choose from: "
        + ", ".join(PAPER_SETS)
        + ", <path/to/file.jsonl>"
    )


def test_unknown_name_without_close_match() -> None:
    with pytest.raises(ConfigError, match=r"^unknown benchmark 'zzz'; Choose from: advbench, "):
        check_benchmark_name("zzz")


def test_paths_pass_the_name_check() -> None:
    check_benchmark_name("some/dir/file.jsonl")
    check_benchmark_name("file.jsonl")


def test_resolve_data_dir_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit, env = tmp_path / "explicit", tmp_path / "env"
    explicit.mkdir()
    env.mkdir()
    monkeypatch.setenv(DATA_DIR_ENV, str(env))
    assert resolve_data_dir(explicit) == explicit.resolve()
    assert resolve_data_dir() == env.resolve()
    monkeypatch.delenv(DATA_DIR_ENV)
    repo = tmp_path / "repo"
    shared = tmp_path / "shared" / "data" / "benchmarks"
    repo.mkdir()
    shared.mkdir(parents=True)
    monkeypatch.chdir(repo)
    assert resolve_data_dir() == shared.resolve()
    # Outside a checkout: the per-user folder `acd data fetch` fills by default.
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    assert choose_data_dir() == (tmp_path / "xdg" / "acd" / "benchmarks", "the default")
    monkeypatch.delenv("XDG_DATA_HOME")
    assert user_data_dir() == Path.home() / ".local" / "share" / "acd" / "benchmarks"


def test_resolve_data_dir_errors_say_how_to_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as exc:
        resolve_data_dir()
    msg = str(exc.value)
    user = tmp_path / "xdg" / "acd" / "benchmarks"
    assert msg.startswith(f"data_dir must be a folder of benchmark .jsonl files, got '{user}' ")
    assert f"run: acd data fetch --dir {user}, or pass --data-dir" in msg
    assert DATA_DIR_ENV in msg
    with pytest.raises(ConfigError, match="from --data-dir"):
        resolve_data_dir(tmp_path / "missing")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match=r"from \$ACD_DATA_DIR"):
        resolve_data_dir()


def test_load_registered_and_roles(data_dir: Path) -> None:
    roles = {
        n: load_benchmark(n, data_dir).role
        for n in ["advbench", "xstest", "alpaca_eval", "truthfulqa"]
    }
    assert roles == {
        "advbench": "harmful",
        "xstest": "mixed",
        "alpaca_eval": "safe",
        "truthfulqa": "mc",
    }
    adv = load_benchmark("advbench", data_dir)
    assert adv.name == "advbench" and len(adv.items) == 30
    assert adv.items[0].id == "advbench-0001"
    assert len(adv.sha256) == 64


def test_registered_name_missing_from_data_dir(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"benchmark file must exist, got '.*beavertails.jsonl'"):
        load_benchmark("beavertails", tmp_path)
    with pytest.raises(ConfigError, match=r"; run: acd data fetch --sets beavertails --dir /"):
        load_benchmark("beavertails", tmp_path)


def test_check_benchmark_data_names_every_missing_set_once(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "advbench.jsonl", [{"id": "a", "prompt": "p", "label": "harmful"}])
    check_benchmark_data(["advbench", str(tmp_path / "mine.jsonl")], tmp_path)
    check_benchmark_data(["some/file.jsonl"], tmp_path / "absent")  # no registered set: no folder
    spaced = tmp_path / "my data"
    spaced.mkdir()
    with pytest.raises(ConfigError) as exc:
        check_benchmark_data(["advbench", "xstest"], spaced)
    assert str(exc.value) == (
        f"benchmark files must be in '{spaced}', got advbench, xstest missing; "
        f"run: acd data fetch --sets advbench,xstest --dir '{spaced}'"
    )


def test_load_by_path_is_named_by_stem(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "my_set.jsonl",
        [{"id": "m-1", "prompt": "p", "label": "harmful", "category": None, "extra": 1}],
    )
    bench = load_benchmark(str(path))
    assert bench.name == "my_set" and bench.role == "harmful" and bench.path == path
    with pytest.raises(ConfigError, match=r"benchmark file must exist, got '.*nope.jsonl'"):
        load_benchmark(str(tmp_path / "nope.jsonl"))


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (
            ['{"id": "a", "prompt": "p", "label": "bad"}'],
            r"^bad\.jsonl line 1: label must be one of 'harmful' or 'safe', got 'bad'$",
        ),
        (
            [
                '{"id": "a", "prompt": "p", "label": "safe"}',
                '{"id": "a", "prompt": "q", "label": "safe"}',
            ],
            r"^bad\.jsonl line 2: id must be unique, got 'a' twice$",
        ),
        (
            ['{"id": "a", "prompt": "  ", "label": "safe"}'],
            r"^bad\.jsonl line 1: prompt must not be empty, got '  '$",
        ),
        (
            ['{"id": "a", "prompt": "p", "label": "safe"}', "{oops"],
            r"^bad\.jsonl line 2 must be a JSON object, got ",
        ),
        (['{"prompt": "p", "label": "safe"}'], r"^bad\.jsonl line 1: id "),
        ([], r"^benchmark file must hold at least one row"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path: Path, rows: list[str], message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        load_benchmark(str(path))


def test_sampling_is_seeded_stable_and_extendable(data_dir: Path) -> None:
    bench = load_benchmark("advbench", data_dir)
    ids = [item.id for item in sample_items(bench, 5, seed=0)]
    # pinned: a change here silently changes which prompts every published number used
    assert ids == [
        "advbench-0018",
        "advbench-0007",
        "advbench-0027",
        "advbench-0008",
        "advbench-0026",
    ]
    assert [i.id for i in sample_items(bench, 5, seed=0)] == ids
    assert [i.id for i in sample_items(bench, 5, seed=1)] != ids
    larger = [i.id for i in sample_items(bench, 12, seed=0)]
    assert larger[:5] == ids  # a larger limit extends the sample
    assert len(set(larger)) == 12
    assert sample_items(bench, None, seed=0) == bench.items  # all, in file order
    assert sample_items(bench, 1000, seed=0) == bench.items


def test_sampling_differs_per_benchmark_with_one_seed(data_dir: Path) -> None:
    adv = load_benchmark("advbench", data_dir)
    other = load_benchmark(
        str(
            write_jsonl(
                data_dir.parent / "other.jsonl",
                [
                    {"id": f"advbench-{i:04d}", "prompt": f"x{i}", "label": "harmful"}
                    for i in range(1, 31)
                ],
            )
        )
    )
    assert [i.id for i in sample_items(adv, 10, 0)] != [i.id for i in sample_items(other, 10, 0)]


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared/data/benchmarks not present")
def test_shared_data_matches_its_readme() -> None:
    counts = {
        "advbench": 520,
        "malicious_instruct": 100,
        "harmfulqa": 1960,
        "dangerousqa": 200,
        "beavertails": 700,
        "xstest": 450,
        "alpaca_eval": 805,
        "truthfulqa": 817,
    }
    roles = {name: "harmful" for name in counts}
    roles.update(xstest="mixed", alpaca_eval="safe", truthfulqa="mc")
    for name, n in counts.items():
        bench = load_benchmark(name, SHARED)
        assert len(bench.items) == n, name
        assert bench.role == roles[name], name
    xs = load_benchmark("xstest", SHARED)
    assert sum(i.label == "harmful" for i in xs.items) == 200
    tq = load_benchmark("truthfulqa", SHARED).items[0]
    assert tq.best_answer and tq.incorrect_answers
    assert json.loads(json.dumps(tq.model_dump()))["id"] == "truthfulqa-0001"
