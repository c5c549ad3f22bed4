"""Beyond one machine, on this one: a real multi-node Ray cluster on loopback (separate
``ray start`` processes), a real PostgreSQL 15 server, and the faults a cluster has --
a worker node killed mid-trial, a driver killed, the database stopped mid-search.

Run with ``make test-cluster`` (``pytest -m cluster``). Every wait is bounded in time.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from meme.training.distributed import free_local_port

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[3]
PY = sys.executable
RAY = Path(PY).parent / "ray"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)
optuna.logging.set_verbosity(optuna.logging.WARNING)


def _wait(predicate, timeout: float, what: str, every: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _report(test: str, **facts) -> None:
    """With $MEME_CLUSTER_REPORT set, append what a test measured (one JSON line) there."""
    path = os.environ.get("MEME_CLUSTER_REPORT")
    if path:
        import json
        with open(path, "a") as f:
            f.write(json.dumps({"test": test, **facts}) + "\n")


def _search(*args: str) -> list[str]:
    return [PY, "-m", "nas.search", "--space", "tiny", "--quiet", "--rerank-top", "0", "--stale-after", "10", *args]


# Ray's token authentication, as a real cluster should run it: every node and driver
# presents the same secret (generated per test session, never written to the repo).
RAY_TOKEN = os.urandom(16).hex()


def _env() -> dict[str, str]:
    """Children: one thread each, the cluster's token, and no PYTHONPATH (nodes must get our
    code from the driver's runtime_env, as on a machine without this checkout)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": RAY_TOKEN}


# ---- a Ray cluster of separate node processes -----------------------------------------

def _pids_with(needle: str) -> list[int]:
    """Processes whose command line contains ``needle`` (how we find one node's processes)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if needle in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


def _descendants(roots: list[int]) -> list[int]:
    """``roots`` and every process below them (a killed node takes its trainings with it)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _kill_all(needle: str) -> int:
    pids = _descendants(_pids_with(needle))
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(pids)


class RayCluster:
    """A head and worker nodes on 127.0.0.1, each started by ``ray start`` (1 CPU each)."""

    def __init__(self):
        self.port = free_local_port()
        self.address = f"127.0.0.1:{self.port}"
        self.temp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # Ray's socket paths must stay short
        self.nodes: dict[str, int] = {}  # name -> node manager port (identifies its processes)

    def _start(self, name: str, *args: str) -> None:
        nm_port = free_local_port()
        cmd = [str(RAY), "start", "--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--num-gpus", "0",
               "--node-manager-port", str(nm_port), "--resources", f'{{"{name}": 1}}', "--disable-usage-stats",
               *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=_env())
        assert proc.returncode == 0, f"ray start ({name}) failed: {proc.stderr[-2000:]}"
        self.nodes[name] = nm_port

    def start_head(self) -> None:
        self._start("head", "--head", "--port", str(self.port), "--temp-dir", self.temp,
                    "--include-dashboard", "false")

    def add_worker(self, name: str) -> None:
        self._start(name, "--address", self.address)
        _wait(lambda: self.alive_nodes() >= len(self.nodes), 60, f"node {name} to join")

    def alive_nodes(self) -> int:
        out = subprocess.run([PY, "-c", f"import ray; ray.init(address='{self.address}', logging_level='ERROR'); "
                                        "print(sum(n['Alive'] for n in ray.nodes()))"],
                             capture_output=True, text=True, timeout=120, env=_env())
        return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else 0

    def kill_node(self, name: str) -> int:
        """kill -9 every process of one node (its raylet and the workers it started)."""
        port = self.nodes.pop(name)
        return _kill_all(f"node-manager-port={port}") + _kill_all(f"node_manager_port={port}")

    def stop(self) -> None:
        # raylets, GCS, workers, monitors and agents: each names the GCS port or the session dir
        for needle in (f":{self.port} ", f"gcs_server_port={self.port}", self.temp):
            _kill_all(needle)
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_cluster():
    if not RAY.exists():
        pytest.skip(f"{RAY} not found: Ray is not installed in this environment")
    cluster = RayCluster()
    try:
        cluster.start_head()
        cluster.add_worker("worker1")
        yield cluster
    finally:
        cluster.stop()


def _study(storage: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage)


def _sqlite(out: Path, name: str) -> str:
    return f"sqlite:///{out / name / 'optuna.db'}"


def test_search_runs_trials_on_several_nodes(ray_cluster, tmp_path):
    proc = subprocess.run(_search("--executor", "ray", "--address", ray_cluster.address, "--budget-gflops", "1",
                                  "--trials", "6", "--out", str(tmp_path), "--study", "mn", "--no-reference"),
                          capture_output=True, text=True, timeout=600, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = [t for t in _study(_sqlite(tmp_path, "mn"), "mn").get_trials()
               if t.state == TrialState.COMPLETE and "duplicate_of" not in t.user_attrs]
    nodes = [t.user_attrs["node"] for t in trained]
    assert len(set(nodes)) >= 2, f"all trials ran on {set(nodes)}"
    _report("multi-node search", nodes=len(ray_cluster.nodes), trials_per_node={n: nodes.count(n) for n in set(nodes)})


def test_workers_run_the_code_the_driver_ships(ray_cluster, tmp_path):
    """runtime_env py_modules: a worker imports meme/nas from Ray's copy, not from an install.
    (The driver runs outside the checkout: Ray puts a driver's directory on its workers' path.)"""
    code = (f"import ray, nas\nfrom nas.engine.ray_engine import code_runtime_env\n"
            f"ray.init(address='{ray_cluster.address}', runtime_env=code_runtime_env(), logging_level='ERROR')\n"
            "@ray.remote(resources={'worker1': 0.01})\n"
            "def where():\n    import nas, meme.training.train\n    return nas.__file__, meme.training.train.__file__\n"
            "print(*ray.get(where.remote()))")
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=180, env=_env(), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    paths = out.stdout.split()
    assert len(paths) == 2 and all("runtime_resources" in p and str(REPO) not in p for p in paths), paths


def _peek(storage: str, name: str) -> list[tuple[int, str, dict]]:
    """(number, state, user attrs) of every trial, without writing anything: an SQLite
    file the search is still creating is opened read-only (or not at all)."""
    if not storage.startswith("sqlite:///"):
        try:
            return [(t.number, t.state.name, t.user_attrs) for t in _study(storage, name).get_trials(deepcopy=False)]
        except KeyError:
            return []
    import json
    import sqlite3

    db = Path(storage[len("sqlite:///"):])
    if not db.is_file():
        return []
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            rows = con.execute("SELECT t.trial_id, t.number, t.state FROM trials t JOIN studies s "
                               "ON t.study_id = s.study_id WHERE s.study_name = ?", (name,)).fetchall()
            attrs: dict[int, dict] = {}
            for tid, key, value in con.execute("SELECT trial_id, key, value_json FROM trial_user_attributes"):
                attrs.setdefault(tid, {})[key] = json.loads(value)
        finally:
            con.close()
    except sqlite3.Error:  # schema not there yet, or locked for a moment
        return []
    return [(number, state, attrs.get(tid, {})) for tid, number, state in rows]


def _trials_running_on(storage: str, name: str, node_prefix: str) -> list[int]:
    return [n for n, state, attrs in _peek(storage, name)
            if state == "RUNNING" and str(attrs.get("node", "")).startswith(node_prefix)]


def _node_id(cluster: RayCluster, resource: str) -> str:
    code = (f"import ray; ray.init(address='{cluster.address}', logging_level='ERROR')\n"
            f"print([n['NodeID'] for n in ray.nodes() if n['Alive'] and '{resource}' in n['Resources']][0])")
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=120, env=_env())
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1][:12]


def test_killed_worker_node_costs_at_most_its_trial(ray_cluster, tmp_path):
    ray_cluster.add_worker("doomed")
    doomed = _node_id(ray_cluster, "doomed")
    storage = _sqlite(tmp_path, "wk")
    trials = 10
    t0 = time.monotonic()
    driver = subprocess.Popen(_search("--executor", "ray", "--address", ray_cluster.address, "--budget-gflops", "1",
                                      "--trials", str(trials), "--out", str(tmp_path), "--study", "wk",
                                      "--no-reference"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    try:
        victims = _wait(lambda: _trials_running_on(storage, "wk", doomed), 300, "a trial running on the doomed node")
        assert ray_cluster.kill_node("doomed") > 0
        t_kill = time.monotonic()
        out, _ = driver.communicate(timeout=600)
        t_end = time.monotonic()
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, out[-3000:]
    study = _study(storage, "wk")
    assert all(t.state in FINISHED for t in study.get_trials())  # nothing left RUNNING
    assert len(study.get_trials(states=COUNTED)) == trials       # the budget was still met
    hit = [t for t in study.get_trials() if t.number in victims]
    for t in hit:  # retried elsewhere (then finished) or recorded FAIL with the reason
        assert t.state in COUNTED or "died" in t.user_attrs.get("fail_reason", "") \
            or "errored" in t.user_attrs.get("fail_reason", ""), (t.state, t.user_attrs)
    # The doomed node has one CPU, so it held one trial when it died: no other trial may fail.
    failed = [t for t in study.get_trials() if t.state == TrialState.FAIL]
    assert len(failed) <= 1, [(t.number, t.user_attrs.get("fail_reason")) for t in failed]
    assert all("died" in t.user_attrs.get("fail_reason", "") or "errored" in t.user_attrs.get("fail_reason", "")
               for t in failed), [t.user_attrs.get("fail_reason") for t in failed]
    _report("kill -9 a worker node mid-trial", killed_at_s=round(t_kill - t0, 1), trials_on_it=victims,
            their_states=[t.state.name for t in hit], search_done_after_kill_s=round(t_end - t_kill, 1),
            trials_counted=trials, trials_left_running=0)


def _kill_driver_then_resume(cmd: list[str], storage: str, name: str, after: int, env: dict) -> tuple[dict, float]:
    """Start a search, kill -9 it once ``after`` trials are counted, --resume it; returns the
    values of the trials that had finished before the kill and the resume's wall time."""
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                              start_new_session=True)
    try:
        _wait(lambda: _counted(storage, name) >= after, 300, f"{after} finished trials")
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
    before = {t.number: (t.state, t.values, t.user_attrs.get("status"))
              for t in _study(storage, name).get_trials() if t.state in FINISHED}
    t0 = time.monotonic()
    proc = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return before, time.monotonic() - t0


def _counted(storage: str, name: str) -> int:
    return len([1 for _, state, _ in _peek(storage, name) if state in ("COMPLETE", "PRUNED")])


def _check_resumed(storage: str, name: str, before: dict, trials: int) -> int:
    """Asserts the resumed study is whole; returns how many trials finished before the kill
    the resume changed (state, values or status): 0 when it kept them all."""
    after = {t.number: t for t in _study(storage, name).get_trials()}
    changed = [n for n, old in before.items()
               if (after[n].state, after[n].values, after[n].user_attrs.get("status")) != old]
    assert not changed, changed  # finished trials: unchanged
    assert all(t.state in FINISHED for t in after.values()), [t.state for t in after.values()]
    assert len([t for t in after.values() if t.state in COUNTED]) == trials  # as many as asked, no more
    return len(changed)


def test_ray_driver_killed_then_resumed(ray_cluster, tmp_path):
    storage = _sqlite(tmp_path, "dk")
    cmd = _search("--executor", "ray", "--address", ray_cluster.address, "--budget-gflops", "1", "--trials", "8",
                  "--out", str(tmp_path), "--study", "dk", "--no-reference")
    before, wall = _kill_driver_then_resume(cmd, storage, "dk", after=2, env=_env())
    changed = _check_resumed(storage, "dk", before, 8)
    failed = [t.number for t in _study(storage, "dk").get_trials() if t.state == TrialState.FAIL]
    _report("kill -9 the Ray driver, then --resume", finished_before_kill=len(before), changed_by_resume=changed,
            interrupted_marked_fail=failed, resume_wall_s=round(wall, 1), trials_left_running=0)


def test_promote_runs_on_the_cluster_and_survives_a_node(ray_cluster, tmp_path):
    """Promoted trainings as Ray tasks on several nodes; a node killed mid-training costs a
    restart from that run's last checkpoint, not the run."""
    rc = subprocess.run(_search("--executor", "optuna", "--budget-gflops", "1", "--trials", "2", "--out",
                                str(tmp_path), "--study", "pr", "--no-reference"),
                        capture_output=True, text=True, timeout=300, env=_env())
    assert rc.returncode == 0, rc.stderr[-2000:]
    ray_cluster.add_worker("doomed2")
    out = tmp_path / "promoted"
    steps = 150
    cmd = [PY, "-m", "nas.promote.promote", "--study", str(tmp_path / "pr"), "--top", "1", "--seeds", "3",
           "--executor", "ray", "--address", ray_cluster.address, "--steps", str(steps), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    try:
        def three_training():  # every node busy, each run past its first checkpoint
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            ckpts = list(out.glob("*/seed*/checkpoints/last.pt"))
            return len(ckpts) >= 3 and ckpts
        _wait(three_training, 300, "three trainings with a checkpoint")
        assert ray_cluster.kill_node("doomed2") > 0
        log, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log[-3000:]
    runs = pd.read_csv(out / "promoted.csv")
    assert len(runs) == 3 and runs.fid.notna().all()
    assert runs.node.nunique() >= 2
    for run in runs.run:  # every run finished its steps exactly once
        assert int(pd.read_csv(Path(run) / "metrics.csv").step.max()) == steps
    resumed = [r for r in runs.run if "--resume" in (Path(r) / "promote.log").read_text()]
    assert resumed, "no run was continued from its checkpoint after the node died"
    _report("promote on the cluster, a node killed mid-training", runs=len(runs), nodes=int(runs.node.nunique()),
            resumed_from_checkpoint=len(resumed), runs_lost=0)


# ---- PostgreSQL ----------------------------------------------------------------------------

class Postgres:
    """A throw-away PostgreSQL 15 server on 127.0.0.1 (initdb refuses root: run as 'postgres')."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="pg", dir="/tmp"))
        self.port = free_local_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/optuna"
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            self.as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.dir, "postgres")

    def _run(self, *cmd: str, timeout: float = 120) -> None:
        proc = subprocess.run([*self.as_user, *cmd], capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"{cmd[0]} failed: {proc.stderr[-2000:]}"

    def init(self) -> None:
        self._run(str(PG_BIN / "initdb"), "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres")
        self.start()
        self._run(str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "optuna")

    def start(self) -> None:
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.dir / "data"), "-l", str(self.dir / "log"), "-w", "-t", "60",
                  "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.dir / "data"), "-m", mode, "-w", "-t", "60", "stop")

    def remove(self) -> None:
        subprocess.run([*self.as_user, str(PG_BIN / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "immediate",
                        "stop"], capture_output=True, timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def postgres():
    if not (PG_BIN / "initdb").exists():
        pytest.skip(f"PostgreSQL 15 not installed ({PG_BIN / 'initdb'} missing)")
    pytest.importorskip("psycopg", reason="the [postgres] extra (psycopg 3) is not installed")
    if os.geteuid() == 0 and (shutil.which("runuser") is None or _no_user("postgres")):
        pytest.skip("running as root and there is no 'postgres' user to run initdb as (initdb refuses root)")
    pg = Postgres()
    try:
        pg.init()
        yield pg
    finally:
        pg.remove()


def _no_user(name: str) -> bool:
    import pwd
    try:
        pwd.getpwnam(name)
        return False
    except KeyError:
        return True


def test_two_drivers_share_a_postgres_study(postgres, tmp_path):
    """Optuna's distributed mode: no trial lost, none duplicated, numbers unique."""
    cmd = _search("--executor", "optuna", "--storage", postgres.url, "--budget-gflops", "1", "--trials", "10",
                  "--out", str(tmp_path), "--study", "pg", "--no-reference", "--resume")
    drivers = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
               for _ in range(2)]
    outs = [d.communicate(timeout=600)[0] for d in drivers]
    assert [d.returncode for d in drivers] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    study = _study(postgres.url, "pg")
    trials = study.get_trials()
    numbers = [t.number for t in trials]
    assert numbers == list(range(len(trials)))                 # unique, none skipped
    assert all(t.state in FINISHED for t in trials)           # none lost in RUNNING
    assert len([t for t in trials if t.state in COUNTED]) >= 10
    logged = [{int(line.split()[1]) for line in out.splitlines() if line.startswith("trial ")} for out in outs]
    assert logged[0] and logged[1], "one driver did no work"
    assert not logged[0] & logged[1]                          # no trial run by both
    assert logged[0] | logged[1] == set(numbers)              # every trial accounted for
    _report("two drivers, one PostgreSQL study", trials_per_driver=[len(x) for x in logged], duplicated=0,
            lost=0, trials=len(trials))
    # the study is readable by export and by optuna-dashboard's API
    exp = subprocess.run([PY, "-m", "nas.promote.export", "--study", str(tmp_path / "pg"), "--storage", postgres.url,
                          "--name", "pg", "--out", str(tmp_path / "best.yaml")],
                         capture_output=True, text=True, timeout=120, env=_env())
    assert exp.returncode == 0, exp.stderr
    assert "pg" in _dashboard_study_names(postgres.url)


def _dashboard_study_names(url: str) -> list[str]:
    """What optuna-dashboard, serving this storage, lists in its API."""
    import json
    import urllib.request

    port = free_local_port()
    proc = subprocess.Popen([str(Path(PY).parent / "optuna-dashboard"), url, "--host", "127.0.0.1", "--port",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def ask():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as r:
                    return json.loads(r.read())
            except OSError:
                return None
        body = _wait(ask, 60, "optuna-dashboard to answer", every=0.5)
        return [s["study_name"] for s in body["study_summaries"]]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_postgres_stopped_mid_search_then_resumed(postgres, tmp_path):
    cmd = _search("--executor", "optuna", "--storage", postgres.url, "--budget-gflops", "1", "--trials", "10",
                  "--out", str(tmp_path), "--study", "po", "--no-reference")
    driver = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        _wait(lambda: _counted(postgres.url, "po") >= 2, 300, "2 finished trials")
        before = {t.number: (t.state, t.values, t.user_attrs.get("status"))
                  for t in _study(postgres.url, "po").get_trials() if t.state in FINISHED}
        postgres.stop()
        t_down = time.monotonic()
        out, err = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
    # the driver exits with one line that says how to continue
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert driver.returncode == 2 and len(lines) == 1, err[-3000:]
    assert "lost the study storage" in lines[0] and "--resume" in lines[0] and "***" not in lines[0]
    exit_after = time.monotonic() - t_down
    assert exit_after < 120
    postgres.start()
    t0 = time.monotonic()
    proc = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600, env=_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    _check_resumed(postgres.url, "po", before, 10)
    _report("PostgreSQL stopped mid-search, restarted, --resume", driver_exit_after_s=round(exit_after, 1),
            error=lines[0], finished_before=len(before), resume_wall_s=round(time.monotonic() - t0, 1),
            trials_left_running=0)
