"""A real one-node SLURM cluster for tests: its own munged, slurmctld and slurmd.

Everything lives in a temporary folder (config, munge key and socket, state, spool, pid and log
files) and uses its own ports, so it never touches /etc/slurm or a real installation. Client
commands find it through SLURM_CONF. Only the daemons started here are stopped, by their PIDs.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")
PARTITIONS = ("debug", "cpu")  # debug is the default; cpu is there to test launch.slurm.cpu_partition


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
    node: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

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
            "ClusterName=ftpipetest", f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={self.munge_socket}",
            "SlurmUser=root", "SlurmdUser=root", f"PlugStackConfig={self.root / 'plugstack.conf'}",
            f"StateSaveLocation={self.root / 'state'}", f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}", f"SlurmdPidFile={self.root / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.root / 'log/slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'log/slurmd.log'}",
            # No cgroups here: track processes by their parents, bind nothing.
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/builtin", "ReturnToService=2", "MpiDefault=none", "MailProg=/bin/true",
            "AccountingStorageType=accounting_storage/none", "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none", "MinJobAge=600", "KillWait=5", "InactiveLimit=0",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} "
            f"RealMemory={_real_memory_mb()} State=UNKNOWN",
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
        self.write_config()
        munge_dir = self.root / "munge"
        self._spawn("munged", ["munged", "--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={self._munge_key()}", f"--pid-file={munge_dir / 'munged.pid'}",
                               f"--log-file={munge_dir / 'munged.log'}", f"--seed-file={munge_dir / 'seed'}"])
        self._wait(lambda: self.munge_socket.exists(), timeout, "munged did not create its socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-N", self.node, "-f", str(self.conf)])
        self._wait(self.node_idle, timeout, "the SLURM node did not become idle")

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

    def node_idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True, text=True)
        return out.returncode == 0 and out.stdout.split()[:1] == ["idle"]

    def log_tail(self, name: str) -> str:
        for path in (self.root / "log" / f"{name}.log", self.root / "log" / f"{name}.out"):
            if path.is_file() and path.read_text().strip():
                return path.read_text().strip().splitlines()[-1]
        return "(no log)"

    def stop(self) -> None:
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
