"""Ray nodes started as a user starts them, ``ray start --block``, each a child process of the
test session with its own ports, in a temp folder of the test's (``RAY_TMPDIR``).

They are ended by their process tree: the pids of the ``ray start`` process and all its
descendants are collected first, then ended. Ray's workers run in process groups of their own,
and on SIGTERM ``ray start --block`` leaves gcs_server and workers behind; ``ray stop`` would end
every Ray process on the machine, other sessions' too.
"""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


_handed_out: set[int] = set()


def free_port() -> int:
    """A port nothing listens on, never the same twice in this process: the kernel may offer a
    just-closed port again, and Ray refuses two components on one port."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def descendants(root: int) -> list[int]:
    """``root`` and every process below it, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry))
    tree = [root]
    for pid in tree:
        tree += children.get(pid, [])
    return tree


def end_trees(roots: list[int], grace_s: float = 5.0) -> None:
    """SIGTERM the whole trees (collected first), then SIGKILL whatever is left."""
    pids = [pid for root in roots for pid in descendants(root)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.1)


def alive(pid: int) -> bool:
    """Running: an ended process that its parent has not reaped yet (a zombie) is not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Node:
    """One ``ray start --block`` process."""

    def __init__(self, args: list[str], env: dict, log: Path):
        ports = {
            "--node-manager-port": free_port(),
            "--object-manager-port": free_port(),
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--runtime-env-agent-port": free_port(),
            "--metrics-export-port": free_port(),
        }
        argv = [RAY, "start", "--block", "--disable-usage-stats", *args]
        argv += [f"{flag}={port}" for flag, port in ports.items()]
        self.log = log
        with open(log, "w") as out:
            self.process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)

    def end(self) -> None:
        end_trees([self.process.pid])
        self.process.wait()


class LocalCluster:
    """A head and further nodes on this machine, as ``ray start`` makes them; token
    authentication on, as Ray 2.60 sets it up (the token in ``~/.ray/auth_token``)."""

    def __init__(self, folder: Path, cpus_per_node: int = 2):
        self.folder = folder
        self.cpus = cpus_per_node
        # short: Ray's unix sockets live below it, and their paths may not pass 107 bytes
        self.tmp = Path(tempfile.mkdtemp(prefix="steelseg-ray-", dir="/tmp"))
        self.env = {**os.environ, "RAY_TMPDIR": str(self.tmp), "RAY_AUTH_MODE": "token"}
        self.env.pop("RAY_ADDRESS", None)
        # as a user starts Ray with steelseg's environment active: a job's `python` is its own
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
        # no Prometheus metrics: nothing here reads them, and collecting them costs an idle
        # two-node cluster about a third of its CPU (11% of the 2 cores, 7% without)
        self.env["RAY_enable_metrics_collection"] = "0"
        # no actor watching for spot-instance preemption notices beside each worker group:
        # none come here, and each is one more process to start on the 2 cores
        self.env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
        # no idle workers started for the first driver (this test process) before it needs
        # any: unused, they were ended again half a minute later
        self.env["RAY_prestart_worker_first_driver"] = "0"
        # a node that is ended is seen gone in about 3 s, not 15 (a health check every 3 s, 5
        # failed in a row), as Ray's own tests do; a slow node still has 10 s to answer each
        self.env["RAY_health_check_period_ms"] = "1000"
        self.env["RAY_health_check_failure_threshold"] = "3"
        self.port = free_port()
        self.address = ""  # host:port as the head records it, once it is up
        self.nodes: list[Node] = []

    def start_head(self) -> None:
        # `ray start --head` with token authentication needs a token and does not make one; on
        # a machine that never ran Ray, make it as Ray's own message says to (kept if there is
        # one; written to ~/.ray/auth_token, where nodes, drivers and `ray job` find it)
        subprocess.run([RAY, "get-auth-token", "--generate"], env=self.env, check=True,
                       capture_output=True)  # fmt: skip
        self.dashboard_port = free_port()
        args = ["--head", f"--port={self.port}", f"--num-cpus={self.cpus}",
                f"--ray-client-server-port={free_port()}", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}"]  # fmt: skip
        self.nodes.append(Node(args, self.env, self.folder / "head.log"))

    @property
    def dashboard(self) -> str:
        """The job API's address, as ``ray job`` takes it."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def job(self, command: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """``ray job <command> --address <dashboard> <args>`` as a user runs it from the
        repository: token authentication on (``RAY_AUTH_MODE=token``), the token found where
        ``ray start`` wrote it (``~/.ray/auth_token``)."""
        env = {**self.env, "RAY_AUTH_MODE": "token"}
        env.pop("RAY_TMPDIR")
        argv = [RAY, "job", command, "--address", self.dashboard, *args]
        return subprocess.run(
            argv, cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip

    def job_status(self, job_id: str) -> str:
        """SUCCEEDED, STOPPED, FAILED, ... from Ray's job API (the token from
        ``~/.ray/auth_token``, ``RAY_AUTH_MODE=token`` set by conftest)."""
        from ray.job_submission import JobSubmissionClient

        return str(JobSubmissionClient(self.dashboard).get_job_status(job_id).value)

    def wait_for_job(self, job_id: str, timeout_s: float = 600.0) -> str:
        """The job's final status (SUCCEEDED, STOPPED or FAILED) once it has one (stopped if it
        has none after ``timeout_s``). Its status is asked, not its log followed: ``ray job logs
        --follow`` can return while the job runs, as it did here once after a node was ended
        (ray-project/ray#60665, #51601)."""
        deadline = time.monotonic() + timeout_s
        while (status := self.job_status(job_id)) not in ("SUCCEEDED", "STOPPED", "FAILED"):
            if time.monotonic() > deadline:
                self.job("stop", job_id)
                raise AssertionError(f"job {job_id} still {status} after {timeout_s} s")
            time.sleep(2.0)
        return status

    def add_node(self) -> Node:
        # one log monitor a machine, as `ray start --help` says: the head's reads the log files
        # of every node here (they share its session folder); a second doubled that work
        args = [f"--address={self.address}", f"--num-cpus={self.cpus}",
                "--include-log-monitor=False"]  # fmt: skip
        node = Node(args, self.env, self.folder / f"node{len(self.nodes)}.log")
        self.nodes.append(node)
        return node

    def wait_for_head(self, timeout_s: float = 60.0) -> None:
        """Until the head has recorded its address (the node IP Ray chose) and its GCS takes
        connections. Drivers and nodes must use that address: a driver that reaches the GCS
        by another IP finds no raylet of its own IP and waits forever."""
        record = self.tmp / "ray" / "ray_current_cluster"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                self.address = record.read_text().strip()
                host, _, port = self.address.rpartition(":")
                socket.create_connection((host, int(port)), timeout=1).close()
                return
            except (OSError, ValueError):
                time.sleep(0.2)
        raise RuntimeError(f"the Ray head did not start: {self.nodes[0].log.read_text()[-800:]}")

    def wait_for_nodes(self, count: int, timeout_s: float = 90.0, exactly: bool = False) -> None:
        """Until ``count`` nodes (at least, or ``exactly``: an ended one no longer counted) are
        alive for the cluster's GCS."""
        import ray

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            alive = len([n for n in ray.nodes() if n["Alive"]])
            if alive == count or (alive > count and not exactly):
                return
            time.sleep(0.5)
        logs = "; ".join(n.log.read_text()[-500:] for n in self.nodes)
        raise RuntimeError(f"{count} Ray nodes did not come up: {logs}")

    def shutdown(self) -> None:
        end_trees([node.process.pid for node in self.nodes])
        for node in self.nodes:
            node.process.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)
