"""A real SLURM cluster for tests: its own munged, slurmctld and one slurmd per node.

Everything lives in a temporary folder (config, munge key and socket, state, spool, pid and log
files) and uses its own ports, so it never touches /etc/slurm or a real installation. Client
commands find it through SLURM_CONF. Only the daemons started here are stopped, by their PIDs.

With nodes=2 each node is a network namespace on a bridge of its own (a private /24), with its
interface named eth1 in every namespace (so GLOO_SOCKET_IFNAME is the same on all nodes) and its
own NodeAddr; each slurmd runs inside its namespace (nsenter, not `ip netns exec`, which remounts
/sys). Jobs on a node then see only that node's address: ranks really talk across "nodes".
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")
PARTITIONS = ("debug", "cpu")  # debug is the default; cpu is there to test launch.slurm.cpu_partition


NODE_IFNAME = "eth1"


class Unavailable(RuntimeError):
    """SLURM cannot run here (not root, packages missing and not installable); tests skip."""


def ensure_installed() -> None:
    if os.geteuid() != 0:
        raise Unavailable("SLURM test cluster needs root (it starts munged, slurmctld and slurmd)")
    if all(shutil.which(d) for d in DAEMONS) and shutil.which("sbatch"):
        return
    if not shutil.which("apt-get"):
        raise Unavailable("SLURM packages missing and apt-get not available")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    done = subprocess.run(["apt-get", "install", "-y", *PACKAGES], env=env, capture_output=True, text=True)
    if done.returncode != 0 or not shutil.which("slurmctld"):
        raise Unavailable(f"apt-get install {' '.join(PACKAGES)} failed: {done.stderr.strip()[-300:]}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _real_memory_mb() -> int:
    # A bit below the machine's total, or slurmd registers the node as invalid (low RealMemory).
    total_kb = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                        if line.startswith("MemTotal:")))
    return max(256, int(total_kb / 1024 * 0.9))


@dataclass
class SlurmCluster:
    root: Path
    nodes: int = 1
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    namespaces: list[str] = field(default_factory=list)
    bridge: str | None = None
    subnet: str = "10.77.0"

    @property
    def node_names(self) -> list[str]:
        if self.nodes == 1:
            return [socket.gethostname().split(".")[0]]
        return [f"ftpn{i}" for i in range(1, self.nodes + 1)]

    @property
    def node(self) -> str:
        return self.node_names[0]

    def node_addr(self, index: int) -> str:
        return "127.0.0.1" if self.nodes == 1 else f"{self.subnet}.{11 + index}"

    @property
    def controller_addr(self) -> str:
        return "127.0.0.1" if self.nodes == 1 else f"{self.subnet}.1"

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def write_config(self) -> None:
        for sub in ("state", "spool", "log", "munge"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "plugstack.conf").write_text("")
        lines = [
            "ClusterName=ftpipetest",
            f"SlurmctldHost={socket.gethostname().split('.')[0]}({self.controller_addr})",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={self.munge_socket}",
            "SlurmUser=root", "SlurmdUser=root", f"PlugStackConfig={self.root / 'plugstack.conf'}",
            f"StateSaveLocation={self.root / 'state'}", f"SlurmdSpoolDir={self.root / 'spool'}-%n",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}", f"SlurmdPidFile={self.root / 'slurmd'}-%n.pid",
            f"SlurmctldLogFile={self.root / 'log/slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'log/slurmd'}-%n.log",
            # No cgroups here: track processes by their parents, bind nothing.
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/builtin", "ReturnToService=2", "MpiDefault=none", "MailProg=/bin/true",
            "AccountingStorageType=accounting_storage/none", "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none", "MinJobAge=600", "KillWait=5", "InactiveLimit=0",
            *(f"NodeName={name} NodeAddr={self.node_addr(i)} CPUs={os.cpu_count()} "
              f"RealMemory={_real_memory_mb() // self.nodes} State=UNKNOWN"
              for i, name in enumerate(self.node_names)),
            f"PartitionName={PARTITIONS[0]} Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            *(f"PartitionName={p} Nodes=ALL MaxTime=INFINITE State=UP" for p in PARTITIONS[1:]),
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "munge.socket"

    def _munge_key(self) -> Path:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        return key

    def start(self, timeout: float = 60.0) -> None:
        self.root.chmod(0o755)
        if self.nodes > 1:
            self._make_network()
        self.write_config()
        munge_dir = self.root / "munge"
        self._spawn("munged", ["munged", "--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={self._munge_key()}", f"--pid-file={munge_dir / 'munged.pid'}",
                               f"--log-file={munge_dir / 'munged.log'}", f"--seed-file={munge_dir / 'seed'}"])
        self._wait(lambda: self.munge_socket.exists(), timeout, "munged did not create its socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        for index, name in enumerate(self.node_names):
            enter = ["nsenter", f"--net=/var/run/netns/{self.namespaces[index]}"] if self.namespaces else []
            self._spawn(f"slurmd-{name}", [*enter, "slurmd", "-D", "-N", name, "-f", str(self.conf)])
        self._wait(self.nodes_idle, timeout, "the SLURM nodes did not become idle")

    def _make_network(self) -> None:
        """A bridge with the controller's address; per node a namespace, a veth on the bridge, eth1 inside."""
        if not shutil.which("ip") or not shutil.which("nsenter"):
            raise Unavailable("a multi-node test cluster needs `ip` (iproute2) and `nsenter`")
        bridge = self.bridge = f"ftpbr{os.getpid() % 10000}"
        self._ip("link", "add", bridge, "type", "bridge")
        self._ip("addr", "add", f"{self.controller_addr}/24", "dev", bridge)
        self._ip("link", "set", bridge, "up")
        for index in range(self.nodes):
            ns, outside = f"ftpns{os.getpid() % 10000}-{index}", f"ftpv{os.getpid() % 10000}-{index}"
            self._ip("netns", "add", ns)
            self.namespaces.append(ns)
            self._ip("link", "add", outside, "type", "veth", "peer", "name", NODE_IFNAME, "netns", ns)
            self._ip("link", "set", outside, "master", bridge, "up")
            self._ip("-n", ns, "addr", "add", f"{self.node_addr(index)}/24", "dev", NODE_IFNAME)
            self._ip("-n", ns, "link", "set", NODE_IFNAME, "up")
            self._ip("-n", ns, "link", "set", "lo", "up")

    @staticmethod
    def _ip(*args: str) -> None:
        done = subprocess.run(["ip", *args], capture_output=True, text=True)
        if done.returncode != 0:
            raise Unavailable(f"ip {' '.join(args)} failed: {done.stderr.strip()}")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        self.processes[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                                start_new_session=True)

    def _wait(self, ready, timeout: float, message: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [n for n, p in self.processes.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead[0]} exited: {self.log_tail(dead[0])}")
            if ready():
                return
            time.sleep(0.5)
        raise RuntimeError(f"{message} within {timeout:.0f}s: {self.log_tail('slurmd')}")

    def nodes_idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env, capture_output=True,
                             text=True)
        states = dict(line.split() for line in out.stdout.splitlines() if len(line.split()) == 2)
        return out.returncode == 0 and all(states.get(n) == "idle" for n in self.node_names)

    def log_tail(self, name: str) -> str:
        name = name if name in self.processes else f"slurmd-{self.node}"
        for path in (self.root / "log" / f"{name}.log", self.root / "log" / f"{name}.out"):
            if path.is_file() and path.read_text().strip():
                return path.read_text().strip().splitlines()[-1]
        return "(no log)"

    def cancel_all_jobs(self, timeout: float = 30.0) -> None:
        """End this cluster's jobs first: stopping slurmd would leave their processes running."""
        if "slurmctld" not in self.processes:
            return
        subprocess.run(["scancel", "--user", str(os.geteuid())], env=self.env, capture_output=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True, text=True)
            if out.returncode != 0 or not out.stdout.strip():
                return
            time.sleep(0.5)

    def stop(self) -> None:
        self.cancel_all_jobs()
        # Reverse order: slurmd and slurmctld still talk to munged while they shut down.
        for name in reversed(list(self.processes)):
            proc = self.processes[name]
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.processes.clear()
        for name in self.namespaces:  # their veths go with them
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        if self.bridge:
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        self.namespaces.clear()
        self.bridge = None


@contextmanager
def running_cluster(root: Path, nodes: int = 1) -> Iterator[SlurmCluster]:
    """A started cluster with SLURM_CONF pointing at it; stopped, and SLURM_CONF restored, after.
    Raises Unavailable (tests skip) where it cannot run."""
    ensure_installed()
    cluster = SlurmCluster(root, nodes=nodes)
    previous = os.environ.get("SLURM_CONF")
    try:
        cluster.start()
        os.environ["SLURM_CONF"] = str(cluster.conf)
        yield cluster
    finally:
        cluster.stop()
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
